"""The contained executor: a forked child per call, with limits the tool cannot lift."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic import BaseModel, ConfigDict

from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.executor import CONTAINMENT, ForkExecutor, Outcome
from sandbox_tasks.registry import Limits, ToolContext, ToolSpec

STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class Args(BaseModel):
    model_config = STRICT

    n: int = 0
    text: str = ""


class Result(BaseModel):
    model_config = STRICT

    value: Any = None


def spec(func, **limits: Any) -> ToolSpec:
    return ToolSpec(
        name="probe",
        version="1",
        description="a tool defined by the test",
        args_model=Args,
        result_model=Result,
        func=func,
        limits=Limits(**limits),
    )


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    root = tmp_path / "scratch"
    root.mkdir()
    return root


@pytest.fixture
def executor(scratch_root: Path) -> ForkExecutor:
    return ForkExecutor(scratch_root=scratch_root)


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext(repo_root=tmp_path, docs_root=tmp_path, scratch_dir=tmp_path, state="s")


def run(executor: ForkExecutor, ctx: ToolContext, func, args: Args | None = None, **limits):
    return executor.run(spec(func, **limits), args or Args(), ctx)


def gone_or_zombie(pid: int, *, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def pipes(monkeypatch) -> list[int]:
    """The write ends of the pipes the executor makes (the child inherits this list)."""
    real_pipe = os.pipe
    made: list[int] = []

    def recording_pipe() -> tuple[int, int]:
        read_fd, write_fd = real_pipe()
        made.append(write_fd)
        return read_fd, write_fd

    monkeypatch.setattr(os, "pipe", recording_pipe)
    return made


def write_to_pipe_and_exit(pipes: list[int], data: bytes) -> None:
    """In the child: bypass the executor's protocol and write raw bytes to the parent."""
    view = memoryview(data)
    while view:
        view = view[os.write(pipes[-1], view) :]
    os._exit(0)


# -- tools -------------------------------------------------------------------------


def echo(args: Args, ctx: ToolContext) -> Result:
    return Result(value={"n": args.n * 2, "text": args.text, "list": [1, "x", None, True, 0.5]})


def fail_politely(args: Args, ctx: ToolContext) -> Result:
    raise ToolFailure("not_found", "path: no such file 'x.txt'", field="path")


def crash(args: Args, ctx: ToolContext) -> Result:
    raise ValueError("the tool has a bug")


def sleep_long(args: Args, ctx: ToolContext) -> Result:
    time.sleep(10)
    return Result()


def spin(args: Args, ctx: ToolContext) -> Result:
    while True:
        pass


def allocate_2gb(args: Args, ctx: ToolContext) -> Result:
    block = bytearray(2 * 1024**3)
    return Result(value=len(block))


def big_output(args: Args, ctx: ToolContext) -> Result:
    return Result(value="x" * 2_000_000)


def write_10mb(args: Args, ctx: ToolContext) -> Result:
    with open("big.bin", "wb") as handle:
        for _ in range(10):
            handle.write(b"\0" * 1_000_000)
    return Result(value=os.path.getsize("big.bin"))


def environment(args: Args, ctx: ToolContext) -> Result:
    return Result(
        value={
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "scratch": str(ctx.scratch_dir),
            "state": ctx.state,
            "pgid_is_pid": os.getpgid(0) == os.getpid(),
            "limits": {
                "as": resource.getrlimit(resource.RLIMIT_AS)[0],
                "cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
                "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
                "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                "core": resource.getrlimit(resource.RLIMIT_CORE)[0],
            },
        }
    )


def fork_sleeper(args: Args, ctx: ToolContext) -> Result:
    pid = os.fork()
    if pid == 0:  # the grandchild: let go of the outcome pipe, then sleep forever
        os.closerange(3, 65536)
        while True:
            time.sleep(1000)
    return Result(value=pid)


def spawn_sleeper(args: Args, ctx: ToolContext) -> Result:
    child = subprocess.Popen(["sleep", "1000"])  # noqa: S607 - a test fixture
    return Result(value=child.pid)


def fork_sleeper_keeping_the_pipe(args: Args, ctx: ToolContext) -> Result:
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(1000)
    with open(args.text, "w") as handle:  # tell the test: the result will not arrive
        handle.write(str(pid))
    return Result(value=pid)


# -- outcomes ----------------------------------------------------------------------


