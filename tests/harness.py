"""Real services and real processes for the integration, security and fault tests.

Services come from the machine (TOOLPLANE_TEST_REDIS_URL, TOOLPLANE_TEST_DATABASE_URL,
or Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432); where none is
reachable, embedded ones are started. Each test run gets its own PostgreSQL
database and its own Redis database number, and removes them at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from tests.fixture_data import FIXTURE_ROOT_NOTE, add_hostile_files
from tests.s3server import s3_settings
from tests.stackdirs import reachable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REDIS = "redis://127.0.0.1:6379"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _redis_ok(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _pg_ok(url: str) -> bool:
    try:
        psycopg.connect(_libpq(url), connect_timeout=2).close()
        return True
    except psycopg.Error:
        return False


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Services:
    redis_url: str  # with its own db number
    database_url: str  # its own database
    admin_url: str
    database: str
    embedded_home: Path | None = None
    _redis_db: int = 0
    spares: list[int] = field(default_factory=list)
    reachable: list[Path] = field(default_factory=list)  # stack homes made by reachable()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def spare_redis_url(self) -> str:
        """Another Redis database of ours, for a second stack that must not share queues."""
        base = self.redis_url.rsplit("/", 1)[0]
        db = claim_redis_db(base)
        self.spares.append(db)
        return f"{base}/{db}"

    def close(self) -> None:
        base = self.redis_url.rsplit("/", 1)[0]
        for db in [self._redis_db, *self.spares]:
            try:
                redis.Redis.from_url(f"{base}/{db}").flushdb()
            except redis.RedisError:
                pass
        from ledger.roles import runtime_role_name

        with psycopg.connect(_libpq(self.admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            # the stacks' runtime role (control.ops.runtime_database): its grants went with the database
            role = sql.Identifier(runtime_role_name(self.database))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
        if self.embedded_home is not None:
            from control.ops.embedded import stop_embedded

            stop_embedded(self.embedded_home)
        for path in self.reachable:
            shutil.rmtree(path, ignore_errors=True)


def claim_redis_db(redis_base: str) -> int:
    """A Redis database of our own: an empty one, or one whose test run has died."""
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{redis_base}/{db}")
        owner = client.get("toolplane:test-owner")
        if owner is not None and not psutil.pid_exists(int(owner)):
            client.flushdb()  # left behind by a run that was killed
        if client.dbsize() == 0 and client.set("toolplane:test-owner", os.getpid(), nx=True):
            return db
    raise RuntimeError(f"no free Redis database on {redis_base}")


def start_services(tmp: Path) -> Services:
    redis_base = os.environ.get("TOOLPLANE_TEST_REDIS_URL", DEFAULT_REDIS)
    admin = os.environ.get("TOOLPLANE_TEST_DATABASE_URL", DEFAULT_PG)
    embedded_home = None
    if not (_redis_ok(redis_base) and _pg_ok(admin)):
        from control.ops.embedded import start_embedded

        embedded_home = Path(tmp) / "embedded"
        urls = start_embedded(embedded_home)
        redis_base = urls.broker_url.rsplit("/", 1)[0]
        admin = urls.database_url
    db = claim_redis_db(redis_base)
    name = f"tp_test_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    return Services(
        redis_url=f"{redis_base}/{db}",
        database_url=database_url,
        admin_url=admin,
        database=name,
        embedded_home=embedded_home,
        _redis_db=db,
    )


def own_services(services: Services) -> Services:
    """A database and a Redis database of its own, on the same servers: a stack whose
    control must not take the other stacks' results."""
    name = f"tp_test_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    redis_url = services.spare_redis_url()
    database_url = make_url(services.admin_url).set(database=name)
    return Services(
        redis_url=redis_url,
        database_url=database_url.render_as_string(hide_password=False),
        admin_url=services.admin_url,
        database=name,
        _redis_db=int(redis_url.rsplit("/", 1)[1]),
    )


@contextlib.contextmanager
def own_stack(services: Services, home: Path, **kwargs: Any) -> Iterator[Stack]:
    """A stack on services of its own (``own_services``: no other stack's control takes its
    messages), started with ``start_stack(..., **kwargs)``; stopped and dropped after."""
    own = own_services(services)
    try:
        running = start_stack(own, home, **kwargs)
        try:
            yield running
        finally:
            stop_stack(running)
    finally:
        own.close()


