"""Where the host cannot make namespaces, a worker refuses to start, unless the
operator accepts weaker containment, which every receipt then records."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_tasks import main as worker_main
from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
from sandbox_tasks.plain import PlainExecutor
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
    # the same runner, a fresh process of its own (never a fork of the worker), no namespaces
    assert isinstance(executor, PlainExecutor)
    assert executor.containment == "runner (no namespaces)"


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
            repo_root=tmp_path,
            docs_root=tmp_path,
            extra_modules=[],
            forbidden=[inside],
        )
