"""`toolplane up --detach` / `down` against external services: nothing embedded starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from celery import Celery

import celeryconfig
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
            "worker-read_repo_file",
            "worker-search_docs",
            "worker-lint_python",
        }
        # workers never get the database URL
        for entry in entries:
            environ = psutil.Process(entry["pid"]).environ()
            assert ("TOOLPLANE_DATABASE_URL" in environ) == (entry["name"] == "control")
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
