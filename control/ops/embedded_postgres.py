"""The embedded PostgreSQL (from ``pgserver``): only its shipped binaries, run as the
``pgserver`` system user when we are root, listening on a unix socket only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shlex
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import psutil
import psycopg

from control.ops.daemons import EmbeddedError, _alive, _escalate, _package_dir, _tail

PG_SYSTEM_USER = "pgserver"  # the user pgserver itself runs postgres as, when root
PG_PORT = 5432  # only names the unix socket file; no TCP listener
DATABASE = "toolplane"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes incl. NUL; keep a margin

__all__ = ["DATABASE", "PG_PORT"]


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
    fd = os.open(home / "pg" / "ctl.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # ours alone: pg/ is crossed by other users (the socket's parent)
    with os.fdopen(fd, "ab") as out:
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
