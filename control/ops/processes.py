"""``toolplane up`` / ``down``: the control process, one worker per tool, Flower.

Each process is started detached (its own session, output to ``HOME/logs/<name>.log``)
and recorded in ``HOME/run/processes.json``: ``down`` stops exactly what ``up`` started. A
worker's environment comes from an allowlist (``worker_env``): its own home and broker
user, roots and timings, no database URL, token or password of the control's; as root it
runs as its own user (``control.ops.identities``). The control gets the runtime role's URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psutil

from control.errors import ControlError
from control.ops.identities import WorkerIdentity, prepare_workers
from control.ops.metrics import reset_metrics_dir
from control.ops.process_env import (
    WORKER_BASE_ENV,
    _ledger_settings,
    _shared_settings,
    api_env,
    worker_env,
)
from control.ops.runtime import ControlPlane
from control.orchestration.manifests import approved_in_force, held_report
from toolplane.errors import SettingsError
from toolplane.keystore import KeyStore
from toolplane.settings import Settings
from toolplane.tracing import trace_env

__all__ = [
    "ProcessSpec",
    "Supervisor",
    "exec_worker",
    "flower_password",
    "start_processes",
    "stop_processes",
    "stop_supervisor",
    "supervising",
    "wait_ready",
    "WORKER_BASE_ENV",
    "api_env",
    "worker_env",
]


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    uid: int | None = None  # run as this user (and its group, no other groups); None: ours
    gid: int | None = None


def _state_path(home: Path) -> Path:
    return home / "run" / "processes.json"


def _read(home: Path) -> list[dict[str, object]]:
    path = _state_path(home)
    return json.loads(path.read_text()) if path.exists() else []


def _write(home: Path, entries: list[dict[str, object]]) -> None:
    path = _state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2))
    os.replace(tmp, path)


def _alive(entry: dict[str, object]) -> bool:
    try:
        proc = psutil.Process(int(str(entry["pid"])))
        return (
            proc.is_running()
            and proc.status() != psutil.STATUS_ZOMBIE
            and (proc.create_time() == entry.get("create_time"))
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def flower_password(plane: ControlPlane) -> str:
    """The configured Flower password, else one generated once and kept under HOME."""
    if plane.settings.flower_password is not None:
        return plane.settings.flower_password.get_secret_value()
    path = plane.settings.home / "flower-password"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(18))
    return path.read_text().strip()


def exec_worker(settings: Settings, tool: str, *, broker_url: str, argv: list[str]) -> NoReturn:
    """Become ``tool``'s worker (``toolplane worker``) as ``up`` would start it: where HOME is
    the control's (its private key is there), in its own directory and, as root, as its own
    user; a HOME without the control's key (a worker's container) is used as it is."""
    home, identity = settings.home, None
    try:
        KeyStore(settings.keys_dir).signer("control")
    except SettingsError:
        pass
    else:
        identity = prepare_workers(settings, [tool])[tool]
        home = identity.home
    env = worker_env(settings, tool=tool, home=home, broker_url=broker_url, source=os.environ)
    if identity is not None and identity.uid is not None and identity.gid is not None:
        env["USER"] = env["LOGNAME"] = str(identity.user)
        os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
        os.umask(0o077)
    os.execve(argv[0], argv, env)  # noqa: S606 - our own interpreter and module


def plan_processes(
    plane: ControlPlane,
    *,
    workers: dict[str, int],
    flower: bool,
    runtime_database_url: str,
    base_env: dict[str, str] | None = None,
    broker_urls: Mapping[str, str] | None = None,
    identities: Mapping[str, WorkerIdentity] | None = None,
) -> list[ProcessSpec]:
    """What to start; each child gets ``base_env`` (default: ours) without TOOLPLANE_*, and a
    worker only what ``worker_env`` lets through.

    ``broker_urls`` gives a process (``control``, ``worker-<tool>``, ``flower``) its own broker
    URL, i.e. its own ACL user (control.broker.acl); a process not in it gets the control's,
    which a worker gets only if it carries no password (name it here to hand it over).
    ``runtime_database_url`` is the control's database URL: the runtime role's, which may
    append evidence but not change it (control.ops.runtime_database), not ``plane``'s owner URL.
    ``identities`` (default: made here, control.ops.identities.prepare_workers) are the
    workers' users and directories.
    """
    settings = plane.settings
    urls = dict(broker_urls or {})
    if settings.broker_url and settings.broker_acl_dir is not None:  # a broker user per process
        from control.cli.broker import acl_dir_urls

        urls = {**acl_dir_urls(settings.broker_acl_dir, sorted(workers)), **urls}
    source = os.environ if base_env is None else base_env
    base = {k: v for k, v in source.items() if not k.startswith("TOOLPLANE_")} | trace_env(source)
    common = {
        **base,
        **_shared_settings(settings),
        "TOOLPLANE_HOME": str(settings.home),
        "TOOLPLANE_BROKER_URL": plane.broker_url,
        "TOOLPLANE_ENVIRONMENT": settings.environment,
    }
    if settings.redis_url is not None:  # entitlements: the control's and the API's Redis
        common["TOOLPLANE_REDIS_URL"] = settings.redis_url
    if settings.policy_dir is not None:
        common["TOOLPLANE_POLICY_DIR"] = str(settings.policy_dir)
    if settings.workflows_dir is not None:
        common["TOOLPLANE_WORKFLOWS_DIR"] = str(settings.workflows_dir)
    cli = [sys.executable, "-m", "control.cli"]
    control_env = {
        **common,
        **api_env(settings),
        **(_ledger_settings(settings) | settings.s3_env()),  # S3 keys: control's only
        "TOOLPLANE_DATABASE_URL": runtime_database_url,
        "TOOLPLANE_BROKER_URL": urls.get("control", plane.broker_url),
    }
    # The API in processes of its own (sharing the port), each with its own interpreter
    # lock, beside the control's results ingest; or, with none, in a thread of the control.
    apis = settings.api_processes
    specs = [
        ProcessSpec("control", [*cli, "control", *(["--no-api"] if apis else [])], control_env)
    ]
    if apis:
        api_settings = {**control_env, "TOOLPLANE_API_PROCESSES": str(apis)}
        specs.append(ProcessSpec("api", [*cli, "api"], api_settings))
    if workers and identities is None:
        identities = prepare_workers(settings, workers)
    for place, (tool, concurrency) in enumerate(workers.items()):
        broker_url = urls.get(f"worker-{tool}", plane.broker_url)
        if f"worker-{tool}" not in urls and urllib.parse.urlsplit(broker_url).password:
            raise SettingsError(
                f"carries a password, and the workers of {tool!r} would get it: give each "
                "tool's workers a broker user of their own (TOOLPLANE_BROKER_ACL_DIR, the "
                "files of `toolplane broker-acl`), or leave it unset for the embedded broker",
                setting="TOOLPLANE_BROKER_URL",
            )
        identity = (identities or {})[tool]
        env = worker_env(
            settings,
            tool=tool,
            home=identity.home,
            broker_url=broker_url,
            source=source,
            metrics_offset=place,
        )
        if identity.user is not None:
            env["USER"] = env["LOGNAME"] = identity.user
        specs.append(
            ProcessSpec(
                f"worker-{tool}",
                [sys.executable, "-m", "sandbox_tasks", tool, "--concurrency", str(concurrency)],
                env,
                uid=identity.uid,
                gid=identity.gid,
            )
        )
    if flower:
        specs.append(
            ProcessSpec(
                "flower",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "control.broker.flower_app",
                    "flower",
                    "--address=127.0.0.1",
                    f"--port={settings.flower_port}",
                ],
                {
                    # not the control's cloud credentials, nor its metrics directory
                    **{k: v for k, v in base.items() if not k.startswith(("AWS_", "PROMETHEUS"))},
                    # From the environment, so that no secret shows in a process list.
                    "TOOLPLANE_BROKER_URL": urls.get("flower", plane.broker_url),
                    "TOOLPLANE_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
                    "FLOWER_BASIC_AUTH": f"{settings.flower_user}:{flower_password(plane)}",
                },
            )
        )
    return specs


def start_processes(home: Path, specs: list[ProcessSpec]) -> list[dict[str, object]]:
    """Start what of ``specs`` does not run; each one's log (ours, 0600) is handed to it."""
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    entries = [e for e in _read(home) if _alive(e)]
    running = {str(e["name"]) for e in entries}
    if not running & {"control", "api"}:  # a fresh stack: its counters start at zero
        reset_metrics_dir(home)
    for spec in specs:
        if spec.name in running:
            continue
        path = logs / f"{spec.name}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdout=fd,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=spec.uid,  # None: ours, as the rest below
                group=spec.gid,
                extra_groups=None if spec.uid is None else [],
                umask=-1 if spec.uid is None else 0o077,
            )
        except OSError as e:  # e.g. the worker's user may not run our Python
            _write(home, entries)
            if spec.uid is None:
                raise
            raise ControlError(
                f"{spec.name}: cannot start {spec.argv[0]} as uid {spec.uid}: {e}; the Python "
                "installation and the code must be readable by that user"
            ) from e
        finally:
            os.close(fd)
        entries.append(
            {
                "name": spec.name,
                "pid": proc.pid,
                "create_time": psutil.Process(proc.pid).create_time(),
                "log": str(path),
            }
        )
    _write(home, entries)
    return entries


