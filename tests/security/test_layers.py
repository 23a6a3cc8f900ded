"""Without bubblewrap (as in a container), the kernel layers alone keep a tool in its place.

A stack of its own (own database, own Redis database) whose workers find no bubblewrap
(tests/layer_tools.py) and are allowed to run without namespaces: each call runs in a
fork of the worker, under rlimits, no_new_privs, Landlock and seccomp. Through the whole
path (API, policy, signed job, worker, receipt, ledger), the probe tool tries to read its
worker's receipt key and the control's key directory, the broker URL in its worker's
environment, its worker's memory and /proc entries, to signal it, to open sockets, to
write outside its scratch. Each attempt is refused and reported in the signed result,
whose receipt names the layers; the mediated fetch still works.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from ledger.models import EvidenceEvent
from sandbox_tasks.confine import available, containment
from tests.harness import Services, Stack, own_services, start_stack, stop_stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not {"seccomp", "no_new_privs"} <= set(available())
        or not any(n.startswith("landlock") for n in available()),
        reason=f"this host has only {available()}",
    ),
]
TOOL = "confined_probe"


@pytest.fixture(scope="module")
def layered(
    services: Services, tmp_path_factory: pytest.TempPathFactory, http_server: ThreadingHTTPServer
) -> Iterator[Stack]:
    own = own_services(services)
    home = Path(tmp_path_factory.mktemp("layers-home"))
    env = {
        "TOOLPLANE_EXTRA_TOOLS": "tests.fixture_tools,tests.layer_tools",
        "TOOLPLANE_ALLOW_WEAK_CONTAINMENT": "true",
        "TP_TEST_NO_BWRAP": "1",
        "TOOLPLANE_WORKER_ENV": "TP_TEST_EGRESS,TP_TEST_NO_BWRAP",
    }
    stack = start_stack(
        own,
        home,
        workers={TOOL: 1, "fetcher": 1},
        egress=f"127.0.0.1:{http_server.server_address[1]}",
        private_egress=f"127.0.0.1:{http_server.server_address[1]}",  # loopback: named by policy
        extra_env=env,
    )
    try:
        yield stack
    finally:
        stop_stack(stack)
        own.close()


def signed(stack: Stack, token: str, run_id: str) -> dict[str, Any]:
    """The result as the worker signed it, from the ledger."""
    client = stack.client(token)
    with client.plane.sessions() as session:
        payload = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == run_id,
                EvidenceEvent.kind.in_(["ToolCallCompleted", "ToolCallFailed"]),
            )
        )
    assert client.verify_ledger(run_id=run_id).ok
    return dict(payload["message"]["result"])


def attempt(stack: Stack, token: str, *tries: tuple[str, str]) -> tuple[dict[str, str], str]:
    client = stack.client(token)
    args = {"attempts": [{"action": a, "target": t} for a, t in tries]}
    view = client.call(TOOL, args, wait=True, timeout=60)
    node = view.nodes[0]
    assert node.status == "completed", (node.status, node.error)
    result = signed(stack, token, view.run_id)
    assert result["result"] == node.result  # what the caller sees is what was signed
    return result["result"]["seen"], result["containment"]


def test_the_receipt_names_the_layers_and_no_namespaces(layered: Stack) -> None:
    token = layered.tenant()
    seen, name = attempt(layered, token, ("write", "{scratch}/note"))
    assert seen == {"write {scratch}/note": "ok"}  # its own scratch is writable
    assert name == containment("runner", available()) + " (no namespaces)"
    assert "landlock" in name and "+seccomp+nnp+rlimits" in name


def test_no_key_of_the_worker_or_the_control(layered: Stack) -> None:
    worker_keys = layered.worker_home(TOOL).resolve() / "keys"  # the worker's user may read
    receipt_keys = sorted((worker_keys / "private").iterdir())
    control_keys = sorted((layered.home.resolve() / "keys" / "private").iterdir())
    assert receipt_keys and control_keys
    tries = [("read", str(p)) for p in (*receipt_keys, *control_keys)]
    tries += [("list", str(worker_keys / "private")), ("list", str(control_keys[0].parent))]
    tries += [("read", str(worker_keys / "index.json")), ("read", "/etc/shadow")]
    seen, _ = attempt(layered, layered.tenant(), *tries)
    assert set(seen.values()) == {"EACCES"}, seen


def test_no_broker_secret_memory_or_proc_entry_of_another_process(layered: Stack) -> None:
    tries = [
        ("read", "/proc/{worker}/environ"),  # the worker's broker URL, with its password
        ("read", "/proc/{worker}/mem"),
        ("read", "/proc/{worker}/cmdline"),
        ("list", "/proc/{worker}/fd"),  # its broker connection, its pipes
        ("read", "/proc/1/environ"),
        ("list", "/proc"),
        ("vm_read", "{worker}"),  # process_vm_readv: its receipt key in memory
        ("sigstop", "{worker}"),  # stop the worker: every later call would hang
    ]
    seen, _ = attempt(layered, layered.tenant(), *tries)
    assert len(seen) == len(tries)
    for action, target in tries:
        got = seen[f"{action} {target}"]
        # EACCES: Landlock refused the path; EPERM: the system call, or ptrace's rule for
        # /proc/<pid>/mem (a domain may not reach a process outside it)
        expected = {"EPERM"} if action in ("vm_read", "sigstop") else {"EACCES", "EPERM"}
        assert got in expected, (action, target, got)
    # the worker was neither stopped nor read: it serves the next call
    again, _ = attempt(layered, layered.tenant(), ("write", "{scratch}/note"))
    assert again == {"write {scratch}/note": "ok"}


def test_no_socket_and_no_write_outside_scratch(layered: Stack, services: Services) -> None:
    port = make_url(services.redis_url).port or 6379
    # resolved: the worker's user cannot search pytest's own directories, which link here
    repo = Path(layered.env["TOOLPLANE_REPO_ROOT"]).resolve()
    outside = [
        str(layered.worker_home(TOOL).resolve() / "scratch" / "planted"),  # beside its scratch
        str(layered.worker_home(TOOL).resolve() / "planted"),  # its worker's home, its own
        str(repo / "planted"),  # its read-only data root
        "/tmp/planted-by-a-tool",  # noqa: S108 - where it must not write
    ]
    tries = [("socket", "AF_INET"), ("socket", "AF_UNIX"), ("socket", "AF_INET6")]
    tries += [("connect", f"127.0.0.1:{port}")]
    tries += [("write", path) for path in outside]
    tries += [("read", str(repo / "README.md"))]
    seen, _ = attempt(layered, layered.tenant(), *tries)
    assert len(seen) == len(tries)
    for action, target in tries:
        got = seen[f"{action} {target}"]
        if action == "read":  # its own data root stays readable
            assert got.startswith("ok: "), (target, got)
        elif action == "write":
            assert got == "EACCES", (target, got)
            assert not Path(target).exists()
        else:
            assert got == "EPERM", (action, target, got)


def test_the_mediated_fetch_still_works(layered: Stack, http_server: ThreadingHTTPServer) -> None:
    token = layered.tenant()
    url = f"http://127.0.0.1:{http_server.server_address[1]}/hello"
    view = layered.client(token).call("fetcher", {"url": url}, wait=True, timeout=60)
    assert view.status == "completed", view
    assert view.nodes[0].result == {"status": 200, "body": "hello from the allowed host"}
    result = signed(layered, token, view.run_id)
    assert result["containment"].startswith("runner+landlock")
    assert [f["url"] for f in result["fetches"]] == [url]
