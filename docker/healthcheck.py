"""The images' HEALTHCHECK: is this container's process doing its job?

    python -I /app/healthcheck.py          # ready: the image's HEALTHCHECK
    python -I /app/healthcheck.py --live   # alive: a Kubernetes liveness probe

It looks at what PID 1 runs (``/proc/1/cmdline``) and asks that process itself:

- ``toolplane-worker TOOL`` (or ``python -m sandbox_tasks TOOL``, which ``toolplane
  worker`` becomes): a Redis ``PING`` as the worker's own broker user (its URL, its
  password), and the age of the file the worker touches at each Celery heartbeat
  (``$TOOLPLANE_HOME/scratch/heartbeat.TOOL``, every 2 s; see
  sandbox_tasks.worker.heartbeat_path): the broker answers, the credentials work and
  the worker's event loop runs. Not a Celery ping of its node: that user may not
  broadcast remote control nor read the replies (control.broker.acl).
- ``toolplane control``: a Celery remote-control ping of ``control@<hostname>`` (the
  reply comes from its consumer loop over the broker, so it proves a live process),
  and its API on loopback (below). With ``--no-api``: ``select 1`` on the database
  instead.
- ``toolplane api``: its API on loopback.
- ``celery ... flower``: Flower's own ``/healthcheck`` on loopback.
- anything else (``migrate``, one-off commands): healthy; they end on their own.

The API is asked at ``TOOLPLANE_API_BIND``'s port on loopback (the bound address if
it is not a wildcard): ``GET /readyz`` (the database answers, the broker accepts a
connection, a policy bundle is loaded), or ``GET /livez`` with ``--live`` (the
process serves; a database outage must not restart it). Over HTTPS when
``TOOLPLANE_API_CERT`` is set, without verifying the certificate: this asks our own
process whether it serves, not who it is, and the certificate names the service
(``control``, ``control-api.toolplane.svc``), not 127.0.0.1. When the API requires
client certificates (``TOOLPLANE_API_CLIENT_CA``) no request can be made without
one: the check then only connects to the port, and asks the database itself.

Secrets are read as the entrypoint reads them (``/run/secrets/env``): a
health check runs with the container's configured environment, not with the
one PID 1 built for itself. Exit 0 healthy, 1 not, with one line saying why.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from entrypoint import environment  # noqa: E402 - beside this file in the image

TIMEOUT_S = 4.0
FLOWER_PORT = 5555
API_BIND = "127.0.0.1:8765"  # TOOLPLANE_API_BIND's default
WILDCARDS = {"", "0.0.0.0", "::"}  # noqa: S104 - addresses recognised, not bound
WORKER_VALUE_OPTIONS = {"--concurrency", "--autoscale", "--loglevel"}

__all__ = ["Check", "check_for"]


@dataclass(frozen=True)
class Check:
    """What to ask: a Celery node to ping, whether to PING the broker or query the database,
    a URL to get, a port to connect to."""

    node: str | None = None
    broker: bool = False
    heartbeat: str | None = None  # the tool whose worker's heartbeat file must be fresh
    database: bool = False
    url: str | None = None  # GET, expecting 200 (https: certificate not verified)
    port: tuple[str, int] | None = None  # a TCP connection only


def _worker_tool(args: list[str]) -> str | None:
    """TOOL among ``toolplane-worker``'s arguments (options may come before it)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in WORKER_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _worker_args(argv: list[str], names: list[str]) -> list[str] | None:
    if "toolplane-worker" in names:
        return argv[names.index("toolplane-worker") + 1 :]
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1] == "sandbox_tasks":
            return argv[i + 2 :]
    return None


def _api(env: Mapping[str, str], *, live: bool) -> Check:
    """How to ask this container's API (see the module's docstring)."""
    bind = env.get("TOOLPLANE_API_BIND", API_BIND)
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ValueError(f"TOOLPLANE_API_BIND: {bind!r} is not host:port")
    host = host.strip("[]")
    if host in WILDCARDS:
        host = "::1" if host == "::" else "127.0.0.1"
    if env.get("TOOLPLANE_API_CLIENT_CA"):
        return Check(port=(host, int(port)), database=not live)
    scheme = "https" if env.get("TOOLPLANE_API_CERT") else "http"
    shown = f"[{host}]" if ":" in host else host
    return Check(url=f"{scheme}://{shown}:{port}/{'livez' if live else 'readyz'}")


