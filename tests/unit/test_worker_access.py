"""A worker that cannot read what it needs refuses to start and names the setting; on a
cgroup v1 host a worker user makes its sandboxes' cgroups in the directory delegated to it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_tasks import cgroups
from sandbox_tasks.main import check_access
from sandbox_tasks.registry import load_tools
from toolplane.errors import SettingsError
from toolplane.settings import Settings

TOOLS = load_tools()


def settings(home: Path, repo: Path, docs: Path) -> Settings:
    return Settings(home=home, repo_root=repo, docs_root=docs)


def test_a_missing_data_root_is_named(tmp_path: Path) -> None:
    config = settings(tmp_path, tmp_path / "no-repo", tmp_path)
    with pytest.raises(SettingsError, match=r"^TOOLPLANE_REPO_ROOT: .*no-repo.*no such directory"):
        check_access(config, TOOLS["read_repo_file"])
    check_access(config, TOOLS["lint_python"])  # no data root: nothing to read


def test_a_plugins_own_root_must_be_mapped_and_readable(tmp_path: Path) -> None:
    from dataclasses import replace

    spec = replace(TOOLS["lint_python"], data_roots=("ledgers",))
    config = settings(tmp_path, tmp_path, tmp_path)
    with pytest.raises(SettingsError, match=r"^TOOLPLANE_DATA_ROOTS: .*'ledgers'.*no directory"):
        check_access(config, spec)
    missing = Settings(home=tmp_path, data_roots={"ledgers": tmp_path / "gone"})
    with pytest.raises(SettingsError, match=r"^TOOLPLANE_DATA_ROOTS: .*gone.*no such directory"):
        check_access(missing, spec)
    check_access(Settings(home=tmp_path, data_roots={"ledgers": tmp_path}), spec)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[1]", "JSON object"),
        ('{"Bad-Name": "/x"}', "must match"),
        ('{"repo": "/x"}', "TOOLPLANE_REPO_ROOT"),
    ],
)
def test_data_roots_setting_is_checked(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("TOOLPLANE_DATA_ROOTS", value)
    with pytest.raises(ValueError, match=problem):
        Settings()


def as_user(uid: int, fn: object) -> str:
    """Run ``fn()`` in a child as ``uid``; what it raised (its message), or "ok"."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()  # type: ignore[operator]
            message = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the parent
            message = str(e)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as handle:
        message = handle.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory others may cross (pytest's own are 0700, and reset so by every session)."""
    path = Path(tempfile.mkdtemp(prefix="tp-access-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_data_root_behind_a_closed_directory_is_refused_naming_that_directory(
    open_tmp: Path,
) -> None:
    tmp_path = open_tmp
    home, repo = tmp_path / "home", tmp_path / "closed" / "repo"
    home.mkdir()
    repo.mkdir(parents=True)
    (tmp_path / "closed").chmod(0o700)
    config = settings(home, repo, repo)
    said = as_user(65534, lambda: check_access(config, TOOLS["read_repo_file"]))
    assert said.startswith("TOOLPLANE_REPO_ROOT: ") and f"{tmp_path / 'closed'} may not" in said
    assert "uid 65534" in said and "mode 0700" in said
    (tmp_path / "closed").chmod(0o755)
    assert as_user(65534, lambda: check_access(config, TOOLS["read_repo_file"])) == "ok"


def test_a_worker_user_uses_only_the_cgroup_delegated_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = tmp_path / "pids"
    v1.mkdir()
    (v1 / "cgroup.procs").write_text("")
    monkeypatch.setattr(cgroups, "V1_ROOT", v1)
    monkeypatch.setattr(cgroups, "V2_ROOT", tmp_path / "no-v2")
    monkeypatch.setattr(cgroups.os, "geteuid", lambda: 4242)
    assert cgroups.delegated_dir(4242) == v1 / "toolplane" / "uid-4242"
    assert "uid-4242 is missing" in str(cgroups.problem())
    assert cgroups.create_pids_cgroup("sbx", 8) is None  # never the shared toolplane/ parent
    own = cgroups.delegated_dir(4242)
    own.mkdir(parents=True)
    (own / "cgroup.procs").write_text("")
    assert cgroups.problem() is None
    made = cgroups.create_pids_cgroup("sbx", 8)
    assert made is not None and made.path == own / "sbx"
    assert (own / "sbx" / "pids.max").read_text() == "8"


def test_a_worker_user_on_cgroup_v2_is_told_why_it_has_no_pids_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "V1_ROOT", tmp_path / "no-v1")
    monkeypatch.setattr(cgroups.os, "geteuid", lambda: 4242)
    assert "cgroup v2" in str(cgroups.problem())
