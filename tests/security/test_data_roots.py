"""A plugin tool brings its own named data root: the operator maps the name to a
directory (TOOLPLANE_DATA_ROOTS), the sandbox mounts exactly the tool's roots read-only,
and the tool reads through ``ctx.root(name)``. Through the whole path, with the test
plugin `rooted` (tests/fixture_tools.py), whose root is ``fixture``."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from ledger.models import EvidenceEvent
from tests.fixture_data import FIXTURE_ROOT_NOTE
from tests.harness import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_a_plugin_reads_its_own_root_and_cannot_see_the_repository(
    stack: Stack, token: str
) -> None:
    repo_readme = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / "README.md"
    assert repo_readme.is_file()
    client = stack.client(token)
    view = client.call("rooted", {"path": "note.txt", "peek": str(repo_readme)}, wait=True)
    assert view.status == "completed", view
    result = view.nodes[0].result
    assert result["content"] == FIXTURE_ROOT_NOTE
    assert Path(result["root"]) == (stack.home / "fixture-root").resolve()
    # the repository is not mounted in this tool's sandbox, nor named in its context
    assert result["peeked"].startswith("FileNotFoundError"), result["peeked"]
    assert "root('repo'): the data root 'repo' is not given to this tool" in result["peeked"]
    assert view.nodes[0].receipt["key_id"].startswith("tool.rooted:")
    assert client.verify_ledger(run_id=view.run_id).ok


def test_a_label_on_the_plugins_root_raises_the_calls_classification(
    stack: Stack, token: str
) -> None:
    # the stack's labels.json: {"tool": "*", "root": "fixture", "classification": "confidential"}
    client = stack.client(token)
    view = client.call("rooted", {"path": "note.txt"}, classification="internal", wait=True)
    with client.plane.sessions() as session:
        decision = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == view.run_id, EvidenceEvent.kind == "PolicyDecision"
            )
        )
    assert decision["request"]["classification"] == "confidential", decision["request"]
    plain = client.call("probe", {"action": "environment"}, classification="internal", wait=True)
    with client.plane.sessions() as session:
        decision = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == plain.run_id, EvidenceEvent.kind == "PolicyDecision"
            )
        )
    assert decision["request"]["classification"] == "internal"  # the repo's tool: unlabelled


def test_a_plugins_root_keeps_the_path_rules(stack: Stack, token: str) -> None:
    client = stack.client(token)
    for path, code in (("../repo/README.md", "path_outside_root"), ("nope.txt", "not_found")):
        view = client.call("rooted", {"path": path}, wait=True)
        assert view.nodes[0].error["code"] == code, view.nodes[0].error


def test_the_builtin_tools_do_not_see_the_plugins_root(stack: Stack, token: str) -> None:
    note = stack.home / "fixture-root" / "note.txt"
    view = stack.client(token).call(
        "probe", {"action": "read_file", "target": str(note)}, wait=True
    )
    assert view.nodes[0].result["outcome"] == "refused", view.nodes[0].result
