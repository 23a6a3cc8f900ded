"""The translation of docker/compose.yaml into podman commands (tests/containers) drops nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.containers.compose_podman import Compose, ComposeError, load

ROOT = Path(__file__).resolve().parents[2]
KEY_FILES = {
    "CONTROL_KEY_FILE": "control_x.key",
    "SEARCH_DOCS_KEY_FILE": "tool.search_docs_x.key",
    "READ_REPO_FILE_KEY_FILE": "tool.read_repo_file_x.key",
    "LINT_PYTHON_KEY_FILE": "tool.lint_python_x.key",
}


@pytest.fixture
def compose(tmp_path: Path) -> Compose:
    docker = tmp_path / "docker"
    docker.mkdir()
    for part in ("compose.yaml", "seccomp", "postgres"):
        src = ROOT / "docker" / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, docker / part)
    env = {
        **KEY_FILES,
        "TOOLPLANE_DOCS_DIR": str(ROOT / "examples/docs"),
        "TOOLPLANE_REPO_DIR": str(ROOT / "examples/repo"),
    }
    loaded = load(docker / "compose.yaml", project="t", env=env)
    for spec in loaded.data["secrets"].values():  # every secret file, empty
        path = (docker / spec["file"]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return loaded


def flags(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_every_service_translates(compose: Compose) -> None:
    for name in compose.services:
        args = compose.run_args(name)
        assert args[:2] == ["run", "-d"]
        assert f"{compose.container(name)}" in args


def test_a_worker_gets_every_hardening_setting(compose: Compose) -> None:
    args = compose.run_args("worker-lint_python")
    assert "--read-only=true" in args and "--read-only-tmpfs=false" in args
    assert flags(args, "--cap-drop") == ["ALL"]
    opts = flags(args, "--security-opt")
    assert "no-new-privileges" in opts
    assert [o for o in opts if o.startswith("seccomp=")] == [
        f"seccomp={compose.directory / 'seccomp/sandbox.json'}"
    ]
    assert flags(args, "--ipc") == ["private"]
    assert flags(args, "--pids-limit") == ["128"]
    assert flags(args, "--memory") == flags(args, "--memory-swap") == ["1536m"]
    assert flags(args, "--cpus") == ["1.0"]
    assert flags(args, "--ulimit") == ["core=0", "nofile=20000:20000", "nproc=32768:32768"]
    assert flags(args, "--user") == ["10103:10001"]
    assert flags(args, "--network") == ["t-sandbox"]
    scratch = [t for t in flags(args, "--tmpfs") if t.startswith("/var/lib/toolplane/scratch")]
    assert scratch == ["/var/lib/toolplane/scratch:size=256m,mode=0700,noexec,nosuid,nodev,U"]
    assert args[-4:] == ["toolplane-worker:0.1.0", "lint_python", "--concurrency", "2"]


def test_networks_keep_internal(compose: Compose) -> None:
    made = {a[-1]: "--internal" in a for a in compose.network_args()}
    assert made == {
        "t-sandbox": True,
        "t-backplane": True,
        "t-db": True,
        "t-operator": False,
        "t-toolplane-api": False,
    }


def test_a_key_it_does_not_know_fails(compose: Compose) -> None:
    compose.data["services"]["redis"]["privileged"] = True
    with pytest.raises(
        ComposeError, match=r"services.redis: keys not translated: \['privileged'\]"
    ):
        compose.run_args("redis")


def test_a_tmpfs_owned_by_another_user_fails(compose: Compose) -> None:
    compose.data["services"]["worker-lint_python"]["user"] = "10999:10001"
    with pytest.raises(ComposeError, match="owner is not the user"):
        compose.run_args("worker-lint_python")


def test_a_security_option_it_does_not_know_fails(compose: Compose) -> None:
    compose.data["services"]["control"]["security_opt"].append("apparmor=unconfined")
    with pytest.raises(ComposeError, match="apparmor=unconfined"):
        compose.run_args("control")
