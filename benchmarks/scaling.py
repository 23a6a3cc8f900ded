"""Per-tool scaling: a waiting tool's throughput as its pool grows; another tool's pool untouched.

The stack runs ``sleepy`` (tests/fixture_tools.py: it sleeps, so its work waits and
costs no CPU) and a bystander tool (read_repo_file), each with its own worker, through
the whole governed path (policy, signed envelope, claim, bubblewrap runner, receipt,
verified ingest, ledger). The sleepy worker's pool is resized with Celery's remote
control (``pool_grow`` / ``pool_shrink``), as an operator does from Flower: the same
worker process gets more pool children and a prefetch count raised to match.

For each sleep time, the pool starts at the first level and grows level by level;
at each level, rounds of ``per_process x pool`` sleepy calls are submitted at once by
a pool of threads and timed from the first submit to the last completion. Meanwhile
another process (another agent) calls the bystander one call at a time, and the
bystander worker's pid, pool children and prefetch count are compared with what they
were before the first level. CPU is accounted per process, so that it shows where
scaling stops.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.progress import Progress
from rich.table import Table

from benchmarks.usage import cpu_snapshot, others_by_name, others_cpu, tree_pids
from tests.harness import start_services, start_stack, stop_stack, wait_for

__all__ = ["add_arguments", "chart", "run", "tables", "write"]

TOOL = "sleepy"
FILE = "src/shipit/deploy.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scaling")
    group.add_argument(
        "--levels", default="1,2,4,8", help="sleepy pool sizes to measure, growing from 1"
    )
    group.add_argument(
        "--sleep", default="0.2,0.5", help="seconds each sleepy call waits (one pass each)"
    )
    group.add_argument(
        "--per-process", type=int, default=12, help="sleepy calls per pool process per round"
    )
    group.add_argument("--scaling-rounds", type=int, default=5, help="rounds per pool size")
    group.add_argument(
        "--tenants", type=int, default=1, help="tenants the sleepy calls come from (round robin)"
    )
    group.add_argument("--bystander", default="read_repo_file", help="the tool left alone")
    group.add_argument(
        "--probe-every", type=float, default=0.5, help="seconds between bystander calls"
    )


# -- the worker's own view of its pool ------------------------------------------------


def pool(app: Any, worker: str) -> dict[str, Any]:
    """The worker's pid, pool children and prefetch count, as it reports them itself
    (its ``max-concurrency`` stays what it started with, so it is left out)."""
    replies = app.control.inspect(destination=[worker], timeout=2.0).stats() or {}
    stats = replies[worker]
    return {
        "pid": stats["pid"],
        "processes": sorted(stats["pool"]["processes"]),
        "prefetch_count": stats["prefetch_count"],
    }


def resize(app: Any, worker: str, size: int) -> dict[str, Any]:
    """Grow or shrink the worker's pool to ``size`` children, and wait until it has."""
    have = len(pool(app, worker)["processes"])
    if size != have:
        command = app.control.pool_grow if size > have else app.control.pool_shrink
        replies = command(abs(size - have), destination=[worker], reply=True, timeout=5)
        assert replies and "ok" in replies[0][worker], replies
    return wait_for(
        lambda: (p := pool(app, worker)) and len(p["processes"]) == size and p,
        timeout=30,
        what=f"{worker} to have {size} pool processes",
    )


# -- the bystander's agent, a process of its own ----------------------------------------


def probe_loop(settings: Any, tool: str, every_s: float, stop: Any, out: Any) -> None:
    """Call ``tool`` one call at a time until ``stop``; put (start, end, ms) on ``out``."""
    from control.orchestration.operations import Operations as Client

    client = Client.from_env(settings)
    try:
        while not stop.wait(every_s):
            start = time.time()
            view = client.call(tool, {"path": FILE}, wait=True, timeout=60)
            end = time.time()
            if view.status != "completed":
                out.put(("error", f"{tool} call {view.run_id} ended {view.status}"))
                return
            out.put((start, end, (end - start) * 1000))
    finally:
        client.plane.engine.dispose()


