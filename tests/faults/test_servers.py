"""The dedicated servers do what fault tests rely on: Redis forgets, PostgreSQL remembers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.faults.servers import DedicatedPostgres, DedicatedRedis
from tests.harness import _libpq

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[DedicatedRedis]:
    server = DedicatedRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[DedicatedPostgres]:
    server = DedicatedPostgres(tmp_path / "postgres")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_redis_restart_loses_everything_and_keeps_its_port(redis_server: DedicatedRedis) -> None:
    url, port, pid = redis_server.url, redis_server.port, redis_server.pid
    assert port not in (None, 6379)
    with redis.Redis.from_url(url) as client:
        client.set("queued", "job")
        client.lpush("toolplane", "message")

        redis_server.kill()
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()

        redis_server.start()
        assert (redis_server.url, redis_server.port) == (url, port)
        assert redis_server.pid != pid
        assert client.ping()  # the same client reconnects to the same port
        assert client.dbsize() == 0

        client.set("again", "1")
        redis_server.restart()
        assert client.dbsize() == 0
    assert not list(redis_server.home.glob("*.rdb")) and not list(redis_server.home.glob("*.aof"))


@pytest.mark.timeout(120)
def test_postgres_stop_and_start_keeps_data_and_url(postgres: DedicatedPostgres) -> None:
    url = postgres.url
    assert url.startswith("postgresql+psycopg://") and ":5432/" not in url
    dsn = _libpq(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('before the stop')")

    postgres.stop()
    assert not postgres.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2).close()

    postgres.start()
    assert postgres.url == url
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("before the stop",)]
