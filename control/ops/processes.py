"""``toolplane up`` / ``down``: the control process, one worker per tool, Flower.

Each process is started detached (its own session, output to
``$TOOLPLANE_HOME/logs/<name>.log``) and recorded in ``$TOOLPLANE_HOME/run/processes.json``
so that ``down`` (from any shell) stops exactly what ``up`` started. Workers get
no database URL: the sandbox plane holds no database credentials. The control process
gets the runtime role's URL (control.ops.runtime_database), never the owner's.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from sqlalchemy import select

from control.errors import ControlError
from control.ops.runtime import ControlPlane
from ledger.models import ToolManifest
from toolplane.settings import Settings

WORKER_ONLY_SECRETS = (  # never in a worker's environment
    "TOOLPLANE_DATABASE_URL",
    "TOOLPLANE_REDIS_URL",
    "TOOLPLANE_TOKEN",
    "TOOLPLANE_FLOWER_PASSWORD",
)

__all__ = [
    "ProcessSpec",
    "Supervisor",
    "flower_password",
    "start_processes",
    "stop_processes",
    "stop_supervisor",
    "supervising",
    "wait_ready",
]


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str]


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


def api_env(settings: Settings) -> dict[str, str]:
    """The control's API settings (bind, TLS, limits) for its process."""
    env = {
        "TOOLPLANE_API_BIND": settings.api_bind,
        "TOOLPLANE_API_MAX_BODY": str(settings.api_max_body),
        "TOOLPLANE_ENVIRONMENT": settings.environment,
        "TOOLPLANE_ENVIRONMENTS": settings.environments,
        "TOOLPLANE_CLASSIFICATION": settings.classification,
        "TOOLPLANE_CLASSIFICATIONS": settings.classifications,
    }
    for name in ("api_cert", "api_key", "api_client_ca"):
        value = getattr(settings, name)
        if value is not None:
            env[f"TOOLPLANE_{name.upper()}"] = str(value)
    return env


def plan_processes(
    plane: ControlPlane,
    *,
    workers: dict[str, int],
    flower: bool,
    runtime_database_url: str,
    base_env: dict[str, str] | None = None,
    broker_urls: Mapping[str, str] | None = None,
) -> list[ProcessSpec]:
    """What to start; each child gets ``base_env`` (default: ours) without TOOLPLANE_*.

    ``broker_urls`` gives a process (``control``, ``worker-<tool>``, ``flower``) its own broker
    URL, i.e. its own ACL user (control.broker.acl); a process not in it gets the control's.
    ``runtime_database_url`` is the control's database URL: the runtime role's, which may
    append evidence but not change it (control.ops.runtime_database), not ``plane``'s owner URL.
    """
    urls = broker_urls or {}
    settings = plane.settings
    source = os.environ if base_env is None else base_env
    base = {k: v for k, v in source.items() if not k.startswith("TOOLPLANE_")}
    common = {
        **base,
        "TOOLPLANE_HOME": str(settings.home),
        "TOOLPLANE_BROKER_URL": plane.broker_url,
        "TOOLPLANE_REPO_ROOT": str(settings.repo_root),
        "TOOLPLANE_DOCS_ROOT": str(settings.docs_root),
        "TOOLPLANE_EXTRA_TOOLS": settings.extra_tools,
        "TOOLPLANE_RECEIPT_ALGORITHM": settings.receipt_algorithm,
        "TOOLPLANE_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
        "TOOLPLANE_QUEUE_WAIT_S": str(settings.queue_wait_s),
        "TOOLPLANE_ENVIRONMENT": settings.environment,
    }
    if settings.redis_url is not None:  # entitlements: the control's and the API's Redis
        common["TOOLPLANE_REDIS_URL"] = settings.redis_url
    if settings.policy_dir is not None:
        common["TOOLPLANE_POLICY_DIR"] = str(settings.policy_dir)
    if settings.workflows_dir is not None:
        common["TOOLPLANE_WORKFLOWS_DIR"] = str(settings.workflows_dir)
    cli = [sys.executable, "-m", "control.cli"]
    specs = [
        ProcessSpec(
            "control",
            [*cli, "control"],
            {
                **common,
                **api_env(settings),
                "TOOLPLANE_DATABASE_URL": runtime_database_url,
                "TOOLPLANE_BROKER_URL": urls.get("control", plane.broker_url),
            },
        )
    ]
    for tool, concurrency in workers.items():
        env = {k: v for k, v in common.items() if k not in WORKER_ONLY_SECRETS}
        env["TOOLPLANE_BROKER_URL"] = urls.get(f"worker-{tool}", plane.broker_url)
        specs.append(
            ProcessSpec(
                f"worker-{tool}",
                [sys.executable, "-m", "sandbox_tasks", tool, "--concurrency", str(concurrency)],
                env,
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
                    **base,
                    # From the environment, so that no secret shows in a process list.
                    "TOOLPLANE_BROKER_URL": urls.get("flower", plane.broker_url),
                    "TOOLPLANE_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
                    "FLOWER_BASIC_AUTH": f"{settings.flower_user}:{flower_password(plane)}",
                },
            )
        )
    return specs


def start_processes(home: Path, specs: list[ProcessSpec]) -> list[dict[str, object]]:
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    entries = [e for e in _read(home) if _alive(e)]
    running = {str(e["name"]) for e in entries}
    for spec in specs:
        if spec.name in running:
            continue
        log = open(logs / f"{spec.name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            spec.argv,
            env=spec.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        entries.append(
            {
                "name": spec.name,
                "pid": proc.pid,
                "create_time": psutil.Process(proc.pid).create_time(),
                "log": str(logs / f"{spec.name}.log"),
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


def api_ready(settings: Settings) -> bool:
    """The control's API answers /readyz with 200 (its TLS certificate is not checked here:
    this only asks whether the process serves)."""
    import ssl
    import urllib.error
    import urllib.request

    from control.api.server import api_url

    context = ssl._create_unverified_context()  # noqa: S323 - a local liveness probe
    try:
        with urllib.request.urlopen(  # noqa: S310 - our own http(s) URL
            api_url(settings) + "/readyz", timeout=2, context=context
        ) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def wait_ready(plane: ControlPlane, tools: list[str], *, timeout: float = 90.0) -> None:
    """Wait until control and every tool's worker answer a ping, every manifest is in, and
    the API is ready."""
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
            registered = set(session.scalars(select(ToolManifest.tool)))
        if answered >= wanted and set(tools) <= registered and api_ready(plane.settings):
            return
        time.sleep(0.3)
    raise ControlError(
        f"not ready after {timeout:g}s: waiting for {sorted(wanted - answered)} to answer, "
        f"{sorted(set(tools) - registered)} to register and the API "
        f"({plane.settings.api_bind}) to be ready"
    )


def stop_processes(home: Path, *, timeout: float = 20.0) -> list[str]:
    entries = [e for e in _read(home) if _alive(e)]
    for entry in entries:
        try:
            os.killpg(int(str(entry["pid"])), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(e) for e in entries):
        time.sleep(0.2)
    for entry in entries:
        if _alive(entry):
            try:
                os.killpg(int(str(entry["pid"])), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    _write(home, [])
    return [str(e["name"]) for e in entries]