class Probe:
    """Latency samples of the bystander, taken by another process all along."""

    def __init__(self, settings: Any, tool: str, *, every_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._out: Any = ctx.Queue()
        self._samples: list[tuple[float, float, float]] = []
        self.process = ctx.Process(
            target=probe_loop, args=(settings, tool, every_s, self._stop, self._out), daemon=True
        )
        self.process.start()
        assert self.process.pid is not None
        self.pid: int = self.process.pid

    def _drain(self) -> None:
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            if item[0] == "error":
                raise AssertionError(item[1])
            self._samples.append(item)

    def between(self, since: float, until: float) -> list[float]:
        """Latencies (ms) of the calls that started and ended within [since, until]."""
        self._drain()
        return [ms for start, end, ms in self._samples if since <= start and end <= until]

    def wait_samples(self, n: int, *, since: float) -> list[float]:
        wait_for(lambda: len(self.between(since, time.time())) >= n, timeout=120, what="probe")
        return self.between(since, time.time())

    def close(self) -> None:
        self._stop.set()
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.terminate()


class QueueDepth:
    """Messages waiting in broker queues (kombu's Redis lists, all priorities), sampled
    on a thread of its own while measuring: where calls wait for a consumer."""

    PRIORITIES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's Redis keys

    def __init__(self, redis: Any, queues: list[str], *, every_s: float = 0.05) -> None:
        self.redis, self.queues, self.every_s = redis, queues, every_s
        self.samples: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _depth(self, queue: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for suffix in self.PRIORITIES:
            pipe.llen(queue + suffix)
        return int(sum(pipe.execute()))

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            for q in self.queues:
                self.samples[q].append(self._depth(q))

    def __enter__(self) -> QueueDepth:
        self.samples = {q: [] for q in self.queues}
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            q: {"mean": statistics.fmean(v), "max": max(v)} for q, v in self.samples.items() if v
        }


# -- measuring --------------------------------------------------------------------------


def batch(clients: list[Any], submit: ThreadPoolExecutor, n: int, seconds: float) -> float:
    """Submit ``n`` sleepy calls at once, round robin over the tenants' clients; seconds
    until the last one completed."""

    def one(i: int) -> tuple[int, str]:
        k = i % len(clients)
        return k, clients[k].submit(TOOL, {"seconds": seconds, "tag": str(i)})

    start = time.perf_counter()
    ids = list(submit.map(one, range(n)))
    for k, client in enumerate(clients):
        mine = [run for c, run in ids if c == k]
        statuses = client.wait_all(mine, timeout=120)
        assert len(statuses) == len(mine) and set(statuses.values()) <= {"completed"}, statuses
    return time.perf_counter() - start


def step(
    size: int,
    sleep: float,
    *,
    clients: list[Any],
    submit: ThreadPoolExecutor,
    probe: Probe,
    queues: QueueDepth,
    trees: dict[str, int],
    ns: argparse.Namespace,
) -> dict[str, Any]:
    n = ns.per_process * size
    batch(clients, submit, 2 * size, sleep)  # new pool children start their runners
    alone = {"client (submit, wait)": psutil.Process().pid}
    others = others_cpu(tree_pids([*trees.values(), *alone.values()]))
    before, since, start = cpu_snapshot(trees, alone), time.time(), time.perf_counter()
    with queues:
        rates = [n / batch(clients, submit, n, sleep) for _ in range(ns.scaling_rounds)]
    after, until, elapsed = cpu_snapshot(trees, alone), time.time(), time.perf_counter() - start
    elsewhere = others_by_name(others, others_cpu(tree_pids([*trees.values(), *alone.values()])))
    cores = {name: (after[name] - before[name]) / elapsed for name in after}
    latency = probe.between(since, until)
    return {
        "pool": size,
        "calls_per_round": n,
        "throughput_rounds": rates,
        "throughput_per_s": statistics.median(rates),
        "ideal_per_s": size / sleep,
        # CPU seconds per second of each process (tree); "machine": all processes
        "cores_busy": cores,
        "cores_busy_elsewhere": {
            k: v / elapsed for k, v in elsewhere.items() if v / elapsed >= 0.01
        },
        "machine_cpu_pct": cores["machine"] / (psutil.cpu_count() or 1) * 100,
        "bystander_latency_ms": latency,
        "bystander_latency_p50_ms": statistics.median(latency),
        "bystander_latency_max_ms": max(latency),
        "queue_depth": queues.summary(),  # messages waiting for a consumer
    }


def one_pass(
    sleep: float,
    levels: list[int],
    *,
    app: Any,
    clients: list[Any],
    submit: ThreadPoolExecutor,
    probe: Probe,
    queues: QueueDepth,
    trees: dict[str, int],
    ns: argparse.Namespace,
    progress: Progress,
) -> dict[str, Any]:
    host = socket.gethostname()
    tool_worker, other_worker = f"{TOOL}@{host}", f"{ns.bystander}@{host}"
    resize(app, tool_worker, levels[0])
    batch(clients, submit, 2 * levels[0], sleep)
    tool_pid = pool(app, tool_worker)["pid"]
    other_before = pool(app, other_worker)
    idle = probe.wait_samples(12, since=time.time())  # the bystander alone
    task = progress.add_task(f"scaling: {TOOL} {sleep:g} s, pool {ns.levels}", total=len(levels))
    steps = []
    for size in levels:
        grown = resize(app, tool_worker, size)
        result = step(
            size,
            sleep,
            clients=clients,
            submit=submit,
            probe=probe,
            queues=queues,
            trees=trees,
            ns=ns,
        )
        other = pool(app, other_worker)
        result["tool_pool"] = grown
        result["tool_worker_same_process"] = grown["pid"] == tool_pid
        result["bystander_pool"] = other
        result["bystander_untouched"] = other == other_before
        steps.append(result)
        progress.advance(task)
    first = steps[0]
    for s in steps:
        s["speedup"] = s["throughput_per_s"] / first["throughput_per_s"]
        s["ideal_speedup"] = s["pool"] / first["pool"]
    return {
        "sleep_s": sleep,
        "bystander_pool_before": other_before,
        "bystander_idle_latency_ms": idle,
        "bystander_idle_latency_p50_ms": statistics.median(idle),
        "steps": steps,
    }


def run(ns: argparse.Namespace, *, progress: Progress) -> dict[str, Any]:
    levels = [int(x) for x in ns.levels.split(",")]
    sleeps = [float(x) for x in ns.sleep.split(",")]
    if levels != sorted(set(levels)) or levels[0] < 1:
        raise SystemExit("--levels: growing pool sizes, from 1 up")
    tmp = Path(tempfile.mkdtemp(prefix="tpbench-scaling-"))
    services = start_services(tmp)
    stack = probe = None
    passes = []
    try:
        progress.console.print("starting the scaling stack…")
        stack = start_stack(
            services, tmp / "home", workers={TOOL: levels[0], ns.bystander: ns.workers}
        )
        clients = [stack.client(stack.tenant(f"scaling-{i}")) for i in range(ns.tenants)]
        probe = Probe(
            stack.settings(stack.tenant("bystander")), ns.bystander, every_s=ns.probe_every
        )
        trees = {
            "control": stack.pid("control"),
            f"worker-{TOOL}": stack.pid(f"worker-{TOOL}"),
            f"worker-{ns.bystander}": stack.pid(f"worker-{ns.bystander}"),
            "bystander's agent": probe.pid,
        }
        queues = QueueDepth(services.redis(), ["results", f"tool.{TOOL}", f"tool.{ns.bystander}"])
        with ThreadPoolExecutor(max_workers=max(ns.submitters, levels[-1])) as submit:
            for sleep in sleeps:
                passes.append(
                    one_pass(
                        sleep,
                        levels,
                        app=clients[0].plane.celery,
                        clients=clients,
                        submit=submit,
                        probe=probe,
                        queues=queues,
                        trees=trees,
                        ns=ns,
                        progress=progress,
                    )
                )
    finally:
        if probe is not None:
            probe.close()
        if stack is not None:
            stop_stack(stack)
        services.close()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
        "settings": dict(vars(ns)),
        "tool": TOOL,
        "bystander": ns.bystander,
        "resize": "celery remote control pool_grow / pool_shrink on the running worker",
        "passes": passes,
    }


