"""Paths through symlinks: refused by default (read_repo_file, search_docs), resolved
inside the root for a tool that follows them (``open_beneath(..., follow_symlinks=True)``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.registry import ToolContext
from sandbox_tasks.tools import read_repo_file
from tests.unit.test_tools import APP, call, follow_refusal, make_ctx, opened_path, read_refusal


@pytest.fixture
def repo(tmp_path: Path) -> ToolContext:
    ctx = make_ctx(tmp_path)
    (ctx.root("repo") / "src").mkdir()
    (ctx.root("repo") / "src" / "app.py").write_text(APP)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("top secret\n")
    return ctx


def test_symlinks_leaving_the_root_are_refused(repo: ToolContext, tmp_path: Path) -> None:
    root = repo.repo_root
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "zero").symlink_to("/dev/zero")
    (root / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "rel").symlink_to("../outside/secret.txt")
    (root / "src" / "up").symlink_to("..", target_is_directory=True)
    (root / "hop1").symlink_to("src/up/src/up/../outside/secret.txt")
    for path in (
        "passwd",
        "zero",
        "out/secret.txt",
        "rel",
        "src/up/../up/up/repo/src/app.py",
        "hop1",
        "src/up/out/secret.txt",
    ):
        read_refusal(repo, path, "symlink_refused")  # read_repo_file follows none
        follow_refusal(root, path, "path_outside_root")  # a tool that follows: not outside


def test_symlinks_staying_inside_are_refused_unless_the_tool_follows_them(
    repo: ToolContext,
) -> None:
    root = repo.repo_root
    (root / ".env").write_text("SECRET=1\n")
    (root / "src" / "settings.txt").symlink_to("../.env")
    (root / "alias.py").symlink_to("src/app.py")
    (root / "lib").symlink_to("src", target_is_directory=True)
    (root / "src" / "self").symlink_to("../src/app.py")
    (root / "absolute.py").symlink_to(root / "src" / "app.py")
    (root / "src" / "up").symlink_to("..", target_is_directory=True)
    failure = read_refusal(repo, "src/settings.txt", "symlink_refused")
    assert failure.field == "path" and "'src/settings.txt' is a symlink" in failure.message
    assert "'lib' is a symlink" in read_refusal(repo, "lib/app.py", "symlink_refused").message
    for path in ("alias.py", "lib/app.py", "src/self", "absolute.py", "src/up/src/up/lib/app.py"):
        read_refusal(repo, path, "symlink_refused")
        assert opened_path(root, path) == "src/app.py", path
    assert opened_path(root, "src/settings.txt") == ".env"  # the path to judge, reported
    assert call(read_repo_file.TOOL, repo, path="src/app.py").content == APP


def test_symlink_loops_end(repo: ToolContext) -> None:
    (repo.repo_root / "a").symlink_to("b")
    (repo.repo_root / "b").symlink_to("a")
    (repo.repo_root / "me").symlink_to("me/x")
    read_refusal(repo, "a", "symlink_refused")
    follow_refusal(repo.repo_root, "a", "invalid_argument")
    follow_refusal(repo.repo_root, "me", "invalid_argument")


@pytest.mark.timeout(30)
def test_a_symlink_swapped_in_during_resolution_is_never_followed(repo: ToolContext) -> None:
    root = repo.repo_root
    (root / "d").mkdir()
    (root / "d" / "secret.txt").write_text("harmless\n")
    outside = root.parent / "outside"
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(root / "d", root / "real")
            os.symlink(outside, root / "d")
            os.unlink(root / "d")
            os.rename(root / "real", root / "d")

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(2000):
            try:
                content = call(read_repo_file.TOOL, repo, path="d/secret.txt").content
            except ToolFailure as e:
                assert e.code in ("symlink_refused", "not_found"), e.message
            else:
                assert content == "harmless\n"
    finally:
        stop.set()
        swapper.join()
