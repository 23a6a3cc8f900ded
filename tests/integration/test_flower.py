"""Flower behind basic auth lists each tool's worker and the per-tool task names."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest

from control.ops import processes
from control.ops.runtime import ControlPlane
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.integration

TOOLS = ("search_docs", "read_repo_file", "lint_python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError):
        return 0, None


@pytest.mark.timeout(120)
def test_flower_requires_auth_and_shows_tools(stack: Stack, token: str) -> None:
    port = free_port()
    settings = stack.settings().model_copy(update={"flower_port": port})
    plane = ControlPlane(
        settings,
        broker_url=stack.env["TOOLPLANE_BROKER_URL"],
        database_url=stack.env["TOOLPLANE_DATABASE_URL"],
    )
    spec = next(
        s
        for s in processes.plan_processes(
            plane,
            workers={},
            flower=True,
            runtime_database_url=stack.runtime_url,
            base_env=stack.env,
        )
        if s.name == "flower"
    )
    assert "--address=127.0.0.1" in spec.argv
    password = processes.flower_password(plane)
    flower = subprocess.Popen(
        spec.argv, env=spec.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    auth = (settings.flower_user, password)
    try:
        wait_for(lambda: get(f"{base}/api/workers", auth)[0] == 200, timeout=40, what="flower")
        assert get(f"{base}/api/workers")[0] == 401
        assert get(f"{base}/api/workers", ("admin", "wrong"))[0] == 401
        client = stack.client(token)
        host = socket.gethostname()

        def workers() -> set[str]:
            status, body = get(f"{base}/api/workers?refresh=1", auth)
            return set(body or {}) if status == 200 else set()

        seen = wait_for(
            lambda: {f"{t}@{host}" for t in TOOLS} <= workers() and workers(),
            timeout=30,
            what="workers in flower",
        )
        assert {f"{t}@{host}" for t in TOOLS} <= seen

        def task_names() -> set[str]:
            status, body = get(f"{base}/api/tasks", auth)
            return {t.get("name") for t in (body or {}).values()} if status == 200 else set()

        calls = {
            "search_docs": {"query": "receipts"},
            "read_repo_file": {"path": "README.md"},
            "lint_python": {"code": "x=1\n"},
        }

        def tasks_listed() -> set[str]:
            # Flower's event receiver starts a little after its web server: a call
            # made before it listens is never seen, so call again what is missing.
            names = task_names()
            for tool in TOOLS:
                if f"tool.{tool}" not in names:
                    assert client.call(tool, calls[tool], wait=True).status == "completed"
            return names if {f"tool.{t}" for t in TOOLS} <= names else set()

        names = wait_for(tasks_listed, timeout=40, interval=1.0, what="per-tool tasks in flower")
        assert {f"tool.{t}" for t in TOOLS} <= names

        # A tool's workers may publish events: what is not an event does not stop Flower's
        # receiver (control.broker.screen).
        redis = stack.services.redis()
        db = redis.connection_pool.connection_kwargs["db"]
        typeless = json.dumps(  # a well-formed envelope of an event without a type
            {
                "body": base64.b64encode(b"{}").decode(),
                "content-type": "application/json",
                "content-encoding": "utf-8",
                "headers": {},
                "properties": {
                    "body_encoding": "base64",
                    "delivery_tag": "e",
                    "delivery_info": {"exchange": "celeryev", "routing_key": "task.received"},
                },
            }
        ).encode()
        junk = (b"\xff", b"[1]", b"{}", b'{"properties": 1}', b"[" * 5000 + b"]" * 5000, typeless)
        for junk_event in junk:
            redis.publish(f"/{db}.celeryev/task.received", junk_event)
        after = client.call("read_repo_file", {"path": "README.md"}, wait=True)

        def seen_after() -> bool:
            status, body = get(f"{base}/api/tasks", auth)
            return status == 200 and any(after.run_id in task_id for task_id in body or {})

        wait_for(seen_after, timeout=20, interval=0.5, what="a task after the junk events")
        assert flower.poll() is None
    finally:
        flower.terminate()
        flower.wait(timeout=10)
        plane.engine.dispose()
