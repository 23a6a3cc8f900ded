"""Several API processes on one socket (TOOLPLANE_API_PROCESSES): they share the work,
one that dies is started again, and no other server can take a share of the port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import REPO, Stack, free_port, wait_for

pytestmark = pytest.mark.integration


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def servers(parent: psutil.Process) -> set[int]:
    """The API processes the supervisor started (not multiprocessing's resource tracker)."""
    found = set()
    for child in parent.children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
    return found


def serving(parent: psutil.Process, count: int) -> bool:
    return len(servers(parent)) == count


@contextlib.contextmanager
def api_processes(stack: Stack, tmp: Path, count: int) -> Iterator[tuple[int, psutil.Process]]:
    port = free_port()
    env = dict(
        stack.env, TOOLPLANE_API_BIND=f"127.0.0.1:{port}", TOOLPLANE_API_PROCESSES=str(count)
    )
    log = open(tmp / "api.log", "wb")  # noqa: SIM115 - the child's
    proc = subprocess.Popen(
        [sys.executable, "-m", "control.cli", "api"], env=env, cwd=REPO, stdout=log, stderr=log
    )
    try:
        parent = psutil.Process(proc.pid)
        wait_for(
            lambda: (listening(port) and serving(parent, count)) or proc.poll() is not None,
            timeout=60,
            what=f"{count} API processes",
        )
        assert proc.poll() is None, (tmp / "api.log").read_text()
        yield port, parent
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_api_processes_share_one_socket_and_one_that_dies_is_replaced(
    stack: Stack, tmp_path: Path
) -> None:
    token = stack.tenant()
    with api_processes(stack, tmp_path, 2) as (port, parent):
        first = servers(parent)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            headers = {"Authorization": f"Bearer {token}"}
            run = http.post(
                "/v1/calls", json={"tool": "search_docs", "args": {"query": "x"}}, headers=headers
            )
            assert run.status_code == 201, run.text
            # a second server on the port is refused, it does not get a share of its calls
            other = socket.socket()
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="in use"):
                other.bind(("127.0.0.1", port))
            other.close()
            victim = sorted(first)[0]
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: serving(parent, 2) and victim not in servers(parent),
                timeout=60,
                what="the supervisor to start another API process",
            )
            for _ in range(10):  # every process answers: none is a dead end
                answer = http.get(f"/v1/runs/{run.json()['run_id']}", headers=headers)
                assert answer.status_code == 200, answer.text
