"""One tool's service scaled to 3 containers: its work spreads over them, another tool's latency holds."""

from __future__ import annotations

import statistics
import threading
import time

from tests.containers.stack import Stack

SCALED = "worker-lint_python"


def handled_by(stack: Stack, container: str) -> int:
    """Jobs this worker container finished, from its log (Celery's `succeeded` lines)."""
    return stack.logs(container, tail=None).count("succeeded in")


def read_latency(stack: Stack, n: int) -> list[float]:
    out = []
    with stack.client() as client:
        for _ in range(n):
            t0 = time.monotonic()
            run = client.call(
                "read_repo_file", {"path": "src/shipit/deploy.py"}, wait=True, timeout=120
            )
            out.append(time.monotonic() - t0)
            assert run.status == "completed", run.nodes[0].error
    return out


def test_three_replicas_share_the_work(cstack: Stack) -> None:
    alone = read_latency(cstack, 5)
    containers = [cstack.compose.container(SCALED, 1)]
    for index in (2, 3):
        containers.append(cstack.start(SCALED, index))
    for name in containers[1:]:
        cstack.wait_healthy(name)
    before = {c: handled_by(cstack, c) for c in containers}
    loaded: list[float] = []
    reader = threading.Thread(target=lambda: loaded.extend(read_latency(cstack, 5)))
    with cstack.client() as client:
        code = "import subprocess\nsubprocess.call(['ls'])\n"
        runs = client.call_many([{"tool": "lint_python", "args": {"code": code}}] * 36)
        reader.start()
        for run in runs:
            done = client.wait(run.run_id, timeout=300)
            assert done.status == "completed", done.nodes[0].error
    reader.join()
    spread = {c: handled_by(cstack, c) - before[c] for c in containers}
    print("lint_python jobs per replica", spread)
    print(
        f"read_repo_file p50 alone {statistics.median(alone) * 1000:.0f} ms, "
        f"under load {statistics.median(loaded) * 1000:.0f} ms"
    )
    cstack.timings["read_p50_alone_ms"] = statistics.median(alone) * 1000
    cstack.timings["read_p50_loaded_ms"] = statistics.median(loaded) * 1000
    assert sum(spread.values()) == 36
    assert all(n > 0 for n in spread.values()), spread
    assert statistics.median(loaded) < 5 * statistics.median(alone) + 1.0
