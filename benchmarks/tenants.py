"""Many tenants at once: throughput with 20 tenants submitting concurrently against one.

The same number of calls, from the same pool of submitting threads, through the API; in
one case every call is one tenant's, in the other the calls are spread over 20 tenants
(20 tokens, each thread taking the next). Rounds alternate between the two so that the
machine's noise hits both alike. Each tenant has its own evidence chain, locked only by
its own appends, so 20 tenants must not be slower than one.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.progress import Progress

from tests.harness import start_services, start_stack, stop_stack

__all__ = ["run"]

FILE = "src/shipit/deploy.py"


def _round(pool: ThreadPoolExecutor, clients: list[Any], calls: int) -> float:
    turn = itertools.cycle(range(len(clients)))
    lock = threading.Lock()

    def submit(_: int) -> tuple[int, str]:
        with lock:
            which = next(turn)
        return which, clients[which].submit("read_repo_file", {"path": FILE})

    def wait(which: int) -> None:  # each tenant follows its own runs, all at once
        mine = [run_id for w, run_id in submitted if w == which]
        if mine:
            statuses = clients[which].wait_all(mine, timeout=300)
            assert set(statuses.values()) == {"completed"}, statuses

    start = time.perf_counter()
    submitted = list(pool.map(submit, range(calls)))
    with ThreadPoolExecutor(len(clients)) as waiters:
        list(waiters.map(wait, range(len(clients))))
    return calls / (time.perf_counter() - start)


def run(
    *, tenants: int, calls: int, rounds: int, submitters: int, progress: Progress
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tptenants-"))
    services = start_services(tmp)
    stack = None
    try:
        stack = start_stack(services, tmp / "home", workers={"read_repo_file": 2})
        many = [stack.http(stack.tenant(f"t{i:02d}")) for i in range(tenants)]
        one = [stack.http(stack.tenant("solo"))]
        pool = ThreadPoolExecutor(submitters)
        for client in [*one, *many]:  # warm every tenant's path (connections, chain head)
            client.call("read_repo_file", {"path": FILE}, wait=True)
        task = progress.add_task(f"1 tenant vs {tenants} tenants", total=2 * rounds)
        figures: dict[str, list[float]] = {"one": [], "many": []}
        for _ in range(rounds):
            figures["one"].append(_round(pool, one, calls))
            progress.advance(task)
            figures["many"].append(_round(pool, many, calls))
            progress.advance(task)
        one_tput = statistics.median(figures["one"])
        many_tput = statistics.median(figures["many"])
        return {
            "tenants": tenants,
            "calls_per_round": calls,
            "submitters": submitters,
            "one_tenant_throughput_per_s": one_tput,
            "many_tenants_throughput_per_s": many_tput,
            "rounds": figures,
            "ratio": {"many_to_one_tenant_throughput": many_tput / one_tput},
        }
    finally:
        if stack is not None:
            stop_stack(stack)
        services.close()