class Supervisor:
    """Starts again whatever of ``specs`` has exited, as systemd's ``Restart=always`` or a
    container platform would: a Celery consumer can die on a broker restart (a known
    class of kombu reconnect races), and nothing it held is lost by a restart.

    A process that keeps exiting is started again after a doubling delay (1 s to 30 s);
    one that ran a minute is forgiven.
    """

    MIN_DELAY_S = 1.0
    MAX_DELAY_S = 30.0
    STABLE_S = 60.0

    def __init__(self, home: Path, specs: list[ProcessSpec]) -> None:
        self.home = home
        self.specs = specs
        self._delay: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self.restarts: dict[str, int] = {}

    def check(self) -> list[str]:
        """Start what exited and is due; returns the names started."""
        now = time.monotonic()
        alive = {str(e["name"]) for e in _read(self.home) if _alive(e)}
        due = []
        for spec in self.specs:
            if spec.name in alive:
                if now - self._started.get(spec.name, now) >= self.STABLE_S:
                    self._delay.pop(spec.name, None)
                continue
            delay = self._delay.get(spec.name, 0.0)
            if now - self._started.get(spec.name, 0.0) >= delay:
                due.append(spec)
        if not due:
            return []
        start_processes(self.home, due)
        for spec in due:
            self._started[spec.name] = now
            self._delay[spec.name] = min(
                max(self._delay.get(spec.name, 0.0) * 2, self.MIN_DELAY_S), self.MAX_DELAY_S
            )
            self.restarts[spec.name] = self.restarts.get(spec.name, 0) + 1
        return [spec.name for spec in due]


