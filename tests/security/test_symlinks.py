"""Policy judges what is actually read: a symlink inside the repository cannot carry a
call that policy allows by its typed path (``src/...``) to a file it forbids (``.env``).

Through the whole path (API, policy, signed job, sandboxed worker, receipt, ledger),
in ``prod`` and in ``dev``: the tool refuses every path through a symlink, naming the
field and the link, the refusal is signed, and the secret is nowhere in the ledger.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from ledger.models import EvidenceEvent
from tests.fixture_data import SYMLINKED_SECRET
from tests.harness import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def ledger_text(stack: Stack, token: str, run_id: str) -> str:
    with stack.client(token).plane.sessions() as session:
        payloads = session.scalars(
            select(EvidenceEvent.payload).where(EvidenceEvent.run_id == run_id)
        ).all()
    return json.dumps(payloads)


@pytest.mark.parametrize("environment", ["prod", "dev"])
@pytest.mark.parametrize(
    ("path", "link"),
    [
        ("src/shipit/settings.txt", "src/shipit/settings.txt"),  # -> ../../.env
        ("src/lib/deploy.py", "src/lib"),  # a symlinked directory component -> shipit
    ],
)
def test_a_path_through_a_symlink_is_refused(
    stack: Stack, token: str, environment: str, path: str, link: str
) -> None:
    client = stack.client(token)
    view = client.call("read_repo_file", {"path": path}, environment=environment, wait=True)
    node = view.nodes[0]
    assert (view.status, node.status) == ("failed", "failed"), view
    assert node.error["code"] == "symlink_refused", node.error
    assert node.error["message"].startswith(f"path: '{link}' is a symlink"), node.error
    assert node.receipt["key_id"].startswith("tool.read_repo_file:")  # the worker said so
    assert SYMLINKED_SECRET not in ledger_text(stack, token, view.run_id)
    assert client.verify_ledger(run_id=view.run_id).ok


@pytest.mark.parametrize("environment", ["prod", "dev"])
def test_the_file_itself_is_denied_by_policy_and_a_plain_file_still_reads(
    stack: Stack, token: str, environment: str
) -> None:
    client = stack.client(token)
    denied = client.call("read_repo_file", {"path": ".env"}, environment=environment, wait=True)
    assert denied.nodes[0].status == "denied", denied
    assert denied.nodes[0].error["code"] == "policy_denied", denied.nodes[0].error
    plain = client.call(
        "read_repo_file", {"path": "src/shipit/deploy.py"}, environment=environment, wait=True
    )
    assert plain.status == "completed", plain
    assert plain.nodes[0].result["path"] == "src/shipit/deploy.py"
    assert "shell=True" in plain.nodes[0].result["content"]


def test_the_shipped_tools_announce_that_they_follow_no_symlink(stack: Stack, token: str) -> None:
    catalog = {tool.tool: tool.manifest for tool in stack.http(token).tools()}
    for name, roots in (
        ("read_repo_file", ["repo"]),
        ("search_docs", ["docs"]),
        ("lint_python", []),
    ):
        assert catalog[name]["follow_symlinks"] is False, catalog[name]
        assert catalog[name]["data_roots"] == roots
