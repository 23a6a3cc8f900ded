"""`toolplane up --detach` / `down` against external services: nothing embedded starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from celery import Celery
from sqlalchemy.engine import make_url

import celeryconfig
from ledger.roles import runtime_role_name
from tests.harness import REPO, Services, Stack, make_env, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(150)
def test_up_and_down_with_external_services(services: Services, tmp_path: Path) -> None:
    # A second stack of our own, on its own Redis database, so the session stack is untouched.
    env = make_env(services, tmp_path / "home")
    env["TOOLPLANE_BROKER_URL"] = services.spare_redis_url()  # its own queues
    env["TOOLPLANE_EXTRA_TOOLS"] = ""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "control.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )

    up = cli("up", "--detach", "--workers", "read_repo_file=2")
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert "embedded" not in up.stdout
        assert not (tmp_path / "home" / "embedded.json").exists()
        entries = json.loads((tmp_path / "home" / "run" / "processes.json").read_text())
        assert {e["name"] for e in entries} == {
            "control",
            "api",  # the API's processes, beside the control's results ingest
            "worker-read_repo_file",
            "worker-search_docs",
            "worker-lint_python",
        }
        # workers never get the database URL; the control gets the runtime role's
        role = runtime_role_name(services.database)
        assert f"the control connects as database role {role}" in up.stdout
        for entry in entries:
            environ = psutil.Process(entry["pid"]).environ()
            ours = entry["name"] in ("control", "api")  # the control's own processes
            assert ("TOOLPLANE_DATABASE_URL" in environ) == ours
            if ours:
                assert make_url(environ["TOOLPLANE_DATABASE_URL"]).username == role
        token = json.loads(cli("tenant", "create", "updown", "--json").stdout)["token"]
        env["TOOLPLANE_TOKEN"] = token
        called = cli("call", "read_repo_file", "--arg", "path=README.md", "--wait", "--json")
        assert called.returncode == 0, called.stderr
    finally:
        down = cli("down")
    assert down.returncode == 0
    assert "control" in down.stdout and "redis" not in down.stdout
    for entry in entries:
        assert (
            not psutil.pid_exists(entry["pid"]) or psutil.Process(entry["pid"]).status() == "zombie"
        )


def test_pickle_is_refused_and_never_runs(stack: Stack, tmp_path: Path) -> None:
    app = Celery("attacker", set_as_current=False)
    app.conf.update(celeryconfig.build_config(stack.services.redis_url))
    app.conf.accept_content = ["json", "pickle"]  # the attacker's side may send anything
    before = stack.log("worker-sleepy").count("job.start job=")
    app.send_task(
        "tool.sleepy",
        args=[{"seconds": 0}],
        queue="tool.sleepy",
        serializer="pickle",
    )
    wait_for(
        lambda: (
            "ContentDisallowed" in stack.log("worker-sleepy")
            or "disallowed" in stack.log("worker-sleepy").lower()
        ),
        timeout=20,
        what="the worker to refuse pickle",
    )
    assert stack.log("worker-sleepy").count("job.start job=") == before
    assert psutil.Process(stack.worker_pid("sleepy")).is_running()


@pytest.mark.timeout(150)
def test_up_in_the_foreground_restarts_what_exits_and_down_stops_it(
    services: Services, tmp_path: Path
) -> None:
    """`toolplane up` supervises: a control process that dies (kill -9, or a Celery consumer
    lost in a broker restart) is started again; `down` stops the supervisor first, so that
    nothing it stops comes back."""
    import os
    import signal

    env = make_env(services, tmp_path / "home")
    env["TOOLPLANE_BROKER_URL"] = services.spare_redis_url()
    env["TOOLPLANE_EXTRA_TOOLS"] = ""
    state = tmp_path / "home" / "run" / "processes.json"

    def control_pid() -> int | None:
        if not state.exists():
            return None
        for entry in json.loads(state.read_text()):
            if entry["name"] == "control" and psutil.pid_exists(entry["pid"]):
                if psutil.Process(entry["pid"]).status() != "zombie":
                    return int(entry["pid"])
        return None

    up = subprocess.Popen(
        [sys.executable, "-m", "control.cli", "up", "--workers", "search_docs=1"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (tmp_path / "home" / "run" / "supervisor.json").exists(), timeout=90)
        first = control_pid()
        assert first is not None
        os.killpg(first, signal.SIGKILL)
        second = wait_for(lambda: (p := control_pid()) and p != first and p, timeout=30)
        entries = json.loads(state.read_text())
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "control.cli", "down"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
        )
        _, up_stderr = up.communicate(timeout=60)
    assert down.returncode == 0, down.stderr
    assert up.returncode == 0, up_stderr
    assert "control had exited: started again" in up_stderr
    time.sleep(2)  # a supervisor still running would have started something again by now
    for entry in entries:
        assert not psutil.pid_exists(entry["pid"]) or psutil.Process(entry["pid"]).status() in (
            "zombie",
        )
    assert second != first