def _supervisor_path(home: Path) -> Path:
    return home / "run" / "supervisor.json"


@contextlib.contextmanager
def supervising(home: Path) -> Iterator[None]:
    """Record this process as the supervisor of ``home`` while it supervises."""
    me = psutil.Process()
    path = _supervisor_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time()}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def stop_supervisor(home: Path, *, timeout: float = 60.0) -> bool:
    """Ask a foreground `toolplane up` supervising ``home`` to stop (it stops what it
    started), and wait for it; True if there was one."""
    path = _supervisor_path(home)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not _alive(entry):
        path.unlink(missing_ok=True)
        return False
    os.kill(int(entry["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(entry) and time.monotonic() < deadline:
        time.sleep(0.2)
    return True


def _tail(path: str, lines: int = 8) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _api_ready(settings: Settings) -> bool:
    from control.api.server import api_ready

    return api_ready(settings)


def wait_ready(plane: ControlPlane, tools: list[str], *, timeout: float = 90.0) -> None:
    """Wait until every process answers, each tool's approved manifest is in force, and the API."""
    host = socket.gethostname()
    wanted = {"control@" + host, *(f"{t}@{host}" for t in tools)}
    deadline = time.monotonic() + timeout
    answered: set[str] = set()
    registered: set[str] = set()
    while time.monotonic() < deadline:
        for entry in _read(plane.settings.home):
            if not _alive(entry):
                tail = _tail(str(entry["log"]))
                raise ControlError(f"{entry['name']} exited during start; its log ends:\n{tail}")
        replies = plane.celery.control.ping(destination=sorted(wanted - answered), timeout=1.0)
        for reply in replies or []:
            answered.update(reply)
        with plane.sessions() as session:
            registered = approved_in_force(session)
        if answered >= wanted and set(tools) <= registered and _api_ready(plane.settings):
            return
        time.sleep(0.3)
    with plane.sessions() as session:
        said = held_report(session, set(tools) - registered)
    raise ControlError(
        f"not ready after {timeout:g}s: waiting for {sorted(wanted - answered)} to answer, "
        f"{sorted(set(tools) - registered)} to announce their approved manifests and the API "
        f"({plane.settings.api_bind}) to be ready{said}"
    )


def _signal_group(entry: dict[str, object], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(int(str(entry["pid"])), sig)


def stop_processes(home: Path, *, timeout: float = 20.0) -> list[str]:
    entries = [e for e in _read(home) if _alive(e)]
    for entry in entries:
        _signal_group(entry, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(e) for e in entries):
        time.sleep(0.2)
    for entry in [e for e in entries if _alive(e)]:
        _signal_group(entry, signal.SIGKILL)
    _write(home, [])
    return [str(e["name"]) for e in entries]
