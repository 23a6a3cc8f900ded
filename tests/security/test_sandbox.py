"""An exploited tool can do nothing but return a wrong answer.

A probe tool, through the whole path (client, policy, signed job, worker,
bubblewrap runner, receipt, ledger), tries what an attacker inside a tool would
try. Each attempt fails or is cut off, the call ends as a signed result or a
clear signed failure, and the worker goes on serving.
"""

from __future__ import annotations

from typing import Any

import pytest

from sandbox_tasks.confine import available, containment
from tests.harness import REPO, Stack

pytestmark = pytest.mark.integration


def probe(stack: Stack, token: str, action: str, target: str = "") -> Any:
    client = stack.client(token)
    view = client.call("probe", {"action": action, "target": target}, wait=True, timeout=60)
    node = view.nodes[0]
    assert node.receipt is not None and node.receipt["key_id"].startswith("tool.probe:")
    return node


def test_calls_run_under_bubblewrap(stack: Stack, token: str) -> None:
    client = stack.client(token)
    view = client.call("probe", {"action": "environment"}, wait=True)
    with client.plane.sessions() as session:
        from sqlalchemy import select

        from ledger.models import EvidenceEvent

        payload = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == view.run_id, EvidenceEvent.kind == "ToolCallCompleted"
            )
        )
    # signed into the receipt: bubblewrap, and the kernel layers in the tool's own process
    assert payload["message"]["result"]["containment"] == containment("bwrap", available())


@pytest.mark.parametrize("action", ["connect_redis", "connect_postgres"])
def test_no_network_to_the_hosts_services(stack: Stack, token: str, action: str) -> None:
    node = probe(stack, token, action)
    assert node.status == "completed"
    assert node.result["outcome"] == "refused", node.result


def test_no_interface_or_route_to_anywhere_else(stack: Stack, token: str) -> None:
    node = probe(stack, token, "interfaces")
    if node.result["outcome"] == "refused":  # seccomp refused the socket, Landlock /proc
        assert "not permitted" in node.result["detail"]["error"], node.result
        assert "seccomp" in available()
    else:
        assert node.result["detail"]["interfaces"] == ["lo"]
        assert node.result["detail"]["routes"] == []


def test_data_root_is_read_only(stack: Stack, token: str) -> None:
    node = probe(stack, token, "write_data_root")
    assert node.result["outcome"] == "refused"
    assert "Read-only" in node.result["detail"]["error"]
    assert not (REPO / "examples" / "repo" / "pwned.txt").exists()


def test_keys_and_environment_are_out_of_reach(stack: Stack, token: str) -> None:
    key_files = sorted((stack.home / "keys" / "private").iterdir())
    assert key_files
    for target in (str(key_files[0]), str(stack.home / "keys" / "index.json"), "/etc/shadow"):
        node = probe(stack, token, "read_file", target)
        assert node.result["outcome"] == "refused", (target, node.result)
    # no process the tool can see in its namespace carries a secret either
    for pid in (1, 2):
        node = probe(stack, token, "read_file", f"/proc/{pid}/environ")
        text = node.result["detail"].get("text", "")
        assert "TOOLPLANE" not in text and "redis://" not in text and "postgresql" not in text, text
    env = probe(stack, token, "environment").result["detail"]["env"]
    assert set(env) <= {"PATH", "HOME", "PYTHONPATH", "PWD"}, env
    assert not any("redis://" in v or "postgresql" in v or "tp_" in v for v in env.values())


def test_fork_bomb_is_bounded(stack: Stack, token: str) -> None:
    node = probe(stack, token, "fork_bomb")
    # stopped by the process cap (or cut off by the wall time), never unbounded
    if node.status == "completed":
        assert node.result["outcome"] == "stopped", node.result
        assert node.result["detail"]["children"] < 64
    else:
        assert node.error["code"] in ("timeout", "tool_error")


@pytest.mark.parametrize(
    ("action", "codes"),
    [
        ("allocate", {"tool_error"}),
        ("loop", {"timeout"}),
        ("print_gigabytes", {"too_large", "tool_error", "timeout"}),
    ],
)
def test_runaway_tools_are_cut_off(stack: Stack, token: str, action: str, codes: set[str]) -> None:
    node = probe(stack, token, action)
    assert node.status == "failed"
    assert node.error["code"] in codes, node.error


def test_the_worker_goes_on_serving(stack: Stack, token: str) -> None:
    for action in ("loop", "allocate", "fork_bomb"):
        probe(stack, token, action)
    node = probe(stack, token, "connect_redis")
    assert node.status == "completed"
    assert stack.client(token).verify_ledger().ok


def test_a_result_with_nul_fails_cleanly_instead_of_jamming_ingest(
    stack: Stack, token: str
) -> None:
    node = probe(stack, token, "nul")
    assert node.status == "failed"
    assert node.error == {"code": "tool_error", "message": "result contains NUL characters"}
    assert probe(stack, token, "connect_redis").status == "completed"
