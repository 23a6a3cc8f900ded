"""``toolplane broker-acl``'s files against a real Redis 7: the server starts with the ACL file,
every URL it wrote authenticates as its own user, and each user can do only its part.

(What the users' rules let kombu and Celery do end to end is tests/integration/test_broker_acl.py.)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import redis
from kombu.exceptions import OperationalError

from control.broker import acl as brokeracl
from sandbox_tasks.registry import load_tools
from tests.harness import require_redis7, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOOLS = sorted(load_tools())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int
    files: Path
    proc: subprocess.Popen[bytes]

    def as_url(self, process: str) -> redis.Redis:
        url = (self.files / f"broker_url.{process}").read_text()
        assert url.startswith("redis://") and url.endswith(f"@127.0.0.1:{self.port}/0")
        return redis.Redis.from_url(url, socket_timeout=10)

    def as_user(self, user: str, password: str | None) -> redis.Redis:
        return redis.Redis(port=self.port, username=user, password=password, socket_timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    binary, version = require_redis7("the ACL file needs it")
    home = tmp_path_factory.mktemp("broker-acl")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TOOLPLANE_EXTRA_TOOLS"}
    done = subprocess.run(
        [sys.executable, "-m", "control.cli", "broker-acl", str(home / "broker")]
        + ["--host", "127.0.0.1", "--port", str(port), "--redis-version", version],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    log = home / "redis.log"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--aclfile", str(home / "broker" / "users.acl"), "--dir", str(home)],
        stdout=open(log, "wb"),  # noqa: SIM115 - the server keeps it
        stderr=subprocess.STDOUT,
    )
    found = Server(port, home / "broker", proc)

    def up() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return bool(found.as_user(brokeracl.HEALTH_USER, "x").ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, timeout=20, what="redis with the ACL file")
        assert proc.poll() is None, log.read_text()[-2000:]
        yield found
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_7_runs_with_the_aclfile_and_every_url_authenticates(server: Server) -> None:
    for process in ["control", "flower", *TOOLS]:
        assert server.as_url(process).ping() is True, process
    with pytest.raises(redis.AuthenticationError):
        server.as_user("default", None).ping()  # the default user is off: no password-less use
    with pytest.raises(redis.AuthenticationError):
        server.as_user(brokeracl.tool_user(TOOLS[0]), "not its password").ping()


def test_each_user_gets_its_own_part_only(server: Server) -> None:
    control = server.as_url("control")
    control.rpush("tool." + TOOLS[0], "job")
    for tool in TOOLS:
        worker = server.as_url(tool)
        assert worker.llen(f"tool.{tool}") >= 0
        for other in TOOLS:
            if other != tool:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    worker.llen(f"tool.{other}")
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.lrange("results", 0, -1)  # write-only (Redis lets %W~ see a length: LLEN)
    flower = server.as_url("flower")
    assert flower.llen("tool." + TOOLS[0]) == 1
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.lpop("tool." + TOOLS[0])

    keda = server.as_user(brokeracl.KEDA_USER, (server.files / "keda_password").read_text())
    assert keda.llen("tool." + TOOLS[0]) == 1
    for denied in (
        lambda: keda.lpop("tool." + TOOLS[0]),
        lambda: keda.lrange("tool." + TOOLS[0], 0, -1),
        lambda: keda.llen("results"),
        lambda: keda.publish("/0.celery.pidbox", "x"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            denied()


def test_the_health_user_may_ping_with_any_password_and_nothing_else(server: Server) -> None:
    health = server.as_user(brokeracl.HEALTH_USER, "anything")
    assert health.ping() is True
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.get("x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.llen("tool." + TOOLS[0])
    cli = shutil.which("redis-cli")
    if cli is None:
        return
    # The compose healthcheck's own command (redis-cli exits 0 on NOAUTH too: hence its grep).
    done = subprocess.run(
        [cli, "-p", str(server.port), "--no-auth-warning"]
        + ["--user", brokeracl.HEALTH_USER, "--pass", "x", "ping"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.stdout.strip() == "PONG", done.stdout + done.stderr


def load_healthcheck() -> ModuleType:
    """docker/healthcheck.py, imported from its file as the image runs it (entrypoint beside)."""
    docker = ROOT / "docker"
    spec = importlib.util.spec_from_file_location(
        "docker_healthcheck_acl", docker / "healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_a_workers_healthcheck_works_as_its_own_user_where_a_celery_ping_cannot(
    server: Server,
) -> None:
    healthcheck = load_healthcheck()
    tool = TOOLS[0]
    url = (server.files / f"broker_url.{tool}").read_text()
    assert healthcheck.check_for(["/opt/venv/bin/toolplane-worker", tool], "h").broker
    healthcheck._broker(url)  # its PING, as the worker's own user
    with pytest.raises(redis.AuthenticationError):
        healthcheck._broker(url.replace("toolplane-tool-", "toolplane-nobody-"))
    # Why not the remote-control ping the control's check sends: the user may not broadcast.
    with pytest.raises((OperationalError, redis.exceptions.NoPermissionError), match="no perm"):
        healthcheck._ping(f"{tool}@h", url)
    with pytest.raises(RuntimeError, match="did not answer"):  # the control's user may
        healthcheck._ping("control@nowhere", (server.files / "broker_url.control").read_text())
