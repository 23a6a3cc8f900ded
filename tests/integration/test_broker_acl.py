"""Least privilege at the broker, against a real Redis 7 started with our ACL file.

A stack whose control, workers and Flower each connect as their own ACL user
(control.broker.acl): every tool's worker serves its queue and returns results, Flower sees every
worker and its tasks and can resize a pool, and Redis denies nothing on the way (ACL LOG stays
empty). Then each user is tried as an attacker who holds it would: another tool's queue, the
results, the shared unacked keys, other tools' claims, remote-control broadcasts, the event
stream, administrative commands.
"""

from __future__ import annotations

import base64
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from control.broker import acl as brokeracl
from control.ops import processes
from control.ops.runtime import ControlPlane
from sandbox_tasks.registry import load_tools
from sandbox_tasks.worker import heartbeat_path
from tests.harness import (
    Services,
    Stack,
    _libpq,
    require_redis7,
    start_stack,
    stop_stack,
    wait_for,
)
from tests.integration.test_flower import free_port, get

pytestmark = pytest.mark.integration

TOOLS = sorted(load_tools(["tests.fixture_tools"]))
CALLS = {
    "search_docs": {"query": "receipts"},
    "read_repo_file": {"path": "README.md"},
    "lint_python": {"code": "x=1\n"},
    "sleepy": {"seconds": 0.0},
}