def test_result_round_trips(executor, ctx):
    outcome = run(executor, ctx, echo, Args(n=21, text="héllo ☃"))
    assert outcome == Outcome(
        ok=True,
        result={"value": {"n": 42, "text": "héllo ☃", "list": [1, "x", None, True, 0.5]}},
    )
    assert executor.containment == CONTAINMENT == "fork-rlimits"


def test_tool_failure_code_and_message_propagate(executor, ctx):
    outcome = run(executor, ctx, fail_politely)
    assert outcome == Outcome(False, None, "not_found", "path: no such file 'x.txt'")


def test_a_crashing_tool_is_a_tool_error(executor, ctx):
    outcome = run(executor, ctx, crash)
    assert not outcome.ok
    assert outcome.error_code == "tool_error"
    assert outcome.error_message == "ValueError: the tool has a bug"


def test_a_tool_returning_the_wrong_type_is_a_tool_error(executor, ctx):
    outcome = run(executor, ctx, lambda args, ctx: {"value": 1})
    assert (outcome.ok, outcome.error_code) == (False, "tool_error")
    assert "dict" in outcome.error_message


def test_a_tool_that_exits_without_an_outcome_is_a_tool_error(executor, ctx):
    outcome = run(executor, ctx, lambda args, ctx: os._exit(0))
    assert (outcome.ok, outcome.error_code) == (False, "tool_error")
    assert "no valid outcome" in outcome.error_message


def test_a_tool_killed_by_a_signal_fails(executor, ctx):
    outcome = run(executor, ctx, lambda args, ctx: os.kill(os.getpid(), signal.SIGTERM))
    assert not outcome.ok
    assert outcome.error_code == "tool_error"
    assert outcome.error_message == f"tool process killed by signal {int(signal.SIGTERM)}"


def test_a_non_utf8_outcome_is_a_tool_error(executor, ctx, pipes):
    outcome = run(executor, ctx, lambda args, ctx: write_to_pipe_and_exit(pipes, b"\xff"))
    assert (outcome.ok, outcome.error_code) == (False, "tool_error")
    assert "no valid outcome" in outcome.error_message


def test_a_float_beyond_2_53_in_the_result_is_a_tool_error(executor, ctx):
    outcome = run(executor, ctx, lambda args, ctx: Result(value=1e20))
    assert (outcome.ok, outcome.error_code) == (False, "tool_error")
    assert "2**53" in outcome.error_message


# -- limits ------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_wall_time_limit(executor, ctx):
    started = time.monotonic()
    outcome = run(executor, ctx, sleep_long, timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert (outcome.ok, outcome.error_code) == (False, "timeout")
    assert "wall time" in outcome.error_message
    assert 0.4 < elapsed < 2.0


@pytest.mark.timeout(20)
def test_cpu_time_limit(executor, ctx):
    started = time.monotonic()
    outcome = run(executor, ctx, spin, cpu_s=1, timeout_s=10)
    elapsed = time.monotonic() - started
    assert (outcome.ok, outcome.error_code) == (False, "timeout")
    assert "CPU" in outcome.error_message  # RLIMIT_CPU fired, not the 10 s wall clock
    assert elapsed < 8.0


@pytest.mark.timeout(20)
def test_memory_limit(executor, ctx):
    before = resource.getrlimit(resource.RLIMIT_AS)
    outcome = run(executor, ctx, allocate_2gb, memory_mb=256)
    assert not outcome.ok
    assert outcome.error_code == "tool_error"
    assert "memory" in outcome.error_message
    # The worker (this process) is untouched and can still allocate.
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(300 * 1024**2)) == 300 * 1024**2


def test_memory_limit_leaves_room_for_ordinary_work(executor, ctx):
    assert run(executor, ctx, echo, memory_mb=256).ok


def test_output_cap(executor, ctx):
    outcome = run(executor, ctx, big_output, output_bytes=100_000)
    assert (outcome.ok, outcome.error_code) == (False, "too_large")
    assert outcome.result is None


def test_output_cap_holds_against_a_tool_writing_the_pipe_itself(executor, ctx, pipes):
    def flood(args: Args, ctx: ToolContext) -> Result:
        write_to_pipe_and_exit(pipes, b"[" * 10_000_000)
        return Result()

    outcome = run(executor, ctx, flood, output_bytes=100_000)
    assert (outcome.ok, outcome.error_code) == (False, "too_large")


def test_output_just_under_the_cap_passes(executor, ctx):
    limit = len(b'{"ok":true,"result":{"value":""}}') + 1000
    outcome = run(executor, ctx, lambda args, ctx: Result(value="y" * 1000), output_bytes=limit)
    assert outcome.ok
    assert outcome.result == {"value": "y" * 1000}


