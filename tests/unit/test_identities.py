"""What a worker is given: an environment from an allowlist, its own key subset and directory.

The attacker here is a worker (or a tool that got into it), and an operator's shell full of
secrets: nothing but the allowlist may reach the worker, nothing but its own key, and a link
it plants in its directory must not lead the next refresh (run as root) anywhere else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from control.ops.identities import (
    WorkerIdentity,
    _prepare,
    open_runtime,
    refresh_worker_keys,
    secure_home,
    worker_user_name,
)
from control.ops.processes import plan_processes, worker_env
from control.ops.runtime import ControlPlane
from toolplane.errors import SettingsError
from toolplane.keystore import KeyStore, export_keys
from toolplane.settings import Settings

SHELL = {  # an operator's shell: what `toolplane up` is started from
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONPATH": "/srv/plugins",
    "HOME": "/root",
    "DATABASE_URL": "postgresql://app:secret-db@db/app",
    "PGPASSWORD": "secret-pg",
    "AWS_SECRET_ACCESS_KEY": "secret-aws",
    "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock",
    "CELERY_BROKER_URL": "redis://:secret-celery@x/0",
    "TOOLPLANE_DATABASE_URL": "postgresql://control:secret-control-db@db/toolplane",
    "TOOLPLANE_BROKER_URL": "redis://toolplane-control:secret-broker@127.0.0.1:6379/0",
    "TOOLPLANE_REDIS_URL": "redis://toolplane-control:secret-broker@127.0.0.1:6379/0",
    "TOOLPLANE_TOKEN": "secret-token",
    "TOOLPLANE_FLOWER_PASSWORD": "secret-flower",
    "MY_PLUGIN_REGION": "eu-west-1",
}


RUNTIME = "postgresql://tp_runtime:runtime-secret@db/tp"  # the control's database role


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(home=tmp_path / "home", repo_root=tmp_path, docs_root=tmp_path, **kw)  # type: ignore[arg-type]


def test_a_worker_gets_only_the_allowlist_and_its_own_settings(tmp_path: Path) -> None:
    home = tmp_path / "home" / "workers" / "lint_python"
    env = worker_env(
        settings(tmp_path, worker_env="MY_PLUGIN_REGION"),
        tool="lint_python",
        home=home,
        broker_url="redis://toolplane-tool-lint_python:own@127.0.0.1:6379/0",
        source=SHELL,
    )
    assert set(env) == {
        "PATH",
        "LANG",
        "LC_ALL",
        "PYTHONPATH",
        "MY_PLUGIN_REGION",
        "HOME",
        "TOOLPLANE_HOME",
        "TOOLPLANE_BROKER_URL",
        "TOOLPLANE_REPO_ROOT",
        "TOOLPLANE_DOCS_ROOT",
        "TOOLPLANE_DATA_ROOTS",
        "TOOLPLANE_EXTRA_TOOLS",
        "TOOLPLANE_RECEIPT_ALGORITHM",
        "TOOLPLANE_VISIBILITY_TIMEOUT",
        "TOOLPLANE_QUEUE_WAIT_S",
        "TOOLPLANE_SANDBOX_WARM_RUNNERS",
        "TOOLPLANE_LOG_FORMAT",  # the operator's choice, inherited
    }
    assert env["HOME"] == env["TOOLPLANE_HOME"] == str(home)
    assert env["TOOLPLANE_LOG_FORMAT"] == "text"
    json_env = worker_env(
        settings(tmp_path, log_format="json"),
        tool="lint_python",
        home=home,
        broker_url="redis://x@127.0.0.1:6379/0",
        source=SHELL,
    )
    assert json_env["TOOLPLANE_LOG_FORMAT"] == "json"
    assert not any("secret" in value for value in env.values()), env


@pytest.mark.parametrize(
    "name",
    [
        "TOOLPLANE_DATABASE_URL",
        "TOOLPLANE_TOKEN",
        "CELERY_BROKER_URL",
        "AWS_SECRET_ACCESS_KEY",  # the control's S3 credentials (ledger/s3store.py)
        "A-B",
        "1X",
        "X Y",
    ],
)
def test_worker_env_cannot_name_a_setting_of_ours_or_a_broker_override(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(SettingsError, match=r"^TOOLPLANE_WORKER_ENV: .*a variable name"):
        worker_env(
            settings(tmp_path, worker_env=f"PATH,{name}"),
            tool="t",
            home=tmp_path,
            broker_url="redis://x/0",
            source=SHELL,
        )


def plane(tmp_path: Path, broker_url: str) -> ControlPlane:
    return ControlPlane(
        settings(tmp_path), broker_url=broker_url, database_url="postgresql://c:db-secret@db/tp"
    )


def identities(tmp_path: Path, *tools: str) -> dict[str, WorkerIdentity]:
    return {t: WorkerIdentity(tool=t, home=tmp_path / "home" / "workers" / t) for t in tools}


def test_plan_gives_the_database_to_the_control_and_a_worker_only_its_own_broker_user(
    tmp_path: Path,
) -> None:
    specs = plan_processes(
        plane(tmp_path, "redis://toolplane-control:broker-secret@127.0.0.1:6379/0"),
        workers={"lint_python": 2},
        flower=False,
        runtime_database_url=RUNTIME,
        base_env=SHELL,
        broker_urls={"worker-lint_python": "redis://toolplane-tool-lint_python:own@h:6379/0"},
        identities=identities(tmp_path, "lint_python"),
    )
    control, api, worker = specs
    assert api.argv[-1] == "api" and control.argv[-2:] == ["control", "--no-api"]
    assert control.env["TOOLPLANE_DATABASE_URL"] == api.env["TOOLPLANE_DATABASE_URL"] == RUNTIME
    assert worker.argv[-3:] == ["lint_python", "--concurrency", "2"]
    assert worker.env["TOOLPLANE_BROKER_URL"].startswith("redis://toolplane-tool-lint_python:")
    assert not any("secret" in v for v in worker.env.values()), worker.env
    assert worker.uid is None and worker.gid is None  # not separated: same user


def test_a_workers_broker_url_with_the_controls_password_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^TOOLPLANE_BROKER_URL: carries a password"):
        plan_processes(
            plane(tmp_path, "redis://toolplane-control:broker-secret@127.0.0.1:6379/0"),
            workers={"lint_python": 1},
            flower=False,
            runtime_database_url=RUNTIME,
            base_env=SHELL,
            identities=identities(tmp_path, "lint_python"),
        )
    # Without a password (a broker on loopback without ACLs) the workers may share it.
    specs = plan_processes(
        plane(tmp_path, "redis://127.0.0.1:6379/3"),
        workers={"lint_python": 1},
        flower=False,
        runtime_database_url=RUNTIME,
        base_env=SHELL,
        identities=identities(tmp_path, "lint_python"),
    )
    assert specs[-1].env["TOOLPLANE_BROKER_URL"] == "redis://127.0.0.1:6379/3"


def test_broker_acl_dir_gives_each_worker_its_own_file(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.mkdir()
    (acl / "broker_url.lint_python").write_text("redis://toolplane-tool-lint_python:own@r/0")
    config = settings(
        tmp_path, broker_url="redis://toolplane-control:broker-secret@r/0", broker_acl_dir=acl
    )
    control = ControlPlane(config, broker_url=str(config.broker_url), database_url="postgresql://x")
    specs = plan_processes(
        control,
        workers={"lint_python": 1},
        flower=False,
        runtime_database_url=RUNTIME,
        base_env=SHELL,
        identities=identities(tmp_path, "lint_python"),
    )
    assert specs[-1].env["TOOLPLANE_BROKER_URL"] == "redis://toolplane-tool-lint_python:own@r/0"
    with pytest.raises(Exception, match=r"TOOLPLANE_BROKER_ACL_DIR: .*broker_url.search_docs"):
        plan_processes(
            control,
            workers={"search_docs": 1},
            flower=False,
            runtime_database_url=RUNTIME,
            base_env=SHELL,
            identities=identities(tmp_path, "search_docs"),
        )


def test_worker_user_names() -> None:
    assert worker_user_name("toolplane-{tool}", "lint_python") == "toolplane-lint_python"
    assert worker_user_name("tpw", "lint_python") == "tpw"  # one user for every tool
    long = worker_user_name("toolplane-{tool}", "a" * 40)
    assert len(long) == 32 and long.startswith("toolplane-aaaaaaaaaaaaa-")
    assert long != worker_user_name("toolplane-{tool}", "a" * 41)  # still one per tool
    for bad in ("Root-{tool}", "tp {tool}", "-{tool}", "tp/{tool}"):
        with pytest.raises(SettingsError, match=r"^TOOLPLANE_WORKER_USER: .* is not a user name"):
            worker_user_name(bad, "x")


def keystore(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "home" / "keys")
    store.ensure_all(["lint_python", "search_docs"], receipt_algorithm="ed25519")
    return store


def test_a_worker_gets_the_controls_public_keys_and_only_its_own_private_key(
    tmp_path: Path,
) -> None:
    store = keystore(tmp_path)
    old = store.signer("tool.lint_python").key_id
    store.rotate("tool.lint_python", "ed25519")
    new = store.signer("tool.lint_python").key_id
    dest = KeyStore(tmp_path / "worker" / "keys")
    held = export_keys(store, dest, public=["control"], signer="tool.lint_python")
    assert held == [new]
    assert [p.name for p in dest.private_dir.iterdir()] == [dest._private_path(new).name]
    assert (dest.private_dir.stat().st_mode & 0o777) == 0o700
    assert (dest._private_path(new).stat().st_mode & 0o777) == 0o400
    owners = {e["owner"] for e in dest.entries()}
    assert owners == {"control", "tool.lint_python"}  # nothing of search_docs
    assert old in {e["key_id"] for e in dest.entries()}  # still verifiable, no longer signable
    assert dest.signer("tool.lint_python").key_id == new
    with pytest.raises(SettingsError):
        dest.signer("control")  # the control's public key only


def test_a_revoked_or_rotated_key_reaches_the_workers_directory_at_refresh(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    store = keystore(tmp_path)
    config = settings(tmp_path)
    identity = WorkerIdentity(tool="lint_python", home=config.home / "workers" / "lint_python")
    _prepare(identity, store)
    dest = KeyStore(identity.home / "keys")
    first = store.signer("tool.lint_python").key_id
    assert dest.signer("tool.lint_python").key_id == first
    store.rotate("tool.lint_python", "ed25519")
    store.record_revocation(first, revoked_at=datetime.now(UTC), reason="leaked")
    assert refresh_worker_keys(config) == ["lint_python"]
    second = store.signer("tool.lint_python").key_id
    assert dest.signer("tool.lint_python").key_id == second != first
    assert not dest._private_path(first).exists()
    assert dest.entry(first)["revoked_reason"] == "leaked"  # type: ignore[index]


def test_a_link_planted_in_a_workers_directory_leads_the_refresh_nowhere(tmp_path: Path) -> None:
    """A worker that swaps its key directory for a link to the control's must not make the
    next refresh (run as root) overwrite the control's index or delete its keys."""
    store = keystore(tmp_path)
    config = settings(tmp_path)
    home = config.home / "workers" / "lint_python"
    _prepare(WorkerIdentity(tool="lint_python", home=home), store)
    before = store.index_path.read_bytes(), sorted(store.private_dir.iterdir())
    for target in ("keys", "keys/private"):
        victim = home / target
        os.rename(victim, home / f"{target.replace('/', '-')}.moved")
        victim.symlink_to(store.dir if target == "keys" else store.private_dir)
        with pytest.raises(SettingsError, match="not a plain directory"):
            refresh_worker_keys(config)
        assert (store.index_path.read_bytes(), sorted(store.private_dir.iterdir())) == before
        victim.unlink()
        os.rename(home / f"{target.replace('/', '-')}.moved", victim)