@dataclass
class Stack:
    """A running control process and one worker per tool, on the test services.

    The control process connects as the runtime role (``runtime_url``); ``env`` and the
    clients keep the owner's URL, to look into (and tamper with) the database."""

    services: Services
    home: Path
    env: dict[str, str]
    runtime_url: str = ""
    processes: list[dict[str, Any]] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    http_clients: list[Any] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)
    broker_urls: dict[str, str] | None = None  # each process's own broker URL, if given
    _sessions: Any = None
    _supervisor: Any = None

    def cli(
        self,
        *args: str,
        token: str | None = None,
        timeout: float = 90,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``toolplane`` against the stack (``env`` overrides its settings)."""
        env = dict(self.env, **(env or {}))
        if token:
            env["TOOLPLANE_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "control.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def settings(self, token: str | None = None) -> Any:
        from toolplane.settings import Settings

        return Settings(
            broker_url=self.env["TOOLPLANE_BROKER_URL"],
            database_url=self.env["TOOLPLANE_DATABASE_URL"],
            home=self.home,
            policy_dir=Path(self.env["TOOLPLANE_POLICY_DIR"]),
            repo_root=Path(self.env["TOOLPLANE_REPO_ROOT"]),
            docs_root=Path(self.env["TOOLPLANE_DOCS_ROOT"]),
            data_roots=self.env.get("TOOLPLANE_DATA_ROOTS", "{}"),
            extra_tools=self.env["TOOLPLANE_EXTRA_TOOLS"],
            visibility_timeout=int(self.env["TOOLPLANE_VISIBILITY_TIMEOUT"]),
            queue_wait_s=int(self.env.get("TOOLPLANE_QUEUE_WAIT_S", "60")),
            api_bind=self.env["TOOLPLANE_API_BIND"],
            api_processes=int(self.env.get("TOOLPLANE_API_PROCESSES", "1")),
            token=token,
            worker_env=self.env.get("TOOLPLANE_WORKER_ENV", ""),
            allow_weak_containment=self.env.get("TOOLPLANE_ALLOW_WEAK_CONTAINMENT") == "true",
            sandbox_min_layers=self.env.get("TOOLPLANE_SANDBOX_MIN_LAYERS", "auto"),
            log_format=self.env.get("TOOLPLANE_LOG_FORMAT", "text"),
            receipt_algorithm=self.env.get("TOOLPLANE_RECEIPT_ALGORITHM", "ed25519"),
            receipt_algorithms=self.env.get("TOOLPLANE_RECEIPT_ALGORITHMS", ""),
            **({"worker_user": v} if (v := self.env.get("TOOLPLANE_WORKER_USER")) else {}),
            **{  # metrics off, the workers' own endpoints (tests/integration/test_metrics*.py)
                name: v
                for name in ("metrics", "worker_metrics_bind", "worker_metrics_token_file")
                if (v := self.env.get(f"TOOLPLANE_{name.upper()}"))
            },
            **s3_settings(self.env),  # the S3 stores' settings, if a test gives them
        )

    def worker_home(self, tool: str) -> Path:
        """The directory a tool's workers get as their TOOLPLANE_HOME (control.ops.identities)."""
        return self.home / "workers" / tool

    def client(self, token: str) -> Any:
        """The control's operations for ``token``, in this process (for tests of the
        control's logic that also look into its database through ``.plane``)."""
        from control.orchestration.operations import Operations as Client

        client = Client.from_env(self.settings(token))
        self.clients.append(client)
        return client

    @property
    def url(self) -> str:
        return self.env["TOOLPLANE_URL"]

    def http(self, token: str | None) -> Any:
        """The Python client of the stack's API: its URL and ``token``, nothing else."""
        from control.client import Client

        client = Client(self.url, token=token)
        self.http_clients.append(client)
        return client

    def tenant(self, name: str | None = None) -> str:
        """A new tenant; returns its admin token (in process: `tenant create` has its own tests,
        and a CLI process per test costs seconds)."""
        from control.governance.auth import create_tenant

        name = name or f"t-{secrets.token_hex(4)}"
        if self._sessions is None:
            from ledger.db import make_engine, make_sessionmaker

            self._sessions = make_sessionmaker(make_engine(self.env["TOOLPLANE_DATABASE_URL"]))
        with self._sessions() as session:
            _, token = create_tenant(session, name)
            session.commit()
        return token

    def pid(self, name: str) -> int:
        """The pid of one of the stack's processes (``control``, ``worker-<tool>``)."""
        for entry in json.loads((self.home / "run" / "processes.json").read_text()):
            if entry["name"] == name:
                return int(entry["pid"])
        raise KeyError(name)

    def worker_pid(self, tool: str) -> int:
        return self.pid(f"worker-{tool}")

    def sweeper_armed(self) -> None:
        """Wait until the control's sweeper may give attempts up: it waits a visibility
        timeout (and two restore sweeps) after the control started."""
        from celeryconfig import RESTORE_INTERVAL_S

        # + the time the control process takes to start serving, from its own clock
        grace = int(self.env["TOOLPLANE_VISIBILITY_TIMEOUT"]) + 2 * RESTORE_INTERVAL_S + 8
        age = time.time() - psutil.Process(self.pid("control")).create_time()
        time.sleep(max(0.0, grace - age))

    def kill(self, name: str) -> None:
        """kill -9 one of the stack's processes and all it started (it leads its own session)."""
        pid = self.pid(name)
        group = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        os.killpg(pid, signal.SIGKILL)
        psutil.wait_procs([p for p in map(_process, group) if p is not None], timeout=10)

    def start_missing(self) -> None:
        """Start again whatever of the stack is not running (now, without any backoff)."""
        from control.ops import processes

        self.processes = processes.start_processes(self.home, self.supervisor.specs)

    @property
    def supervisor(self) -> Any:
        """The stack's supervisor (`toolplane up` runs the same in the foreground)."""
        if self._supervisor is None:
            from control.ops import processes
            from control.ops.runtime import ControlPlane

            plane = ControlPlane(
                self.settings(),
                broker_url=self.env["TOOLPLANE_BROKER_URL"],
                database_url=self.env["TOOLPLANE_DATABASE_URL"],
            )
            specs = processes.plan_processes(
                plane,
                workers=self.workers,
                flower=False,
                runtime_database_url=self.runtime_url,
                base_env=self.env,
                broker_urls=self.broker_urls,
            )
            plane.engine.dispose()
            self._supervisor = processes.Supervisor(self.home, specs)
        return self._supervisor

    def log(self, name: str) -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    def starts(self, tool: str, job_id: str) -> int:
        """How often a worker of ``tool`` started running ``job_id`` (from its own log)."""
        return self.log(f"worker-{tool}").count(f"job.start job={job_id} ")


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def make_env(
    services: Services,
    home: Path,
    *,
    visibility_timeout: int = 30,
    egress: str = "",
    private_egress: str = "",
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The stack's environment; ``extra_env`` (e.g. shorter timeouts for fault tests) wins.

    ``home`` becomes a link to a directory the workers' users can reach (``reachable``)."""
    reachable(services, home)
    policy = home / "policy"
    shutil.copytree(REPO / "policy" / "bundles" / "default", policy, dirs_exist_ok=True)
    shutil.copy(REPO / "tests" / "fixtures" / "policy" / "tests.cedar", policy / "tests.cedar")
    constraints = json.loads(
        (REPO / "tests" / "fixtures" / "policy" / "constraints.json").read_text()
    )
    if private_egress:  # the loopback test server: reachable only because policy names it
        hosts = private_egress.split(",")
        constraints["rules"].append({"tool": "fetcher", "private_egress": hosts})
    (policy / "constraints.json").write_text(json.dumps(constraints))
    labels = json.loads((policy / "labels.json").read_text())
    labels["rules"].append({"tool": "*", "root": "fixture", "classification": "confidential"})
    (policy / "labels.json").write_text(json.dumps(labels))  # a plugin's root, labelled
    # The shipped bundle refuses "..", "." and absolute paths before any tool sees
    # them (safe-paths.cedar; its own tests show that); the stack leaves that file out, so
    # that the whole path tests read_repo_file's own defences against them too.
    (policy / "safe-paths.cedar").unlink()
    (policy / "tests" / "shipped.json").unlink()  # its cases expect the full bundle
    repo = home / "repo"
    shutil.copytree(REPO / "examples" / "repo", repo, dirs_exist_ok=True)
    add_hostile_files(repo)
    fixture_root = home / "fixture-root"  # the plugin tool `rooted`'s own data root
    fixture_root.mkdir(exist_ok=True)
    (fixture_root / "note.txt").write_text(FIXTURE_ROOT_NOTE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLPLANE_")}
    env.update(
        {
            "TOOLPLANE_BROKER_URL": services.redis_url,
            "TOOLPLANE_DATABASE_URL": services.database_url,
            "TOOLPLANE_HOME": str(home),
            "TOOLPLANE_POLICY_DIR": str(policy),
            "TOOLPLANE_REPO_ROOT": str(repo),
            "TOOLPLANE_DOCS_ROOT": str(REPO / "examples" / "docs"),
            "TOOLPLANE_DATA_ROOTS": json.dumps({"fixture": str(fixture_root)}),
            "TOOLPLANE_EXTRA_TOOLS": "tests.fixture_tools",
            "TOOLPLANE_VISIBILITY_TIMEOUT": str(visibility_timeout),
            "TP_TEST_EGRESS": egress,
            "TOOLPLANE_WORKER_ENV": "TP_TEST_EGRESS",  # the fetcher tool's allowed hosts
            "PYTHONPATH": str(REPO),
        }
    )
    port = free_port()
    env["TOOLPLANE_API_BIND"] = f"127.0.0.1:{port}"
    env["TOOLPLANE_URL"] = f"http://127.0.0.1:{port}"
    env.update(extra_env or {})
    return env


def free_port() -> int:
    """A TCP port free on loopback now (each stack's API gets its own)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_stack(
    services: Services,
    home: Path,
    *,
    workers: dict[str, int] | None = None,
    egress: str = "",
    private_egress: str = "",
    extra_env: dict[str, str] | None = None,
    broker_urls: dict[str, str] | None = None,
) -> Stack:
    """Keys, migrations, the runtime role, then the control process and workers, as
    `toolplane up` does.

    ``broker_urls``: each process's own broker URL (its ACL user), as control.ops.processes takes.
    """
    from control.ops import processes
    from control.ops.runtime import ControlPlane
    from control.ops.runtime_database import ensure_runtime_url
    from ledger.migrate import upgrade
    from sandbox_tasks.registry import load_tools

    env = make_env(
        services, home, egress=egress, private_egress=private_egress, extra_env=extra_env
    )
    stack = Stack(services=services, home=home, env=env)
    settings = stack.settings()
    plane = ControlPlane(
        settings, broker_url=services.redis_url, database_url=services.database_url
    )
    upgrade(plane.engine)
    stack.runtime_url, _ = ensure_runtime_url(settings, plane.engine)
    tools = sorted(load_tools(settings.extra_tool_modules))
    plane.keystore.ensure_all(
        tools,
        receipt_algorithm=settings.receipt_algorithm,
        per_tool=settings.tool_receipt_algorithms,
    )
    plane.sync_keys()
    counts = workers or {t: 1 for t in tools}
    stack.workers = counts
    if broker_urls is None and services.embedded_home is not None:
        # The test services' own embedded Redis (none answered on the machine): its URL is
        # its control user's, which `toolplane up` never hands to a worker unasked.
        broker_urls = {f"worker-{t}": services.redis_url for t in counts}
    stack.broker_urls = broker_urls
    specs = processes.plan_processes(
        plane,
        workers=counts,
        flower=False,
        runtime_database_url=stack.runtime_url,
        base_env=env,
        broker_urls=broker_urls,
    )
    from control.broker.queues import declare_results_queue

    declare_results_queue(plane.celery)  # as `toolplane up` does, before any worker announces
    from control.ops.toolpins import pin_started_tools

    pin_started_tools(plane, specs)  # as `toolplane up` does: the manifests of this code
    stack.processes = processes.start_processes(home, specs)
    try:
        processes.wait_ready(plane, sorted(counts), timeout=60)
    except Exception:
        processes.stop_processes(home)
        raise
    plane.engine.dispose()
    return stack


def stop_stack(stack: Stack) -> None:
    from control.ops.processes import stop_processes

    stop_processes(stack.home)
    for client in stack.clients:
        client.plane.engine.dispose()
    for http in stack.http_clients:
        http.close()
    if stack._sessions is not None:
        stack._sessions.kw["bind"].dispose()


def wait_for(predicate: Any, *, timeout: float = 30, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def require_redis7(why: str) -> tuple[str, str]:
    """The redis-server embedded mode would use, if it is Redis 7 (else skip; under CI, fail)."""
    from control.ops.embedded import _redis_binary

    binary, version = _redis_binary()
    if int(version.split(".")[0]) < 7:
        reason = f"no Redis 7 redis-server on PATH (found {version}): {why}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary, version