# -- reporting --------------------------------------------------------------------------


def cores(step: dict[str, Any]) -> list[str]:
    """Cores busy: the client, control, the tool workers, PostgreSQL, and the rest (Redis,
    the bystander's agent, the kernel, processes that came and went, other load)."""
    busy = step["cores_busy"]
    client = busy["client (submit, wait)"]
    workers = sum(v for k, v in busy.items() if k.startswith("worker-"))
    postgres = step["cores_busy_elsewhere"].get("postgres", 0.0)
    rest = busy["machine"] - client - busy["control"] - workers - postgres
    return [f"{v:.2f}" for v in (busy["machine"], client, busy["control"], workers, postgres, rest)]


def tables(result: dict[str, Any]) -> list[Table]:
    tool, other = result["tool"], result["bystander"]
    out = []
    cpu = Table(
        "sleep", "pool", "machine", "client", "control", "workers", "PostgreSQL", "rest",
        "results queued",
        title="cores busy while measuring (CPU s per s; the machine has "
        f"{result['machine']['cpus']}), results waiting for the control (mean / max)",
    )  # fmt: skip
    for one in result["passes"]:
        t = Table(
            "pool",
            "calls/s",
            "ideal calls/s",
            "speedup (ideal)",
            "CPU",
            f"{other} p50 / max ms",
            "its pool untouched",
            title=(
                f"{tool} at {one['sleep_s']:g} s per call ({other} alone: "
                f"p50 {one['bystander_idle_latency_p50_ms']:.0f} ms)"
            ),
        )
        for s in one["steps"]:
            t.add_row(
                str(s["pool"]),
                f"{s['throughput_per_s']:.1f}",
                f"{s['ideal_per_s']:.1f}",
                f"{s['speedup']:.2f} ({s['ideal_speedup']:g})",
                f"{s['machine_cpu_pct']:.0f} %",
                f"{s['bystander_latency_p50_ms']:.0f} / {s['bystander_latency_max_ms']:.0f}",
                "yes" if s["bystander_untouched"] else "NO",
            )
            queued = s["queue_depth"].get("results", {"mean": 0.0, "max": 0})
            cpu.add_row(
                f"{one['sleep_s']:g} s",
                str(s["pool"]),
                *cores(s),
                f"{queued['mean']:.1f} / {queued['max']}",
            )
        out.append(t)
    return [*out, cpu]


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [s["pool"] for s in result["passes"][0]["steps"]]
    a.plot(sizes, [s / sizes[0] for s in sizes], "--", color="#999", label="ideal")
    for one, color in zip(result["passes"], ["#2a6", "#36a", "#a63", "#a36"], strict=False):
        steps, label = one["steps"], f"{one['sleep_s']:g} s per call"
        a.plot(sizes, [s["speedup"] for s in steps], "o-", color=color, label=label)
        b.plot(
            sizes, [s["bystander_latency_p50_ms"] for s in steps], "o-", color=color, label=label
        )
        b.axhline(one["bystander_idle_latency_p50_ms"], ls=":", color=color)
    for ax in (a, b):
        ax.set_xlabel(f"{result['tool']} pool processes")
        ax.set_xticks(sizes)
        ax.legend()
    a.set_title(f"{result['tool']} throughput, speedup over pool {sizes[0]}")
    b.set_title(f"{result['bystander']} latency p50 meanwhile (ms; dotted: alone)")
    b.set_ylim(bottom=0)
    fig.suptitle(f"per-tool scaling — {result['date']} ({result['machine']['cpus']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(result: dict[str, Any], results: Path, stem: str) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{stem}-scaling.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    chart(result, results / f"{stem}-scaling.png")
    return path
