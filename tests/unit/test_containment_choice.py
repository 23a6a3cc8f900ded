"""Where the host cannot make namespaces, a worker refuses to start, unless the
operator accepts weaker containment, which every receipt then records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox_tasks import main as worker_main
from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.executor import ForkExecutor
from sandbox_tasks.tools.read_repo_file import TOOL
from toolplane.errors import SettingsError
from toolplane.settings import Settings


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(home=tmp_path / "home", **kw)  # type: ignore[arg-type]


def test_no_namespaces_means_no_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(worker_main, "probe_bwrap", lambda binary: "user namespaces are disabled")
    with pytest.raises(SettingsError, match="ALLOW_WEAK_CONTAINMENT.*user namespaces are disabled"):
        worker_main.make_executor(settings(tmp_path), TOOL, tmp_path)


def test_weak_containment_only_when_asked_and_it_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(worker_main, "probe_bwrap", lambda binary: "no bwrap binary")
    executor = worker_main.make_executor(
        settings(tmp_path, allow_weak_containment=True), TOOL, tmp_path
    )
    assert isinstance(executor, ForkExecutor)
    assert executor.containment == "fork-rlimits (weak: no namespaces)"


@pytest.mark.skipif(
    probe_bwrap(bwrap_path()) is not None, reason="this host cannot make namespaces"
)
def test_bwrap_where_the_host_allows_it(tmp_path: Path) -> None:
    executor = worker_main.make_executor(settings(tmp_path), TOOL, tmp_path)
    assert isinstance(executor, BwrapExecutor) and executor.containment == "bwrap"
    assert not any((tmp_path / "home").resolve().is_relative_to(m) for m in executor.mounts)


def test_a_home_inside_a_mount_is_refused(tmp_path: Path) -> None:
    import sandbox_tasks

    inside = Path(sandbox_tasks.__file__).parent / "keys"
    with pytest.raises(ValueError, match="would be visible in the sandbox"):
        BwrapExecutor(
            binary="/bin/true",
            spec=TOOL,
            roots={"repo": tmp_path},
            extra_modules=[],
            forbidden=[inside],
        )


def test_the_sandbox_mounts_exactly_the_tools_own_roots(tmp_path: Path) -> None:
    from dataclasses import replace

    for name in ("repo", "docs", "ledgers"):
        (tmp_path / name).mkdir()
    configured = Settings(
        home=tmp_path / "home",
        repo_root=tmp_path / "repo",
        docs_root=tmp_path / "docs",
        data_roots={"ledgers": tmp_path / "ledgers"},
    )
    spec = replace(TOOL, data_roots=("ledgers",), data_root=None)
    executor = BwrapExecutor(
        binary="/bin/true",
        spec=spec,
        roots=configured.roots_for(spec.data_roots),
        extra_modules=[],
        forbidden=[],
    )
    argv = executor.argv()
    binds = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--ro-bind"]
    assert str((tmp_path / "ledgers").resolve()) in binds
    assert not any(b.startswith(str(tmp_path.resolve() / "repo")) for b in binds)
    assert not any(b.startswith(str(tmp_path.resolve() / "docs")) for b in binds)
    assert json.loads(argv[-2]) == {"ledgers": str((tmp_path / "ledgers").resolve())}
    context = worker_main.tool_context(configured, spec, tmp_path)
    assert context.root("ledgers") == (tmp_path / "ledgers").resolve()
    assert context.repo_root is None and context.roots.keys() == {"ledgers"}
    with pytest.raises(ToolFailure, match="'repo' is not given to this tool"):
        context.root("repo")
