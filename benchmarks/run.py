"""``make bench``: the governed path against bare Celery, side by side, in one run.

Both sides do the same work (read_repo_file's function on the same file) on the
same broker and machine, with the same number of worker processes. Rounds are
interleaved (bare, governed, bare, ...) so machine noise hits both alike.
Writes benchmarks/results/<date>.json and a PNG chart, and prints the table.
Then the per-tool scaling benchmark (benchmarks/scaling.py) on a stack of its own:
benchmarks/results/<date>-scaling.json and its chart. The per-call cost of containment
(benchmarks/containment.py) is in the components of <date>.json; ``--only containment``
measures it alone, beside the figure of an earlier run, into <date>-containment.json.
``--only observability`` measures what metrics and tracing cost (benchmarks/observability.py:
three stacks, off, metrics, metrics and tracing) into <date>-observability.json.
``--only`` runs one part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import bare, components, containment, growth, observability, scaling, tenants
from benchmarks.figures import chart, table
from benchmarks.targets import targets, targets_table
from benchmarks.usage import backend_cpu_s, cpu_per_call, rss_mb
from tests.harness import REPO, start_services, start_stack, stop_stack, wait_for

RESULTS = REPO / "benchmarks" / "results"
FILE = "src/shipit/deploy.py"
console = Console()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Sides:
    """The two things being compared, each with a throughput and a latency probe."""

    def __init__(
        self, bare_app: Any, client: Any, api: Any, *, submitters: int, sandboxed_app: Any
    ) -> None:
        self.bare_app = bare_app
        self.sandboxed_app = sandboxed_app  # bare Celery, the tool in a warm runner
        self.client = client  # the control's operations, in this process
        self.api = api  # control.client.Client: what users call, over HTTP
        # Governed calls come from many agents at once: submit from a pool of threads.
        self.pool = ThreadPoolExecutor(max_workers=submitters)

    def bare_batch(self, n: int, *, sandboxed: bool = False) -> float:
        app = self.sandboxed_app if sandboxed else self.bare_app
        task, queue = (
            (bare.SANDBOXED_TASK, bare.SANDBOXED_QUEUE) if sandboxed else (bare.TASK, bare.QUEUE)
        )
        start = time.perf_counter()
        pending = [app.send_task(task, args=[FILE], queue=queue) for _ in range(n)]
        for result in pending:
            assert result.get(timeout=60)["path"] == FILE
        return time.perf_counter() - start

    def governed_batch(self, n: int) -> float:
        start = time.perf_counter()
        ids = list(
            self.pool.map(lambda _: self.client.submit("read_repo_file", {"path": FILE}), range(n))
        )
        statuses = self.client.wait_all(ids, timeout=120)
        assert set(statuses.values()) == {"completed"}, statuses
        return time.perf_counter() - start

    def api_batch(self, n: int) -> float:
        start = time.perf_counter()
        ids = list(
            self.pool.map(lambda _: self.api.submit("read_repo_file", {"path": FILE}), range(n))
        )
        statuses = self.api.wait_all(ids, timeout=120)
        assert set(statuses.values()) == {"completed"}, statuses
        return time.perf_counter() - start

    def api_one(self) -> float:
        start = time.perf_counter()
        run = self.api.call("read_repo_file", {"path": FILE}, wait=True, timeout=30)
        assert run.status == "completed"
        return time.perf_counter() - start

    def bare_one(self) -> float:
        start = time.perf_counter()
        self.bare_app.send_task(bare.TASK, args=[FILE], queue=bare.QUEUE).get(timeout=30)
        return time.perf_counter() - start

    def sandboxed_one(self) -> float:
        start = time.perf_counter()
        task, queue = bare.SANDBOXED_TASK, bare.SANDBOXED_QUEUE
        self.sandboxed_app.send_task(task, args=[FILE], queue=queue).get(timeout=30)
        return time.perf_counter() - start

    def governed_one(self) -> float:
        start = time.perf_counter()
        view = self.client.call("read_repo_file", {"path": FILE}, wait=True, timeout=30)
        assert view.status == "completed"
        return time.perf_counter() - start


def measure(sides: Sides, *, rounds: int, inflight: int, latency: int, progress: Progress) -> dict:
    sides_ = ("bare", "bare_sandboxed", "governed", "api")
    tput: dict[str, list[float]] = {side: [] for side in sides_}
    lat: dict[str, list[float]] = {side: [] for side in sides_}
    task = progress.add_task("throughput + latency (interleaved)", total=rounds * (4 + 4 * latency))
    for _ in range(rounds):
        tput["bare"].append(inflight / sides.bare_batch(inflight))
        progress.advance(task)
        tput["bare_sandboxed"].append(inflight / sides.bare_batch(inflight, sandboxed=True))
        progress.advance(task)
        tput["governed"].append(inflight / sides.governed_batch(inflight))
        progress.advance(task)
        tput["api"].append(inflight / sides.api_batch(inflight))
        progress.advance(task)
        for _ in range(latency):
            lat["bare"].append(sides.bare_one())
            lat["bare_sandboxed"].append(sides.sandboxed_one())
            lat["governed"].append(sides.governed_one())
            lat["api"].append(sides.api_one())
            progress.advance(task, 4)
    out: dict[str, Any] = {}
    for side in sides_:
        out[side] = {
            "throughput_per_s": statistics.median(tput[side]),
            "throughput_rounds": tput[side],
            "latency_p50_ms": pct(lat[side], 0.5) * 1000,
            "latency_p99_ms": pct(lat[side], 0.99) * 1000,
            "latency_samples": len(lat[side]),
        }
    out["ratio"] = {
        "throughput": out["governed"]["throughput_per_s"] / out["bare"]["throughput_per_s"],
        "latency_p50": out["governed"]["latency_p50_ms"] / out["bare"]["latency_p50_ms"],
        "latency_p99": out["governed"]["latency_p99_ms"] / out["bare"]["latency_p99_ms"],
        "api_throughput": out["api"]["throughput_per_s"] / out["bare"]["throughput_per_s"],
        "api_latency_p50": out["api"]["latency_p50_ms"] / out["bare"]["latency_p50_ms"],
        "api_latency_p99": out["api"]["latency_p99_ms"] / out["bare"]["latency_p99_ms"],
        "api_to_in_process_throughput": out["api"]["throughput_per_s"]
        / out["governed"]["throughput_per_s"],
        # what the clean sandbox per call costs bare Celery, and governance beyond it
        "sandboxed_throughput": out["bare_sandboxed"]["throughput_per_s"]
        / out["bare"]["throughput_per_s"],
        "sandboxed_latency_p50": out["bare_sandboxed"]["latency_p50_ms"]
        / out["bare"]["latency_p50_ms"],
        "api_throughput_to_sandboxed": out["api"]["throughput_per_s"]
        / out["bare_sandboxed"]["throughput_per_s"],
        "api_latency_p50_to_sandboxed": out["api"]["latency_p50_ms"]
        / out["bare_sandboxed"]["latency_p50_ms"],
    }
    return out


def soak(sides: Sides, pids: dict[str, int], *, calls: int, progress: Progress) -> dict:
    """Many governed calls; RSS of each process sampled as they go."""
    batch = 100
    samples: dict[str, list[float]] = {name: [] for name in pids}
    task = progress.add_task(f"memory soak ({calls} governed calls)", total=calls)
    done = 0
    while done < calls:
        n = min(batch, calls - done)
        sides.governed_batch(n)
        done += n
        progress.advance(task, n)
        for name, pid in pids.items():
            samples[name].append(rss_mb(pid))
    report = {}
    for name, values in samples.items():
        tenth = max(1, len(values) // 10)
        early = statistics.median(values[tenth : 2 * tenth] or values[:1])
        late = statistics.median(values[-tenth:])
        report[name] = {
            "peak_mb": max(values),
            "after_10pct_mb": early,
            "last_10pct_mb": late,
            "growth_pct": (late - early) / early * 100,
        }
    return report


def start_bare_worker(
    services: Any, concurrency: int, *, sandboxed: bool = False
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.bare",
            "--broker",
            services.redis_url,
            "--backend",
            services.redis_url,
            "--repo-root",
            str(REPO / "examples" / "repo"),
            "--concurrency",
            str(concurrency),
            *(["--sandboxed"] if sandboxed else []),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def overhead(ns: argparse.Namespace) -> dict[str, Any]:
    """Bare Celery against the governed path, CPU per call, memory soak, components."""
    tmp = Path(tempfile.mkdtemp(prefix="tpbench-"))
    services = start_services(tmp)
    stack = bare_worker = sandboxed_worker = None
    try:
        console.print("starting the governed stack and the bare Celery worker…")
        stack = start_stack(
            services,
            tmp / "home",
            workers={"read_repo_file": ns.workers},
            extra_env=dict(item.split("=", 1) for item in ns.stack_env),
        )
        bare_worker = start_bare_worker(services, ns.workers)
        sandboxed_worker = start_bare_worker(services, ns.workers, sandboxed=True)
        repo = REPO / "examples" / "repo"
        bare_app = bare.make_app(services.redis_url, services.redis_url, repo)
        sandboxed_app = bare.make_app(services.redis_url, services.redis_url, repo, sandboxed=True)
        for name in ("bare", "bare-sandboxed"):
            wait_for(
                lambda name=name: bare_app.control.ping(
                    destination=[f"{name}@{psutil.os.uname().nodename}"], timeout=1
                ),
                timeout=30,
                what=f"{name} worker",
            )
        token = stack.tenant("bench")
        client = stack.client(token)
        api = stack.http(token)
        sides = Sides(bare_app, client, api, submitters=ns.submitters, sandboxed_app=sandboxed_app)
        for _ in range(20):  # warm every path: connections, imports, policy, index, runners
            sides.bare_one()
            sides.sandboxed_one()
            sides.governed_one()
            sides.api_one()
        pids = {
            "api": stack.pid("api"),
            "control": stack.pid("control"),
            "worker-read_repo_file": stack.pid("worker-read_repo_file"),
            "bare-worker": bare_worker.pid,
            "bare-sandboxed-worker": sandboxed_worker.pid,
        }
        with progress_bar() as progress:
            side_by_side = measure(
                sides, rounds=ns.rounds, inflight=ns.inflight, latency=ns.latency, progress=progress
            )
            bare_pids = ("bare-worker", "bare-sandboxed-worker")
            gov_pids = {k: v for k, v in pids.items() if k not in (*bare_pids, "api")}
            me = psutil.Process().pid
            port = int(services.redis_url.rsplit(":", 1)[1].split("/")[0])

            def servers() -> dict[str, float]:
                return backend_cpu_s(port)

            where = {
                "api": cpu_per_call(
                    {k: v for k, v in pids.items() if k not in bare_pids},
                    ("client (submit+wait over HTTP)", me),
                    lambda: sides.api_batch(ns.inflight) and ns.inflight,
                    servers,
                ),
                "governed": cpu_per_call(
                    gov_pids,
                    ("client (submit+wait)", me),
                    lambda: sides.governed_batch(ns.inflight) and ns.inflight,
                    servers,
                ),
                "bare": cpu_per_call(
                    {"bare-worker": pids["bare-worker"]},
                    ("client (delay+get)", me),
                    lambda: sides.bare_batch(ns.inflight) and ns.inflight,
                    servers,
                ),
                "bare_sandboxed": cpu_per_call(
                    {"bare-sandboxed-worker": pids["bare-sandboxed-worker"]},
                    ("client (delay+get)", me),
                    lambda: sides.bare_batch(ns.inflight, sandboxed=True) and ns.inflight,
                    servers,
                ),
            }
            memory = soak(sides, pids, calls=ns.soak, progress=progress) if ns.soak else {}
            comps = components.run_all(client, progress=progress)
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
            "settings": vars(ns),
            "side_by_side": side_by_side,
            "cpu_ms_per_call": where,
            "memory": memory,
            "components": comps,
        }
    finally:
        for worker in (bare_worker, sandboxed_worker):
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=20)
        if stack is not None:
            stop_stack(stack)
        services.close()


def report(result: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if "side_by_side" in result:
        report_overhead(result, stem)
    console.print(targets_table(result["targets"]))
    console.print(f"wrote {RESULTS / (stem + '.json')}")


def report_overhead(result: dict[str, Any], stem: str) -> None:
    chart(result, RESULTS / f"{stem}.png")
    console.print(table(result))
    console.print(components.table(result["components"]))
    console.print(containment.table(result["components"]))
    for side, parts in result["cpu_ms_per_call"].items():
        spent = ", ".join(f"{name} {ms:.1f}" for name, ms in parts.items())
        console.print(f"CPU ms per call, {side}: {spent} (total {sum(parts.values()):.1f})")
    for name, mem in result["memory"].items():
        console.print(
            f"memory {name}: peak {mem['peak_mb']:.0f} MB, "
            f"growth over the soak {mem['growth_pct']:+.1f}%"
        )
    console.print(f"wrote {RESULTS / (stem + '.json')} and {RESULTS / (stem + '.png')}")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _setting(text: str) -> str:
    name, eq, _ = text.partition("=")
    if not eq or not name.startswith("TOOLPLANE_"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected TOOLPLANE_NAME=VALUE")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        choices=[
            "overhead",
            "growth",
            "tenants",
            "scaling",
            "containment",
            "transparency",
            "observability",
        ],
        help="run one part: overhead (bare vs governed, <date>.json), growth (the ledger's "
        "size, <date>-growth.json), tenants (20 tenants against one, <date>-tenants.json), "
        "scaling (per-tool pools, <date>-scaling.json), containment (per-call cost of each "
        "executor, <date>-containment.json) or transparency (Merkle tree, proofs, "
        "checkpoints, bundles, <date>-transparency.json) or observability (metrics and "
        "tracing on against off, three stacks, <date>-observability.json); default "
        "overhead, growth and tenants (all in <date>.json), then scaling and transparency "
        "(observability only when asked for)",
    )
    parser.add_argument(
        "--growth-events", type=int, default=1_000_000, help="evidence events to grow to"
    )
    parser.add_argument(
        "--growth-checkpoint", type=int, default=100_000, help="where verify is timed first"
    )
    parser.add_argument("--growth-samples", type=int, default=40, help="per figure and size")
    parser.add_argument("--ingest-calls", type=int, default=300, help="results per ingest run")
    parser.add_argument("--tenant-count", type=int, default=20, help="tenants at once")
    parser.add_argument("--tenant-calls", type=int, default=200, help="calls per round")
    parser.add_argument("--tenant-rounds", type=int, default=3)
    parser.add_argument(
        "--stem", help="results file name stem (default: today's date, UTC)", default=None
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inflight", type=int, default=200)
    parser.add_argument("--latency", type=int, default=25, help="samples per side per round")
    parser.add_argument(
        "--soak", type=int, default=10_000, help="governed calls in the memory soak"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes per side (scaling: bystander's)"
    )
    parser.add_argument(
        "--submitters", type=int, default=8, help="threads submitting governed calls"
    )
    parser.add_argument(
        "--stack-env",
        action="append",
        default=[],
        type=_setting,
        metavar="TOOLPLANE_NAME=VALUE",
        help="a setting of the governed stack (repeatable), e.g. TOOLPLANE_API_PROCESSES=2",
    )
    parser.add_argument(
        "--containment-calls", type=int, default=200, help="calls per executor (warm ones)"
    )
    scaling.add_arguments(parser)
    ns = parser.parse_args(argv)
    stem = ns.stem or datetime.now(UTC).strftime("%Y-%m-%d")
    if ns.only == "observability":
        with progress_bar() as progress:
            result = observability.run(ns, progress=progress)
        console.print(observability.table(result))
        console.print(f"wrote {observability.write(result, RESULTS, stem)}")
        return 0
    if ns.only == "containment":
        containment.report(stem, ns.containment_calls, RESULTS, console)
        return 0
    if ns.only in (None, "overhead", "growth", "tenants"):
        result: dict[str, Any] = overhead(ns) if ns.only in (None, "overhead") else {}
        with progress_bar() as progress:
            if ns.only in (None, "growth"):
                result["growth"] = growth.run(
                    events=ns.growth_events,
                    checkpoint=ns.growth_checkpoint,
                    samples=ns.growth_samples,
                    ingest_calls=ns.ingest_calls,
                    progress=progress,
                )
            if ns.only in (None, "tenants"):
                result["tenants"] = tenants.run(
                    tenants=ns.tenant_count,
                    calls=ns.tenant_calls,
                    rounds=ns.tenant_rounds,
                    submitters=ns.submitters,
                    progress=progress,
                )
        result["targets"] = targets(result)
        report(result, stem if ns.only in (None, "overhead") else f"{stem}-{ns.only}")
    if ns.only in (None, "scaling"):
        with progress_bar() as progress:
            result = scaling.run(ns, progress=progress)
        path = scaling.write(result, RESULTS, stem)
        for t in scaling.tables(result):
            console.print(t)
        console.print(f"wrote {path} and {path.with_suffix('.png')}")
    if ns.only in (None, "transparency"):
        from benchmarks import transparency

        result = transparency.run()
        console.print_json(data=result)
        console.print(f"wrote {transparency.write(result, RESULTS, stem)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