def test_home_is_crossed_not_listed_and_the_controls_files_are_its_own(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    (home / "logs").mkdir()
    (home / "embedded.json").write_text(json.dumps({"database_url": "postgresql://x"}))
    (home / "flower-password").write_text("pw")
    (home / "embedded.json").chmod(0o644)
    (home / "data").mkdir()  # the operator's (a data root may live here): left as it is
    (home / "data").chmod(0o755)
    secure_home(home)
    mode = {p.name: p.stat().st_mode & 0o777 for p in home.iterdir()}
    assert home.stat().st_mode & 0o777 == 0o711
    assert mode["keys"] == mode["logs"] == mode["run"] == 0o700
    assert mode["embedded.json"] == mode["flower-password"] == 0o600
    assert mode["data"] == 0o755
    assert "redis" not in mode  # only the embedded broker makes it


@pytest.mark.timeout(20)
def test_a_worker_holding_a_lock_in_its_directory_does_not_stall_the_refresh(
    tmp_path: Path,
) -> None:
    """A worker may open and flock any file it can read in its own directory; the export
    locks the control's key store instead, so a worker cannot hold a rotation's refresh."""
    import fcntl

    store = keystore(tmp_path)
    config = settings(tmp_path)
    home = config.home / "workers" / "lint_python"
    _prepare(WorkerIdentity(tool="lint_python", home=home), store)
    with open(home / "keys" / ".lock", "a") as held:  # as a hostile worker would
        fcntl.flock(held, fcntl.LOCK_EX)
        store.rotate("tool.lint_python", "ed25519")
        assert refresh_worker_keys(config) == ["lint_python"]
    assert KeyStore(home / "keys").signer("tool.lint_python").key_id == (
        store.signer("tool.lint_python").key_id
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="only root changes other users' access")
def test_a_plugins_path_entry_is_listed_for_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python imports a package by listing its sys.path entry: a checkout in a 0700
    directory on PYTHONPATH (a fresh clone in mktemp -d, say) must be listable by the
    workers' users, or their worker says "No module named ..."."""
    entry = tmp_path / "checkout"
    (entry / "tp_plugin_probe").mkdir(parents=True)
    (entry / "tp_plugin_probe" / "__init__.py").write_text("TOOLS = []\n")
    entry.chmod(0o700)
    monkeypatch.syspath_prepend(str(entry))
    opened = open_runtime(["tp_plugin_probe.tools"])
    assert entry.stat().st_mode & 0o777 == 0o705
    assert entry in opened
    # the package's own directory needs only search permission; nothing else is listed
    assert (entry / "tp_plugin_probe").stat().st_mode & 0o005 == 0o005  # as git made it
    assert open_runtime(["tp_plugin_probe.tools"]) == []  # nothing more to change


def test_the_s3_settings_and_credentials_go_to_the_control_processes_only(
    tmp_path: Path,
) -> None:
    s3 = settings(
        tmp_path,
        checkpoint_store="s3://ledger-bucket/cp",
        artifact_store="s3://ledger-bucket/art",
        s3_endpoint_url="http://127.0.0.1:9000",
        s3_access_key_id="key-id",
        s3_secret_access_key="secret-s3",
    )
    specs = plan_processes(
        ControlPlane(s3, broker_url="redis://127.0.0.1:6379/0", database_url=RUNTIME),
        workers={"lint_python": 1},
        flower=True,
        runtime_database_url=RUNTIME,
        base_env=SHELL,
        identities=identities(tmp_path, "lint_python"),
    )
    control, api, worker, flower = specs
    for spec in (control, api):
        assert spec.env["TOOLPLANE_S3_SECRET_ACCESS_KEY"] == "secret-s3"
        assert spec.env["TOOLPLANE_CHECKPOINT_STORE"] == "s3://ledger-bucket/cp/"
        assert spec.env["TOOLPLANE_ARTIFACT_STORE"] == "s3://ledger-bucket/art/"
    for spec in (worker, flower):
        leaked = [k for k in spec.env if k.startswith(("TOOLPLANE_S3", "AWS_")) or "STORE" in k]
        assert leaked == [], (spec.name, leaked)
        assert not any("secret-s3" in v or "secret-aws" in v for v in spec.env.values())
