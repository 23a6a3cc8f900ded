"""One call cannot take over the runner that serves the next, through the whole path.

The ``takeover`` tool (tests/takeover_tools.py), installed as a plugin, does what once
took over every later call of a worker: a child that calls setsid() and outlives the
call, the runner's channels opened through /proc/<runner>/fd, SIGSTOP to the runner
(from the surviving child, after the call), files left in scratch and in the runner's
scratch root, a module written into a directory on sys.path. Each attempt is reported in
the call's signed result and fails or is undone; the survivor is gone before the result
is published; a later call of another tenant returns its own answer, and a later call
of the same tenant finds nothing of the implant. Once under bubblewrap and once without
namespaces (as in a container: runners as plain processes, weak containment allowed).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import select

from sandbox_tasks.bwrap import bwrap_path, probe_bwrap
from sandbox_tasks.confine import available, containment
from tests.harness import Services, Stack, own_services, start_stack, stop_stack

pytestmark = pytest.mark.integration

CONTAINMENT = {
    "bwrap": containment("bwrap", available()),
    "plain": containment("runner", available()) + " (no namespaces)",
}
NO_NAMESPACES_ENV = {
    "TP_TEST_NO_NAMESPACES": "1",
    "TOOLPLANE_WORKER_ENV": "TP_TEST_EGRESS,TP_TEST_NO_NAMESPACES",
}


@pytest.fixture(scope="module", params=["bwrap", "plain"])
def takeover_stack(
    request: pytest.FixtureRequest, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Stack]]:
    kind = request.param
    if kind == "bwrap" and (problem := probe_bwrap(bwrap_path())) is not None:
        pytest.skip(f"this host cannot make namespaces: {problem}")
    own = own_services(services)
    extra = {"TOOLPLANE_EXTRA_TOOLS": "tests.takeover_tools"}
    if kind == "plain":
        extra |= NO_NAMESPACES_ENV | {"TOOLPLANE_ALLOW_WEAK_CONTAINMENT": "true"}
    home = Path(tmp_path_factory.mktemp(f"takeover-{kind}"))
    stack = start_stack(own, home, workers={"takeover": 1}, extra_env=extra)
    try:
        yield kind, stack
    finally:
        stop_stack(stack)
        own.close()


def call(stack: Stack, token: str, action: str, target: str = "") -> Any:
    client = stack.client(token)
    view = client.call("takeover", {"action": action, "target": target}, wait=True, timeout=60)
    node = view.nodes[0]
    assert node.status == "completed", node
    assert node.receipt is not None and node.receipt["key_id"].startswith("tool.takeover:")
    return view.run_id, node.result


def signed_containment(stack: Stack, token: str, run_id: str) -> str:
    from ledger.models import EvidenceEvent

    with stack.client(token).plane.sessions() as session:
        payload = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == run_id, EvidenceEvent.kind == "ToolCallCompleted"
            )
        )
    return str(payload["message"]["result"]["containment"])


def marked(marker: str) -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if marker in " ".join(p.info["cmdline"] or [])
    ]


@pytest.mark.timeout(240)
def test_one_call_cannot_take_over_the_calls_that_follow(
    takeover_stack: tuple[str, Stack],
) -> None:
    kind, stack = takeover_stack
    attacker, victim = stack.tenant(), stack.tenant()
    marker = f"tp-implant-{secrets.token_hex(6)}"
    call(stack, attacker, "echo", "warm")
    assert call(stack, victim, "echo", "before")[1]["detail"] == {"target": "before"}

    run_id, result = call(stack, attacker, "implant", marker)
    assert result["outcome"] == "implanted"
    assert signed_containment(stack, attacker, run_id) == CONTAINMENT[kind]
    found = result["detail"]
    # (a) the child left the call's session and process group...
    survivor = found["survivor"]
    assert survivor["session"] == survivor["pid"] != survivor["own_session"]
    # ...and was killed (by the runner, its subreaper, or through the runner's cgroup) before
    # the result was published
    assert marked(marker) == [], "a process of the call outlived it"
    # (b) the runner's channels, memory and environment cannot be opened
    for what, got in found["channels"].items():
        assert got in ("EACCES", "EPERM", "ENXIO", "ENOENT"), (what, got)
    # (c) under bubblewrap the runner is PID 1 of its namespace: a SIGSTOP is dropped; without
    # namespaces it stops, and the worker replaces a runner it finds stopped
    # (the kernel layers refuse the signal itself: Landlock's signal scope, seccomp)
    assert found["stop"]["sent"] == "EPERM" or found["stop"]["state"] == "S", found["stop"]
    # (d) nothing writable but the scratch places, which are checked after each call
    assert found["files"]["scratch"] == "written"
    if kind == "bwrap":
        assert found["files"]["/"] == "EROFS" and found["files"]["/dev/shm"] == "EROFS"
    # (e) no directory on the runner's sys.path is writable, nothing planted is importable
    assert found["sys_path"]["writable_on_path"] == [], found["sys_path"]
    assert not found["sys_path"]["importable"]
    assert "" not in found["sys_path"]["path"]

    # another tenant's calls get their own answers, never an implant's
    for n in range(3):
        assert call(stack, victim, "echo", f"mine-{n}")[1]["detail"] == {"target": f"mine-{n}"}
    # the attacker's next call runs in a fresh runner: no file, no process of the implant
    looked = call(stack, attacker, "look")[1]["detail"]
    assert looked["left"] == [] and looked["root_entries"] in ([], ["EACCES"]), looked
    for proc in psutil.process_iter(["cmdline", "status"]):  # no runner is left stopped
        if "sandbox_tasks.runner" in " ".join(proc.info["cmdline"] or []):
            assert proc.info["status"] != psutil.STATUS_STOPPED, proc
    assert marked(marker) == []
    log = stack.log("worker-takeover")
    assert "sandbox.replaced tool=takeover" in log  # the runner killed the orphan it found, or
    assert "outlived the call" in log or "the call left processes behind" in log  # the sweep
    assert stack.client(attacker).verify_ledger().ok


def test_the_worker_and_the_runner_are_not_dumpable(takeover_stack: tuple[str, Stack]) -> None:
    kind, stack = takeover_stack
    token = stack.tenant()
    found = call(stack, token, "whoami")[1]["detail"]
    assert found["env"] == ["HOME", "PATH"]  # none of the worker's environment
    worker = psutil.Process(stack.worker_pid("takeover"))
    pool = [worker, *worker.children()]
    for proc in pool:  # a non-dumpable process's /proc entries belong to root
        assert proc.uids().real != 0, "the test stack's workers run as users of their own"
        assert os.stat(f"/proc/{proc.pid}/environ").st_uid == 0, proc
    # the runners, seen from outside: fresh `python -I` processes, not dumpable, no secrets
    runners = [
        p
        for proc in pool
        for p in proc.children(recursive=True)
        if "sandbox_tasks.runner" in " ".join(p.cmdline())
        and not p.cmdline()[0].endswith("bwrap")  # bubblewrap's own monitor, not the runner
    ]
    assert runners, "the call ran in a runner"
    for runner in runners:
        cmdline = " ".join(runner.cmdline())
        assert " -I " in f" {cmdline} " and "TOOLPLANE" not in cmdline
        assert set(runner.environ()) <= {"HOME", "PATH", "PWD"}, runner.environ()
        assert os.stat(f"/proc/{runner.pid}/environ").st_uid == 0, runner
    # from inside, nothing of the runner's or the worker's /proc opens (not dumpable, and
    # under Landlock no /proc at all)
    for what, got in found["opened"].items():
        assert got in ("EACCES", "ENOENT"), (what, got)
    if kind == "plain":
        # the tool's parent is the runner, a fresh process whose parent is the worker
        assert found["runner"] in {r.pid for r in runners}
        assert {r.ppid() for r in runners} <= {p.pid for p in pool}
    else:
        assert found["runner"] == 1  # PID 1 of its own namespace
