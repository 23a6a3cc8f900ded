"""The executor with every kernel layer this host has: the shipped tools still work, the
fetch channel still works, nothing the worker had open reaches the tool, and a layer
that cannot be applied fails the call before the tool runs."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from sandbox_tasks.confine import available
from sandbox_tasks.executor import ForkExecutor
from sandbox_tasks.registry import ToolContext, ToolSpec, load_tools
from tests.harness import REPO

LAYERS = tuple(n for n in available() if n != "rlimits")
pytestmark = pytest.mark.skipif(
    not {"seccomp", "no_new_privs"} <= set(LAYERS) or not any("landlock" in n for n in LAYERS),
    reason=f"this host has only {available()}",
)
STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class Args(BaseModel):
    model_config = STRICT
    path: str = ""


class Result(BaseModel):
    model_config = STRICT
    value: Any = None


def spec(func: Any) -> ToolSpec:
    return ToolSpec(
        name="probe",
        version="1",
        description="a tool defined by the test",
        args_model=Args,
        result_model=Result,
        func=func,
    )


@pytest.fixture
def executor(tmp_path: Path) -> ForkExecutor:
    (tmp_path / "scratch").mkdir()
    return ForkExecutor(scratch_root=tmp_path / "scratch", layers=LAYERS)


@pytest.fixture
def ctx() -> ToolContext:
    return ToolContext(
        repo_root=REPO / "examples" / "repo",
        docs_root=REPO / "examples" / "docs",
        scratch_dir=REPO / "examples",
    )


def test_the_receipt_names_the_layers(executor: ForkExecutor) -> None:
    landlock = next(n for n in LAYERS if n.startswith("landlock"))
    assert executor.containment == f"fork+{landlock}+seccomp+nnp+rlimits"


def test_the_shipped_tools_run_under_every_layer(executor: ForkExecutor, ctx: ToolContext) -> None:
    tools = load_tools()
    read = tools["read_repo_file"]
    outcome = executor.run(read, read.args_model(path="README.md"), ctx)
    assert outcome.ok, outcome
    assert outcome.result is not None and outcome.result["size"] > 0
    search = tools["search_docs"]
    outcome = executor.run(search, search.args_model(query="ledger receipts"), ctx)
    assert outcome.ok and outcome.result is not None and outcome.result["hits"], outcome
    lint = tools["lint_python"]  # runs ruff, a program of its own, under the same layers
    outcome = executor.run(lint, lint.args_model(code="eval(x)\n"), ctx)
    assert outcome.ok, outcome
    assert outcome.result is not None
    assert sorted(f["code"] for f in outcome.result["findings"]) == ["F821", "S307"]


def test_a_tool_reads_only_its_own_data_root(executor: ForkExecutor, ctx: ToolContext) -> None:
    def read(args: Args, ctx: ToolContext) -> Result:
        try:
            return Result(value=len(Path(args.path).read_bytes()))
        except OSError as e:
            return Result(value=e.strerror)

    inside = executor.run(spec(read), Args(path=str(ctx.repo_root / "README.md")), ctx)
    assert isinstance(inside.result, dict) and inside.result["value"] == "Permission denied"
    own = dataclasses.replace(spec(read), data_root="repo")
    outcome = executor.run(own, Args(path=str(ctx.repo_root / "README.md")), ctx)
    assert outcome.result is not None and isinstance(outcome.result["value"], int), outcome
    for path in (str(REPO / "pyproject.toml"), "/etc/shadow", f"/proc/{os.getpid()}/environ"):
        outcome = executor.run(own, Args(path=path), ctx)
        assert outcome.result == {"value": "Permission denied"}, (path, outcome)


def test_the_fetch_channel_still_works(executor: ForkExecutor, ctx: ToolContext) -> None:
    def fetch(args: Args, ctx: ToolContext) -> Result:
        response = ctx.fetch("http://example.test/x")
        return Result(value=[response.status, response.body.decode()])

    answers = []

    def fetcher(request: dict[str, Any]) -> dict[str, Any]:
        answers.append(request["url"])
        return {"ok": True, "status": 200, "body": "aGk="}  # "hi"

    outcome = executor.run(spec(fetch), Args(), ctx, fetcher=fetcher)
    assert outcome.result == {"value": [200, "hi"]}, outcome
    assert answers == ["http://example.test/x"]


def test_nothing_the_worker_had_open_reaches_the_tool(
    executor: ForkExecutor, ctx: ToolContext
) -> None:
    held = socket.socket()  # stands for the worker's broker connection
    log = open(os.devnull, "w")  # noqa: SIM115 - stands for its log file
    try:

        def look(args: Args, ctx: ToolContext) -> Result:
            fds = []
            for fd in (held.fileno(), log.fileno()):
                try:
                    os.fstat(fd)
                    fds.append(fd)
                except OSError:
                    pass
            return Result(value=fds)

        assert executor.run(spec(look), Args(), ctx).result == {"value": []}
    finally:
        held.close()
        log.close()


def test_a_layer_that_cannot_be_applied_fails_the_call_unrun(
    tmp_path: Path, ctx: ToolContext
) -> None:
    marker = tmp_path / "ran"

    def mark(args: Args, ctx: ToolContext) -> Result:
        marker.write_text("the tool ran")
        return Result()

    (tmp_path / "scratch").mkdir()
    broken = ForkExecutor(scratch_root=tmp_path / "scratch", layers=("landlock9",))
    outcome = broken.run(spec(mark), Args(), ctx)
    assert (outcome.ok, outcome.error_code) == (False, "tool_error")
    assert outcome.error_message is not None
    assert outcome.error_message.startswith("confinement failed: landlock9: ")
    assert not marker.exists()


def _read_file(args: Args, ctx: ToolContext) -> Result:
    try:
        return Result(value=Path(args.path).read_text())
    except OSError as e:
        return Result(value=f"refused: {e.errno}")


def test_the_readable_trees_follow_each_calls_data_roots(
    executor: ForkExecutor, tmp_path: Path
) -> None:
    """The executor keeps the trees a call may read from one call to the next (they are
    the same for every call of a tool); a call given other data roots gets its own, never
    the roots of an earlier call."""
    roots = {}
    for name in ("a", "b"):
        roots[name] = tmp_path / f"root-{name}"
        roots[name].mkdir()
        (roots[name] / "secret.txt").write_text(f"only {name}")
    tool = dataclasses.replace(spec(_read_file), data_roots=("repo",))

    def call(root: str, path: Path) -> Any:
        ctx = ToolContext(scratch_dir=tmp_path, repo_root=roots[root], roots={"repo": roots[root]})
        outcome = executor.run(tool, Args(path=str(path)), ctx)
        assert outcome.ok, outcome
        return outcome.result and outcome.result["value"]

    for _ in range(2):  # the second time from the kept trees
        assert call("a", roots["a"] / "secret.txt") == "only a"
        assert call("b", roots["b"] / "secret.txt") == "only b"
        assert str(call("b", roots["a"] / "secret.txt")).startswith("refused")
        assert str(call("a", roots["b"] / "secret.txt")).startswith("refused")
