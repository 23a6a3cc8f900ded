"""Structured logs from real processes: a stack started with TOOLPLANE_LOG_FORMAT=json (its
control process with the API, and a sandbox worker) writes nothing but JSON objects, Celery's
and uvicorn's lines included; a completed call's lines carry its ids; no secret shows.
A bad format is a usage error (exit 2) naming the option and the formats."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy.engine import make_url

from tests.harness import (
    REPO,
    Services,
    Stack,
    make_env,
    own_stack,
)
from toolplane.errors import ToolplaneError
from toolplane.tracecontext import run_trace

pytestmark = pytest.mark.integration

TOOL = "read_repo_file"
KEYS = {"ts", "level", "logger", "event", "message"}


@pytest.fixture(scope="module")
def json_stack(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Its own results queue: no other stack's control takes them."""
    home = Path(tmp_path_factory.mktemp("json-logs"))
    with own_stack(
        services, home, workers={TOOL: 1}, extra_env={"TOOLPLANE_LOG_FORMAT": "json"}
    ) as running:
        yield running


def parsed(stack: Stack, name: str) -> list[dict[str, Any]]:
    """Every line of a process's log, each of which must be one JSON object."""
    lines = []
    for number, line in enumerate(stack.log(name).splitlines(), 1):
        try:
            obj = json.loads(line)
        except ValueError:
            pytest.fail(f"{name}.log line {number} is not JSON: {line[:300]!r}")
        assert isinstance(obj, dict), f"{name}.log line {number}: {line[:300]!r}"
        assert KEYS <= obj.keys(), f"{name}.log line {number} lacks {KEYS - obj.keys()}"
        assert obj["ts"].endswith("Z"), obj["ts"]
        datetime.fromisoformat(obj["ts"])  # RFC 3339
        assert "." in obj["event"] or obj["logger"] == obj["event"], obj
        lines.append(obj)
    assert lines, f"{name}.log is empty"
    return lines


def test_a_completed_call_logs_json_with_its_ids(json_stack: Stack) -> None:
    token = json_stack.tenant()
    with json_stack.http(token) as client:
        view = client.call(TOOL, {"path": "README.md"}, wait=True, timeout=60)
    assert view.status == "completed", view
    node = view.nodes[0]
    job_id = f"{view.run_id}/{node.node_id}/1"

    api = parsed(json_stack, "api")  # intake and dispatch
    control = parsed(json_stack, "control")  # results ingest
    worker = parsed(json_stack, f"worker-{TOOL}")
    decided = [x for x in control if x["event"] == "result.decided"]
    tenant = next(x["tenant"] for x in decided if x.get("run_id") == view.run_id)
    assert tenant.startswith("tn_"), tenant  # the tenant's id
    ours = {"run_id": view.run_id, "node_id": node.node_id, "job_id": job_id, "tenant": tenant}
    ours["trace_id"] = run_trace(view.run_id).trace_id  # the run's trace, in every process

    def events_with_ids(lines: list[dict[str, Any]]) -> set[str]:
        return {x["event"] for x in lines if all(x.get(k) == v for k, v in ours.items())}

    assert "job.dispatched" in events_with_ids(api), [x for x in api if "run_id" in x]
    assert "result.decided" in events_with_ids(control)
    assert {"job.start", "job.ran"} <= events_with_ids(worker)
    submitted = [x for x in api if x["event"] == "run.submitted"]
    assert any(x.get("run_id") == view.run_id and x.get("tenant") == tenant for x in submitted)
    assert any(x["logger"].startswith("uvicorn") for x in api), "no line of uvicorn's"
    # Celery's own lines (its worker's start, tasks received) come out as JSON too
    assert any(x["logger"].startswith("celery") for x in worker), "no line of Celery's"
    assert any(x["logger"].startswith("celery") for x in control), "no line of Celery's"


def test_no_secret_reaches_the_logs(json_stack: Stack) -> None:
    token = json_stack.tenant()
    with json_stack.http(token) as client:
        client.call(TOOL, {"path": "README.md"}, wait=True, timeout=60)
        with contextlib.suppress(ToolplaneError):  # failed or refused: what counts is the log
            client.call(TOOL, {"path": "../../etc/passwd"}, wait=True, timeout=60)
    runtime_password = make_url(json_stack.runtime_url).password
    assert runtime_password, "the control's database URL carries a password"
    secrets = [token, str(runtime_password)]
    for name in ("api", "control", f"worker-{TOOL}"):
        text = json_stack.log(name)
        for secret in secrets:
            assert secret not in text, f"{name}.log shows a secret"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["-m", "control.cli", "up", "--log-format", "xml"], {}, "--log-format"),
        (["-m", "control.cli", "control", "--log-format", "xml"], {}, "--log-format"),
        (["-m", "control.cli", "witness", "--home", "w", "--log-format", "x"], {}, "--log-format"),
        (["-m", "control.cli", "worker", TOOL, "--log-format", "xml"], {}, "--log-format"),
        (["-m", "control.cli", "api"], {"TOOLPLANE_LOG_FORMAT": "yaml"}, "TOOLPLANE_LOG_FORMAT"),
        (["-m", "sandbox_tasks", TOOL, "--log-format", "xml"], {}, "--log-format"),
        (["-m", "sandbox_tasks", TOOL], {"TOOLPLANE_LOG_FORMAT": "yaml"}, "TOOLPLANE_LOG_FORMAT"),
    ],
)
def test_a_bad_format_is_a_usage_error(argv: list[str], env: dict[str, str], named: str) -> None:
    done = run_cli(*argv, env=env)
    assert done.returncode == 2, done
    assert named in done.stderr and "text, json" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.timeout(150)
def test_up_hands_its_format_to_every_process_it_starts(services: Services, tmp_path: Path) -> None:
    """`toolplane up --log-format json`: the control, the API and each worker log JSON only."""
    env = make_env(services, tmp_path / "home")
    env["TOOLPLANE_BROKER_URL"] = services.spare_redis_url()  # its own queues
    env["TOOLPLANE_EXTRA_TOOLS"] = ""
    env.pop("TOOLPLANE_LOG_FORMAT", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "control.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )

    up = cli("up", "--detach", "--log-format", "json", "--workers", "read_repo_file=1")
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        entries = json.loads((tmp_path / "home" / "run" / "processes.json").read_text())
        assert {"control", "api", "worker-read_repo_file"} <= {e["name"] for e in entries}
        for entry in entries:
            environ = psutil.Process(entry["pid"]).environ()
            assert environ.get("TOOLPLANE_LOG_FORMAT") == "json", entry["name"]
        stack = Stack(services=services, home=tmp_path / "home", env=env)
        for entry in entries:
            assert any(x["event"] for x in parsed(stack, str(entry["name"])))
    finally:
        cli("down")
