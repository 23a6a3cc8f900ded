"""Where the host cannot make namespaces, a worker refuses to start, unless the
operator accepts weaker containment, which every receipt then records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox_tasks import confine
from sandbox_tasks import main as worker_main
from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
from sandbox_tasks.errors import ToolFailure
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
    layers = confine.available()
    assert executor.layers == tuple(n for n in layers if n != "rlimits")
    assert executor.containment == confine.containment("runner", layers) + " (no namespaces)"
    assert executor.containment.startswith("runner+") and "rlimits" in executor.containment


@pytest.mark.skipif(
    probe_bwrap(bwrap_path()) is not None, reason="this host cannot make namespaces"
)
def test_bwrap_where_the_host_allows_it(tmp_path: Path) -> None:
    executor = worker_main.make_executor(settings(tmp_path), TOOL, tmp_path)
    assert isinstance(executor, BwrapExecutor)
    assert executor.containment == confine.containment("bwrap", confine.available())
    assert executor.argv()[-1] == ",".join(executor.layers)  # the runner applies them
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


# -- the minimum layers (TOOLPLANE_SANDBOX_MIN_LAYERS) -------------------------------------


def test_a_worker_refuses_to_start_below_its_minimum_layers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sandbox_tasks.confine import layers

    monkeypatch.setattr(worker_main, "probe_bwrap", lambda binary: "no bwrap binary")
    monkeypatch.setattr(layers.landlock, "abi", lambda: 0)  # a kernel without Landlock
    loose = settings(tmp_path, allow_weak_containment=True)
    # auto: without namespaces Landlock is required
    with pytest.raises(SettingsError, match="SANDBOX_MIN_LAYERS: this host cannot apply landlock"):
        worker_main.make_executor(loose, TOOL, tmp_path)
    # ... at ABI 6 or newer: below it, without a PID namespace, a call could signal its worker
    monkeypatch.setattr(layers.landlock, "abi", lambda: 5)
    with pytest.raises(SettingsError, match="cannot apply landlock6 .*it has .*landlock5"):
        worker_main.make_executor(loose, TOOL, tmp_path)
    monkeypatch.setattr(layers.landlock, "abi", lambda: 0)
    # an operator who lowers the minimum gets the rest, and the receipt says which
    lowered = settings(tmp_path, allow_weak_containment=True, sandbox_min_layers="seccomp")
    executor = worker_main.make_executor(lowered, TOOL, tmp_path)
    assert "landlock" not in executor.containment
    assert executor.containment == "runner+seccomp+nnp+rlimits (no namespaces)"


def test_an_abi_floor_is_enforced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sandbox_tasks.confine import layers

    monkeypatch.setattr(worker_main, "probe_bwrap", lambda binary: "no bwrap binary")
    monkeypatch.setattr(layers.landlock, "abi", lambda: 5)
    strict = settings(tmp_path, allow_weak_containment=True, sandbox_min_layers="landlock6")
    with pytest.raises(SettingsError, match="cannot apply landlock6 .*it has .*landlock5"):
        worker_main.make_executor(strict, TOOL, tmp_path)


def test_keys_inside_a_readable_tree_are_refused(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setattr(worker_main, "probe_bwrap", lambda binary: "no bwrap binary")
    home = Path(sys.prefix)  # the Python installation: every call may read it
    loose = Settings(home=home, allow_weak_containment=True)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="HOME: .*keys would be readable by the tools"):
        worker_main.make_executor(loose, TOOL, tmp_path)


@pytest.mark.parametrize("value", ["landlock9", "selinux", "seccomp,,bogus", ","])
def test_a_bad_minimum_names_the_setting(tmp_path: Path, value: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="sandbox_min_layers"):
        settings(tmp_path, sandbox_min_layers=value)


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
    assert json.loads(argv[-4]) == {"ledgers": str((tmp_path / "ledgers").resolve())}
    context = worker_main.tool_context(configured, spec, tmp_path)
    assert context.root("ledgers") == (tmp_path / "ledgers").resolve()
    assert context.repo_root is None and context.roots.keys() == {"ledgers"}
    with pytest.raises(ToolFailure, match="'repo' is not given to this tool"):
        context.root("repo")
