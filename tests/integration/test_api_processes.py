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


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
            # as a server that means to share would: with SO_REUSEPORT this bind succeeds
            # if (and only if) the API's socket has it too; without it, it never could
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


def test_down_stops_api_processes_whose_supervisor_died(stack: Stack, tmp_path: Path) -> None:
    """The API's supervisor is killed (OOM killer, SIGKILL): its processes live on in its
    process group, still serving the port. Stopping the processes must stop them too, or
    they outlive `toolplane down` and the next `up` cannot bind the port."""
    from control.ops.processes import ProcessSpec, start_processes, stop_processes

    port = free_port()
    env = dict(stack.env, TOOLPLANE_API_BIND=f"127.0.0.1:{port}", TOOLPLANE_API_PROCESSES="2")
    home = tmp_path / "home"  # a registry of its own: not the stack's processes
    [entry] = start_processes(
        home, [ProcessSpec("api", [sys.executable, "-m", "control.cli", "api"], env)]
    )
    leader = psutil.Process(int(str(entry["pid"])))
    orphans: set[int] = set()
    try:
        wait_for(lambda: listening(port) and serving(leader, 2), timeout=60, what="2 API processes")
        orphans = servers(leader)
        leader.kill()
        wait_for(
            lambda: not leader.is_running() or leader.status() == psutil.STATUS_ZOMBIE,
            timeout=30,
            what="the supervisor to die",
        )
        # Its processes are told to stop when it dies (PR_SET_PDEATHSIG); whether they are
        # still shutting down or gone already, stopping the processes leaves none behind.
        stop_processes(home, timeout=10)
        wait_for(
            lambda: not any(running(p) for p in orphans),
            timeout=20,
            what=f"the API processes {sorted(orphans)} to stop with their group",
        )
        assert not listening(port)
    finally:
        for pid in orphans:  # ours: started by this test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            leader.kill()
