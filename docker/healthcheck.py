"""The images' HEALTHCHECK: is this container's process doing its job?

It looks at what PID 1 runs (``/proc/1/cmdline``) and asks that process itself:

- ``toolplane worker TOOL``: a Redis ``PING`` as the worker's own broker user (its
  URL, its password), and the age of the file the worker touches at each Celery
  heartbeat (``$TOOLPLANE_HOME/scratch/heartbeat.TOOL``, every 2 s; see
  sandbox_tasks.worker.heartbeat_path): the broker answers, the credentials work and
  the worker's event loop runs. Not a Celery ping of its node: that user may not
  broadcast remote control nor read the replies (control.broker.acl).
- ``toolplane control``: a Celery remote-control ping of ``control@<hostname>``
  (the reply comes from its consumer loop over the broker, so it proves a live
  process), and ``select 1`` on the database.
- ``celery ... flower``: Flower's own ``/healthcheck`` on loopback.
- anything else (``migrate``, one-off commands): healthy; they end on their own.

Secrets are read as the entrypoint reads them (``/run/secrets/env``): a
health check runs with the container's configured environment, not with the
one PID 1 built for itself. Exit 0 healthy, 1 not, with one line saying why.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from entrypoint import environment  # noqa: E402 - beside this file in the image

TIMEOUT_S = 4.0
FLOWER_PORT = 5555

__all__ = ["Check", "check_for"]


@dataclass(frozen=True)
class Check:
    """What to ask: a Celery node to ping, whether to PING the broker or query the database,
    a URL to get."""

    node: str | None = None
    broker: bool = False
    heartbeat: str | None = None  # the tool whose worker's heartbeat file must be fresh
    database: bool = False
    url: str | None = None


def check_for(argv: list[str], hostname: str) -> Check:
    """The check for a container whose PID 1 runs ``argv``."""
    names = [Path(arg).name for arg in argv]
    if "toolplane" in names:
        rest = argv[names.index("toolplane") + 1 :]
        if rest[:1] == ["control"]:
            return Check(node=f"control@{hostname}", database=True)
        if rest[:1] == ["worker"] and len(rest) > 1:
            return Check(broker=True, heartbeat=rest[1])
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
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - loopback
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")


def main() -> int:
    argv = [a.decode() for a in Path("/proc/1/cmdline").read_bytes().split(b"\0") if a]
    check = check_for(argv, socket.gethostname())
    try:
        env = environment(os.environ)
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
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {type(e).__name__}: {e}")
        return 1
    print(f"healthy: {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