def test_file_size_limit(executor, ctx):
    outcome = run(executor, ctx, write_10mb, file_bytes=1_000_000)
    assert not outcome.ok
    assert outcome.error_code == "tool_error"
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the child.
    assert "File too large" in outcome.error_message or "signal" in outcome.error_message, outcome


def test_writes_under_the_file_limit_succeed(executor, ctx):
    outcome = run(executor, ctx, write_10mb, file_bytes=20_000_000)
    assert outcome == Outcome(True, {"value": 10_000_000})


def test_child_gets_a_clean_environment_and_its_limits(executor, ctx, monkeypatch, scratch_root):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("TOOLPLANE_DATABASE_URL", "postgresql://user:pw@db/ledger")
    limits = Limits(
        memory_mb=300, cpu_s=7, file_bytes=123_456, open_files=32, timeout_s=10, output_bytes=10**5
    )
    outcome = ForkExecutor(scratch_root=scratch_root).run(
        ToolSpec(
            name="probe",
            version="1",
            description="d",
            args_model=Args,
            result_model=Result,
            func=environment,
            limits=limits,
        ),
        Args(),
        ctx,
    )
    assert outcome.ok, outcome
    seen = outcome.result["value"]
    assert set(seen["env"]) == {"PATH", "HOME"}
    assert "SECRET_TOKEN" not in seen["env"]
    assert "hunter2" not in str(seen)
    scratch = Path(seen["scratch"])
    assert scratch.parent == scratch_root
    assert seen["env"]["HOME"] == seen["cwd"] == str(scratch)
    assert not scratch.exists()  # removed after the call
    assert seen["state"] == "s"
    assert seen["pgid_is_pid"] is True
    assert seen["limits"] == {
        "as": 300 * 1024 * 1024,
        "cpu": 7,
        "fsize": 123_456,
        "nofile": 32,
        "core": 0,
    }
    # The parent keeps its own environment and working directory.
    assert os.environ["SECRET_TOKEN"] == "hunter2"
    assert os.getcwd() != seen["cwd"]


# -- process groups ----------------------------------------------------------------


def assert_reaped(grandchild: int) -> None:
    """The grandchild is gone (or a zombie); killed here either way, so none leaks."""
    try:
        assert gone_or_zombie(grandchild), f"grandchild {grandchild} still runs"
    finally:
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(20)
@pytest.mark.parametrize("tool", [fork_sleeper, spawn_sleeper])
def test_grandchildren_are_killed_with_the_group(executor, ctx, tool):
    outcome = run(executor, ctx, tool, timeout_s=5)
    assert outcome.ok, outcome
    grandchild = outcome.result["value"]
    assert isinstance(grandchild, int) and grandchild > 1
    assert_reaped(grandchild)


@pytest.mark.timeout(20)
def test_a_grandchild_holding_the_pipe_costs_the_wall_time_then_dies(executor, ctx, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    outcome = run(
        executor, ctx, fork_sleeper_keeping_the_pipe, Args(text=str(pid_file)), timeout_s=1
    )
    assert time.monotonic() - started < 3
    assert (outcome.ok, outcome.error_code) == (False, "timeout")
    grandchild = int(pid_file.read_text())
    assert_reaped(grandchild)


# -- no leaks ----------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
def test_twenty_calls_after_failures_leak_nothing(executor, ctx, scratch_root):
    tools = [
        (crash, {}),
        (fail_politely, {}),
        (sleep_long, {"timeout_s": 0.2}),
        (big_output, {"output_bytes": 1000}),
        (lambda args, ctx: os._exit(3), {}),
    ]
    for func, limits in tools:  # warm up, so lazily opened files do not count
        run(executor, ctx, func, **limits)
    before = open_fds()
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    for i in range(20):
        func, limits = tools[i % len(tools)]
        assert not run(executor, ctx, func, **limits).ok
        assert run(executor, ctx, echo, Args(n=i)).result == {
            "value": {"n": 2 * i, "text": "", "list": [1, "x", None, True, 0.5]}
        }
    assert open_fds() == before
    assert list(scratch_root.iterdir()) == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children


# -- defects found and fixed: kept as regression tests --


def test_a_non_object_outcome_is_a_tool_error(executor, ctx, pipes):
    outcome = run(executor, ctx, lambda args, ctx: write_to_pipe_and_exit(pipes, b"[1]"))
    assert (outcome.ok, outcome.error_code) == (False, "tool_error")