class AclRedis:
    def __init__(self, home: Path) -> None:
        binary, version = require_redis7("ACL selectors need it")
        self.users = brokeracl.acl_users(TOOLS, db=0)
        self.passwords = {u.name: brokeracl.new_password() for u in self.users}
        self.passwords[brokeracl.ADMIN_USER] = brokeracl.new_password()
        admin_hash = brokeracl.password_sha256(self.passwords[brokeracl.ADMIN_USER])
        aclfile = home / "users.acl"
        aclfile.write_text(
            brokeracl.render_aclfile(
                self.users, self.passwords, server=brokeracl.parse_version(version)
            )
            + f"user {brokeracl.ADMIN_USER} on #{admin_hash} ~* &* +@all\n"
        )
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--aclfile", str(aclfile), "--dir", str(home)],
            stdout=open(home / "redis.log", "wb"),  # noqa: SIM115 - the server keeps it
            stderr=subprocess.STDOUT,
        )
        self.base = f"redis://127.0.0.1:{self.port}/0"
        log = home / "redis.log"
        wait_for(lambda: self._ping() or self.proc.poll() is not None, timeout=20, what="redis")
        assert self.proc.poll() is None, log.read_text()[-2000:]

    def _ping(self) -> bool:
        try:
            return bool(self.admin().ping())
        except redis.RedisError:
            return False

    def url(self, user: str) -> str:
        return brokeracl.url_for(self.base, user, self.passwords[user])

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(brokeracl.ADMIN_USER), socket_timeout=10)

    def as_user(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), socket_timeout=10)

    def denials(self) -> list[dict[str, Any]]:
        return list(self.admin().acl_log())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path_factory.mktemp("acl-redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def acl_stack(
    acl_redis: AclRedis, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name = f"tp_test_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = make_url(services.admin_url).set(database=name)
    own = Services(
        redis_url=acl_redis.url(brokeracl.CONTROL_USER),
        database_url=database_url.render_as_string(hide_password=False),
        admin_url=services.admin_url,
        database=name,
    )
    urls = {"control": acl_redis.url(brokeracl.CONTROL_USER)}
    urls |= {f"worker-{t}": acl_redis.url(brokeracl.tool_user(t)) for t in TOOLS}
    urls["flower"] = acl_redis.url(brokeracl.FLOWER_USER)
    home = Path(tmp_path_factory.mktemp("acl-home"))
    stack = start_stack(own, home, workers={t: 1 for t in CALLS}, broker_urls=urls)
    stack.broker_urls = urls  # type: ignore[attr-defined]
    try:
        yield stack
    finally:
        stop_stack(stack)
        own.close()


def connected_users(server: AclRedis) -> set[str]:
    return {c["user"] for c in server.admin().client_list()}


@pytest.mark.timeout(180)
def test_every_worker_serves_its_queue_as_its_own_user_and_nothing_is_denied(
    acl_redis: AclRedis, acl_stack: Stack
) -> None:
    acl_redis.admin().acl_log_reset()
    client = acl_stack.client(acl_stack.tenant())
    for tool, args in CALLS.items():
        view = client.call(tool, args, wait=True)
        assert view.status == "completed", (tool, view)
    users = connected_users(acl_redis)
    assert {brokeracl.tool_user(t) for t in CALLS} | {brokeracl.CONTROL_USER} <= users
    assert "default" not in users
    # A workflow, too: parallel nodes, then one that reads their results.
    run = client.run_workflow("repo-review", {"query": "receipts", "path": "README.md"}, wait=True)
    assert run.status == "completed", run
    assert acl_redis.denials() == [], "the ACL refused something the stack needs"
    # Each worker's event loop touches its heartbeat file (containers' healthcheck reads it).
    for tool in CALLS:
        beat = heartbeat_path(acl_stack.worker_home(tool) / "scratch", tool)
        assert time.time() - beat.stat().st_mtime < 10, tool


@pytest.mark.timeout(180)
def test_flower_sees_every_worker_and_its_tasks_and_resizes_a_pool(
    acl_redis: AclRedis, acl_stack: Stack
) -> None:
    acl_redis.admin().acl_log_reset()
    port = free_port()
    settings = acl_stack.settings().model_copy(update={"flower_port": port})
    plane = ControlPlane(
        settings,
        broker_url=acl_redis.url(brokeracl.CONTROL_USER),
        database_url=settings.database_url,
    )
    spec = next(
        s
        for s in processes.plan_processes(
            plane,
            workers={},
            flower=True,
            runtime_database_url=acl_stack.runtime_url,
            base_env=acl_stack.env,
            broker_urls=acl_stack.broker_urls,  # type: ignore[attr-defined]
        )
        if s.name == "flower"
    )
    assert not any(acl_redis.passwords[brokeracl.FLOWER_USER] in a for a in spec.argv)
    auth = (settings.flower_user, processes.flower_password(plane))
    flower = subprocess.Popen(
        spec.argv, env=spec.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    host = socket.gethostname()
    try:
        wait_for(lambda: get(f"{base}/api/workers", auth)[0] == 200, timeout=40, what="flower")
        assert get(f"{base}/api/workers")[0] == 401
        assert get(f"{base}/api/workers", ("admin", "wrong"))[0] == 401
        assert brokeracl.FLOWER_USER in connected_users(acl_redis)
        # Flower serves /metrics and /healthcheck without its auth: it listens on loopback only.
        listening = {
            c.laddr.ip
            for c in psutil.Process(flower.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {"127.0.0.1"}, listening

        def workers() -> dict[str, Any]:
            status, body = get(f"{base}/api/workers?refresh=1", auth)
            return body or {} if status == 200 else {}

        wanted = {f"{t}@{host}" for t in CALLS}
        seen = wait_for(lambda: wanted <= set(workers()) and workers(), timeout=40, what="workers")
        assert wanted <= set(seen)
        client = acl_stack.client(acl_stack.tenant())

        def tasks_listed() -> set[str]:
            status, body = get(f"{base}/api/tasks", auth)
            names = {t.get("name") for t in (body or {}).values()} if status == 200 else set()
            for tool, args in CALLS.items():  # events sent before Flower listened are not seen
                if f"tool.{tool}" not in names:
                    assert client.call(tool, args, wait=True).status == "completed"
            return names if {f"tool.{t}" for t in CALLS} <= names else set()

        wait_for(tasks_listed, timeout=60, interval=1.0, what="per-tool tasks in flower")
        # Events (and so Flower) carry no call's arguments and no result: only the job id.
        tasks = get(f"{base}/api/tasks", auth)[1].values()
        shown = {t["name"]: t.get("args") or "" for t in tasks}
        assert shown["tool.search_docs"].startswith("(<signed envelope "), shown
        assert not any("receipts" in a or "x=1" in a for a in shown.values()), shown

        # An operator's action: grow one tool's pool (a broadcast, answered on a reply queue).
        worker = f"sleepy@{host}"

        def pool_size() -> int:
            stats = workers().get(worker, {}).get("stats", {})
            return len(stats.get("pool", {}).get("processes", []))

        before = wait_for(pool_size, timeout=20, what="the pool's size")
        assert post(f"{base}/api/worker/pool/grow/{worker}?n=1", auth) == 200
        wait_for(lambda: pool_size() == before + 1, timeout=20, what="the grown pool")
        queues = get(f"{base}/api/queues/length", auth)
        assert queues[0] == 200, queues
        assert acl_redis.denials() == [], "the ACL refused something Flower needs"
    finally:
        flower.terminate()
        flower.wait(timeout=10)
        plane.engine.dispose()


def post(url: str, auth: tuple[str, str]) -> int:
    request = urllib.request.Request(url, method="POST")
    token = base64.b64encode(":".join(auth).encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def refused(conn: redis.Redis, *command: Any) -> bool:
    try:
        conn.execute_command(*command)
    except redis.exceptions.NoPermissionError:  # Redis's NOPERM
        return True
    return False


def test_a_tools_workers_are_refused_everything_but_their_own(acl_redis: AclRedis) -> None:
    mine, other = "search_docs", "lint_python"
    conn = acl_redis.as_user(brokeracl.tool_user(mine))
    # Its own: its queue, its claims, its unacked keys.
    conn.llen(f"tool.{mine}")
    conn.set(f"toolplane:claim:tool.{mine}:probe", "x", px=1000)
    conn.hget(f"unacked.tool.{mine}", "x")
    attempts = {
        "pop another tool's queue": ("RPOP", f"tool.{other}"),
        "block on another tool's queue": ("BRPOP", f"tool.{other}", "1"),
        "inject into another tool's queue": ("LPUSH", f"tool.{other}", "x"),
        "look at another tool's queue": ("LLEN", f"tool.{other}"),
        "another tool's priority list": ("RPOP", f"tool.{other}\x06\x163"),
        "a tool whose name starts the same": ("RPOP", f"tool.{mine}x"),
        "read results": ("RPOP", "results"),
        "peek at results": ("LRANGE", "results", "0", "-1"),
        "count results": ("LLEN", "results"),
        "the control's unacked messages": ("HGETALL", "unacked"),
        "another tool's unacked messages": ("HGETALL", f"unacked.tool.{other}"),
        "another tool's claims": ("SET", f"toolplane:claim:tool.{other}:x", "done"),
        "the entitlement counters": ("GET", "tp:ent:x"),
        "broadcast remote control": ("PUBLISH", "/0.celery.pidbox", "x"),
        "listen to every task's events": ("SUBSCRIBE", "/0.celeryev/task.received"),
        "rewrite a tool queue's bindings": ("SADD", f"_kombu.binding.tool.{other}", "x"),
        "empty results": ("DEL", "results"),
        "turn results into a string": ("SET", "results", "x"),
        "turn results into a hash": ("HSET", "results", "f", "v"),
        "redirect remote-control replies": (
            "SADD",
            "_kombu.binding.reply.celery.pidbox",
            "rk\x06\x16\x06\x16tp:ent:victim",
        ),
        "the binding deadlines": ("ZADD", "_kombu.binding_deadlines", "1", "other.pidbox"),
        "the event binding table": ("SADD", "_kombu.binding.celeryev", "x"),
        "another database": ("SELECT", "1"),
        "flush the database": ("FLUSHDB",),
        "read the configuration": ("CONFIG", "GET", "*"),
        "list every key": ("KEYS", "*"),
        "read the ACL": ("ACL", "LIST"),
        "shut the broker down": ("SHUTDOWN",),
    }
    allowed = [what for what, command in attempts.items() if not refused(conn, *command)]
    assert allowed == []
    # Pushing a result is allowed (queued in a transaction that is then discarded).
    one = conn.connection_pool.get_connection()
    try:
        for command in (("MULTI",), ("LPUSH", "results", "x"), ("DISCARD",)):
            one.send_command(*command)
            assert one.read_response() in (b"OK", b"QUEUED"), command
    finally:
        conn.connection_pool.release(one)
    assert refused(conn, "RPOP", "results")  # and nothing was pushed to take


def test_flower_can_count_but_not_take(acl_redis: AclRedis) -> None:
    conn = acl_redis.as_user(brokeracl.FLOWER_USER)
    conn.llen("tool.search_docs")
    conn.llen("results")
    attempts = {
        "pop a job": ("RPOP", "tool.search_docs"),
        "pop a result": ("RPOP", "results"),
        "push a job": ("LPUSH", "tool.search_docs", "x"),
        "the claims": ("GET", "toolplane:claim:tool.sleepy:x"),
        "flush": ("FLUSHDB",),
    }
    assert [w for w, c in attempts.items() if not refused(conn, *c)] == []


def test_redis6_rules_are_the_same_users_flattened() -> None:
    users = {u.name: u for u in brokeracl.acl_users(["lint_python"], db=3)}
    worker = brokeracl.flatten_for_redis6(users[brokeracl.tool_user("lint_python")])
    assert "%" not in worker.keys and not worker.selectors
    assert "&/3.celery.pidbox" in worker.channels and "&/3.celeryev/*" in worker.channels
    assert "~results" in worker.keys.split()


def test_the_control_user_has_no_admin_command(acl_redis: AclRedis) -> None:
    conn = acl_redis.as_user(brokeracl.CONTROL_USER)
    assert refused(conn, "FLUSHALL") and refused(conn, "CONFIG", "SET", "save", "")
    assert refused(conn, "ACL", "SETUSER", "x") and refused(conn, "SHUTDOWN")