def check_for(
    argv: list[str], hostname: str, env: Mapping[str, str] | None = None, *, live: bool = False
) -> Check:
    """The check for a container whose PID 1 runs ``argv``, with the environment ``env``."""
    env = env or {}
    names = [Path(arg).name for arg in argv]
    worker = _worker_args(argv, names)
    if worker is not None:
        tool = _worker_tool(worker)
        return Check(broker=True, heartbeat=tool) if tool else Check()
    if "toolplane" in names:
        rest = argv[names.index("toolplane") + 1 :]
        if rest[:1] == ["control"]:
            node = f"control@{hostname}"
            if "--no-api" in rest:
                return Check(node=node, database=not live)
            return replace(_api(env, live=live), node=node)
        if rest[:1] == ["api"]:
            return _api(env, live=live)
    if "celery" in names and "flower" in argv:
        port = FLOWER_PORT
        for arg in argv:
            if arg.startswith("--port="):
                port = int(arg.split("=", 1)[1])
        return Check(url=f"http://127.0.0.1:{port}/healthcheck")
    return Check()


def _ping(node: str, broker_url: str) -> None:
    from celery import Celery

    import celeryconfig

    app = Celery("toolplane-health", set_as_current=False)
    app.conf.update(celeryconfig.build_config(broker_url))
    replies = app.control.ping(destination=[node], timeout=TIMEOUT_S / 2) or []
    if not any(node in reply for reply in replies):
        raise RuntimeError(f"{node} did not answer a ping")


def _broker(url: str) -> None:
    import redis

    client = redis.Redis.from_url(
        url, socket_timeout=TIMEOUT_S / 2, socket_connect_timeout=TIMEOUT_S / 2
    )
    try:
        if client.ping() is not True:
            raise RuntimeError("the broker did not answer PING")
    finally:
        client.close()


HEARTBEAT_MAX_AGE_S = 30.0  # fifteen missed heartbeats


def _heartbeat(home: str, tool: str) -> None:
    beat = Path(home) / "scratch" / f"heartbeat.{tool}"
    try:
        age = time.time() - beat.stat().st_mtime
    except FileNotFoundError:
        raise RuntimeError(f"{beat}: no heartbeat yet") from None
    if age > HEARTBEAT_MAX_AGE_S:
        raise RuntimeError(f"{beat}: last heartbeat {age:.0f} s ago")


def _database(url: str) -> None:
    import psycopg

    plain = re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", url)
    with psycopg.connect(plain, connect_timeout=int(TIMEOUT_S)) as connection:
        connection.execute("select 1")


def _get(url: str) -> None:
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname = False  # our own process on loopback (module docstring)
        context.verify_mode = ssl.CERT_NONE
    try:
        # S310: our own process on loopback (Flower, the API)
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:  # noqa: S310
            if response.status != 200:
                raise RuntimeError(f"{url}: HTTP {response.status}")
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", "")
        except (ValueError, AttributeError, OSError):
            detail = ""
        raise RuntimeError(f"{url}: HTTP {e.code} {detail}".rstrip()) from None


def _connect(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=TIMEOUT_S / 2):
        pass


def main(argv: list[str]) -> int:
    if argv not in ([], ["--live"]):
        print(f"unhealthy: arguments: {' '.join(argv)!r} is not --live (or nothing)")
        return 1
    pid1 = [a.decode() for a in Path("/proc/1/cmdline").read_bytes().split(b"\0") if a]
    try:
        env = environment(os.environ)
        check = check_for(pid1, socket.gethostname(), env, live=argv == ["--live"])
        if check.node is not None:
            _ping(check.node, env["TOOLPLANE_BROKER_URL"])
        if check.broker:
            _broker(env["TOOLPLANE_BROKER_URL"])
        if check.heartbeat is not None:
            _heartbeat(env.get("TOOLPLANE_HOME", "/var/lib/toolplane"), check.heartbeat)
        if check.database:
            _database(env["TOOLPLANE_DATABASE_URL"])
        if check.url is not None:
            _get(check.url)
        if check.port is not None:
            _connect(check.port)
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {type(e).__name__}: {e}")
        return 1
    print(f"healthy: {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
