"""Warm runners: one per tenant, swept through their cgroup, replaced when not clean.

Real runners (under bubblewrap where the host can make namespaces, and as plain
processes) run the ``takeover`` tool of tests/takeover_tools.py; no worker, broker or
database (the whole path is tests/security/test_runner_takeover.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox_tasks import cgroups
from sandbox_tasks import sandbox as sandbox_module
from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
from sandbox_tasks.executor import Outcome
from sandbox_tasks.plain import PlainExecutor
from sandbox_tasks.registry import ToolContext
from sandbox_tasks.runners import RunnerExecutor
from tests.harness import REPO, wait_for
from tests.takeover_tools import TOOLS

TOOL = TOOLS[0]
MODULES = ["tests.takeover_tools"]
NO_NAMESPACES = probe_bwrap(bwrap_path())
HAS_CGROUP = cgroups.problem() is None


def make(kind: str, tmp_path: Path, **kw: Any) -> RunnerExecutor:
    if kind == "bwrap":
        if NO_NAMESPACES is not None:
            pytest.skip(f"this host cannot make namespaces: {NO_NAMESPACES}")
        binary = bwrap_path()
        assert binary is not None
        return BwrapExecutor(
            binary=binary,
            spec=TOOL,
            roots={"repo": REPO / "examples" / "repo", "docs": REPO / "examples" / "docs"},
            extra_modules=MODULES,
            forbidden=[],
            **kw,
        )
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return PlainExecutor(
        spec=TOOL,
        roots={"repo": REPO / "examples" / "repo", "docs": REPO / "examples" / "docs"},
        extra_modules=MODULES,
        scratch_root=scratch,
        **kw,
    )


@pytest.fixture(params=["bwrap", "plain"])
def executor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunnerExecutor]:
    made = make(request.param, tmp_path)
    try:
        yield made
    finally:
        made.close()


def call(executor: RunnerExecutor, action: str, *, tenant: str = "t1", target: str = "") -> Any:
    ctx = ToolContext(repo_root=REPO, docs_root=REPO, scratch_dir=Path("/nonexistent"))
    args = TOOL.args_model.model_validate({"action": action, "target": target})
    outcome: Outcome = executor.run(TOOL, args, ctx, tenant=tenant)
    assert outcome.ok, outcome
    return outcome.result


def runner_of(executor: RunnerExecutor, tenant: str = "t1") -> int:
    return executor._runners[tenant].runner_pid


def marked(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def test_a_clean_call_keeps_its_warm_runner(executor: RunnerExecutor) -> None:
    assert call(executor, "echo", target="one") == {"outcome": "echo", "detail": {"target": "one"}}
    first = runner_of(executor)
    assert call(executor, "echo", target="two")["detail"] == {"target": "two"}
    assert runner_of(executor) == first and executor.replaced == 0


@pytest.mark.skipif(not HAS_CGROUP, reason="no cgroup for sandboxes on this host")
def test_a_process_that_outlives_its_call_is_killed_and_the_runner_replaced(
    executor: RunnerExecutor,
) -> None:
    marker = f"tp-survivor-{os.getpid()}-{time.monotonic_ns()}"
    call(executor, "echo")
    first = executor._runners["t1"]
    found = call(executor, "implant", target=marker)["detail"]
    survivor = found["survivor"]
    assert survivor["session"] == survivor["pid"] != found["survivor"]["own_session"]  # setsid
    # swept by the worker (this process) right after the call, wherever its session is
    assert marked(marker) == [] and executor.replaced == 1
    assert "t1" not in executor._runners and first.proc.poll() is not None
    looked = call(executor, "look")["detail"]  # a fresh runner: nothing of the implant
    assert looked["left"] == [] and looked["root_entries"] == []
    assert looked["runner_state"] in ("S", "R")


def test_the_runner_is_not_reachable_and_imports_nothing_writable(
    executor: RunnerExecutor,
) -> None:
    found = call(executor, "implant", target=f"tp-reach-{time.monotonic_ns()}")["detail"]
    # its channel is a socket (no open through /proc) and it is not dumpable
    assert found["channels"]["fd0"] in ("EACCES", "ENXIO", "EPERM")
    assert found["channels"]["fd1"] in ("EACCES", "ENXIO", "EPERM")
    assert not found["sys_path"]["importable"]
    if isinstance(executor, BwrapExecutor) or os.geteuid() != 0:  # root writes anywhere
        assert found["sys_path"]["writable_on_path"] == []
    assert "" not in found["sys_path"]["path"] and "/scratch" not in found["sys_path"]["path"]
    assert found["files"]["scratch"] == "written"  # its own scratch: allowed, removed after
    assert executor.replaced == 1  # files left in its scratch root, a survivor


def test_files_left_in_the_scratch_root_replace_the_runner(tmp_path: Path) -> None:
    executor = make("plain", tmp_path)
    try:
        call(executor, "echo")
        sandbox = executor._runners["t1"]
        assert sandbox.scratch is not None
        (sandbox.scratch / "planted.py").write_text("x = 1\n")
        assert call(executor, "echo")["outcome"] == "echo"  # this call's answer is still its own
        assert executor.replaced == 1 and not sandbox.scratch.exists()
    finally:
        executor.close()


def test_a_stopped_runner_is_replaced_before_the_next_call(executor: RunnerExecutor) -> None:
    call(executor, "echo")
    stopped = runner_of(executor)
    os.kill(stopped, signal.SIGSTOP)
    wait_for(lambda: sandbox_module.process_state(stopped) == "T", timeout=5)
    assert call(executor, "echo", target="after")["detail"] == {"target": "after"}
    assert executor.replaced == 1 and runner_of(executor) != stopped
    wait_for(lambda: not psutil.pid_exists(stopped), timeout=5, what="the stopped runner killed")


def test_tenants_never_share_a_runner_and_warm_runners_are_bounded(tmp_path: Path) -> None:
    executor = make("plain", tmp_path, max_runners=2)
    try:
        call(executor, "echo", tenant="a")
        call(executor, "echo", tenant="b")
        a, b = runner_of(executor, "a"), runner_of(executor, "b")
        assert a != b
        call(executor, "echo", tenant="a")  # a is now the most recently used
        call(executor, "echo", tenant="c")  # evicts b
        assert sorted(executor._runners) == ["a", "c"] and runner_of(executor, "a") == a
        wait_for(lambda: not psutil.pid_exists(b), timeout=5, what="the evicted runner gone")
    finally:
        executor.close()
    wait_for(lambda: not psutil.pid_exists(a), timeout=5, what="close() stops every runner")


def test_without_a_cgroup_every_call_gets_a_fresh_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox_module, "create_pids_cgroup", lambda name, max_pids: None)
    executor = make("plain", tmp_path)
    pids = set()
    try:
        for _ in range(3):
            pids.add(call(executor, "whoami")["detail"]["runner"])
            assert executor._runners == {}  # none kept: nothing proves the call left nothing
    finally:
        executor.close()
    assert len(pids) == 3
    assert "sandbox.fresh_per_call" in caplog.text


def test_without_namespaces_the_tool_runs_in_a_fresh_process_not_a_fork_of_the_worker(
    tmp_path: Path,
) -> None:
    os.environ["TP_TEST_SECRET_OF_THE_WORKER"] = "do-not-leak"
    executor = make("plain", tmp_path)
    try:
        found = call(executor, "whoami")["detail"]
    finally:
        executor.close()
        del os.environ["TP_TEST_SECRET_OF_THE_WORKER"]
    assert found["worker"] == os.getpid()  # the runner's parent is the worker...
    assert found["runner"] != os.getpid()  # ...and the tool's parent is the runner
    assert " -I " in found["runner_cmdline"] and "sandbox_tasks.runner" in found["runner_cmdline"]
    assert found["env"] == ["HOME", "PATH"]  # set by the call's child, nothing of the worker's
    assert found["opened"]["runner/fd/0"] in ("EACCES", "ENXIO")


@pytest.mark.skipif(not HAS_CGROUP, reason="no cgroup for sandboxes on this host")
@pytest.mark.parametrize("freezer", [True, False])
def test_kill_all_kills_every_process_of_the_cgroup(
    freezer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = cgroups.create_pids_cgroup(f"test-kill-{os.getpid()}-{freezer}", 16)
    assert made is not None
    group = made if freezer else cgroups.PidsCgroup(made.path, None)
    script = "sh -c 'setsid sleep 300 & sleep 300 & wait' & sleep 300"
    proc = subprocess.Popen(  # noqa: S603 - a fixed command
        ["/bin/sh", "-c", script], preexec_fn=group.join, start_new_session=True
    )
    try:
        wait_for(lambda: len(group.procs()) >= 5, timeout=10, what="five processes")
        group.kill_all()
        assert group.procs() == set()
    finally:
        proc.wait(timeout=10)
        made.remove()
    assert not made.path.exists()


@pytest.mark.skipif(not HAS_CGROUP, reason="no cgroup for sandboxes on this host")
def test_the_cgroups_of_a_worker_that_died_are_swept_at_the_next_start() -> None:
    tool = f"staletest{os.getpid()}"
    dead = subprocess.Popen(["/bin/true"])  # noqa: S603 - a fixed command
    dead.wait()
    stale = cgroups.create_pids_cgroup(f"{tool}-{dead.pid}-1", 8)
    live = cgroups.create_pids_cgroup(f"{tool}-{os.getpid()}-1", 8)
    assert stale is not None and live is not None
    left = subprocess.Popen(  # noqa: S603 - a fixed command
        ["/bin/sleep", "300"], preexec_fn=stale.join, start_new_session=True
    )
    try:
        assert cgroups.remove_stale(tool) == 1
        assert left.wait(timeout=10) == -signal.SIGKILL
        assert not stale.path.exists() and live.path.exists()
    finally:
        left.kill()
        live.remove()
        stale.remove()
