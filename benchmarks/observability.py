"""What metrics and tracing cost: three governed stacks side by side, in one run.

The stacks run on the same PostgreSQL and Redis servers (each with a database and a Redis
database of its own, so that no control takes another's results), with the same workers,
and differ only in their settings:

- ``off``: ``TOOLPLANE_METRICS=off`` (no commit hook, nothing counted) and no OTLP endpoint;
- ``metrics``: the defaults (the control's metrics on, tracing off);
- ``tracing``: metrics on and ``TOOLPLANE_OTLP_ENDPOINT`` at a real OTLP/HTTP sink in this
  process (tests/otlp_receiver.py), which decodes and counts every span exported to it.

Rounds are interleaved (off, metrics, tracing, off, ...) so that the machine's noise hits
all three alike. Each round: a batch of ``--inflight`` calls through each stack's HTTP
API (throughput; the CPU each process spent, per call, summed over the rounds), then
``--latency`` calls one at a time on each, in turn (latency). Writes
benchmarks/results/<stem>-observability.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.progress import Progress
from rich.table import Table

from benchmarks.usage import backend_cpu_s, cpu_per_call
from tests.harness import own_services, start_services, start_stack, stop_stack
from toolplane.tracing import ENDPOINT_SETTINGS

__all__ = ["CONFIGS", "run", "table", "write"]

FILE = "src/shipit/deploy.py"
TOOL = "read_repo_file"
CONFIGS = ("off", "metrics", "tracing")
PROCESSES = ("api", "control", f"worker-{TOOL}")  # the stack's, each with its children
CLIENT = "client (submit+wait over HTTP)"
SINK = "otlp sink (in the bench process)"
QUIET_LOAD = 2.0  # a 1-minute load average above this: the run is labelled noisy


class Side:
    """One stack's API, with a throughput and a latency probe, and its CPU counted."""

    def __init__(self, stack: Any, api: Any, pool: ThreadPoolExecutor) -> None:
        self.stack = stack
        self.api = api
        self.pool = pool
        self.calls = 0
        self.rounds: list[float] = []
        self.latencies: list[float] = []
        self.cpu_ms: dict[str, float] = {}  # summed over the batches: ms * calls
        self.cpu_calls = 0

    def batch(self, n: int) -> int:
        start = time.perf_counter()
        ids = list(self.pool.map(lambda _: self.api.submit(TOOL, {"path": FILE}), range(n)))
        statuses = self.api.wait_all(ids, timeout=300)
        assert set(statuses.values()) == {"completed"}, statuses
        self.rounds.append(n / (time.perf_counter() - start))
        self.calls += n
        return n

    def one(self) -> None:
        start = time.perf_counter()
        done = self.api.call(TOOL, {"path": FILE}, wait=True, timeout=60)
        assert done.status == "completed", done
        self.latencies.append(time.perf_counter() - start)
        self.calls += 1

    def trees(self) -> dict[str, int]:
        return {name: self.stack.pid(name) for name in PROCESSES}


class Sink:
    """The OTLP/HTTP receiver of tests/otlp_receiver.py, with the CPU its handlers spend
    (in this process's threads: taken out of the client's figure)."""

    def __init__(self) -> None:
        from tests.otlp_receiver import OtlpReceiver

        self.receiver = OtlpReceiver()
        self.cpu_s = 0.0
        sink = self
        handler = self.receiver.server.RequestHandlerClass

        class Timed(handler):  # type: ignore[valid-type,misc]
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                start = time.thread_time()
                try:
                    super().do_POST()
                finally:
                    sink.cpu_s += time.thread_time() - start  # one GIL: += is safe enough

        self.receiver.server.RequestHandlerClass = Timed

    def count(self) -> int:
        return len(self.receiver.spans)

    def settle(self, *, quiet_s: float = 7.0, limit_s: float = 90.0) -> None:
        """Until no span has come for ``quiet_s`` (longer than the exporters' 5 s delay)."""
        deadline = time.monotonic() + limit_s
        seen, since = self.count(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
            time.sleep(0.5)
            if (now := self.count()) != seen:
                seen, since = now, time.monotonic()


def _spans(sink: Sink, calls: int) -> dict[str, Any]:
    """The run's own spans (``toolplane.*``: intake, decision, dispatch, queue wait, verify,
    sandbox run, receipt, ingest) per call, apart from the API's HTTP request spans (each
    request its own trace: the submit, every poll of the waits, /readyz)."""
    spans = list(sink.receiver.spans)
    by_service: dict[str, int] = {}
    by_name: dict[str, int] = {}
    traces: dict[str, int] = {}
    for span in spans:
        by_service[span.service] = by_service.get(span.service, 0) + 1
        by_name[span.name] = by_name.get(span.name, 0) + 1
        if span.name.startswith("toolplane."):
            traces[span.trace_id] = traces.get(span.trace_id, 0) + 1
    run_spans = sum(traces.values())
    return {
        "received": len(spans),
        "export_requests": sink.receiver.requests,
        "calls": calls,
        "per_call": len(spans) / calls,
        "run_spans_per_call": run_spans / calls,
        "http_spans_per_call": (len(spans) - run_spans) / calls,
        "run_traces": len(traces),
        "run_spans_per_trace_median": statistics.median(traces.values()) if traces else 0,
        "by_service": dict(sorted(by_service.items())),
        "by_name": dict(sorted(by_name.items())),
        "sink_cpu_ms_per_call": sink.cpu_s * 1000 / calls,
    }


def run(ns: Any, *, progress: Progress) -> dict[str, Any]:
    """``ns``: benchmarks.run's options (rounds, inflight, latency, workers, submitters,
    stack_env)."""
    named = [k for k in ENDPOINT_SETTINGS if os.environ.get(k)]
    if named:
        raise SystemExit(f"{named[0]} is set: unset it, or the 'off' stacks would trace")
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tpobsbench-"))
    services = start_services(tmp)
    sink = Sink()
    pool = ThreadPoolExecutor(max_workers=ns.submitters)
    common = dict(item.split("=", 1) for item in ns.stack_env)
    settings = {
        "off": common | {"TOOLPLANE_METRICS": "off"},
        "metrics": common | {"TOOLPLANE_METRICS": "on"},
        "tracing": common
        | {"TOOLPLANE_METRICS": "on", "TOOLPLANE_OTLP_ENDPOINT": sink.receiver.endpoint},
    }
    owned: list[Any] = []
    stacks: list[Any] = []
    sides: dict[str, Side] = {}
    try:
        for name in CONFIGS:
            own = own_services(services)
            owned.append(own)
            stack = start_stack(
                own, tmp / name, workers={TOOL: ns.workers}, extra_env=settings[name]
            )
            stacks.append(stack)
            sides[name] = Side(stack, stack.http(stack.tenant("bench")), pool)
        for _ in range(20):  # warm every path: connections, imports, policy, runners
            for side in sides.values():
                side.one()
        for side in sides.values():
            side.latencies.clear()
        me = psutil.Process().pid
        port = int(services.redis_url.rsplit(":", 1)[1].split("/")[0])

        def servers() -> dict[str, float]:
            return backend_cpu_s(port) | {SINK: sink.cpu_s}

        task = progress.add_task(
            "observability: off / metrics / tracing (interleaved)",
            total=ns.rounds * len(CONFIGS) * (1 + ns.latency),
        )
        for _ in range(ns.rounds):
            for side in sides.values():
                spent = cpu_per_call(
                    side.trees(), (CLIENT, me), lambda s=side: s.batch(ns.inflight), servers
                )
                for where, ms in spent.items():
                    side.cpu_ms[where] = side.cpu_ms.get(where, 0.0) + ms * ns.inflight
                side.cpu_calls += ns.inflight
                progress.advance(task)
            for _ in range(ns.latency):
                for side in sides.values():
                    side.one()
                progress.advance(task, len(CONFIGS))
        sink.settle()
        return _result(ns, sides, settings, _spans(sink, sides["tracing"].calls), load_before)
    finally:
        pool.shutdown(wait=False)
        for stack in stacks:
            stop_stack(stack)
        sink.receiver.close()
        for own in owned:
            own.close()
        services.close()


def _ratios(sides: dict[str, Side], figure: str) -> tuple[float, float]:
    off = _figure(sides["off"], figure)
    return _figure(sides["metrics"], figure) / off, _figure(sides["tracing"], figure) / off


def _figure(side: Side, figure: str) -> float:
    if figure == "throughput":
        return statistics.median(side.rounds)
    return statistics.median(side.latencies) * 1000


def _result(
    ns: Any,
    sides: dict[str, Side],
    settings: dict[str, dict[str, str]],
    spans: dict[str, Any],
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    configs: dict[str, Any] = {}
    for name, side in sides.items():
        cpu = {k: v / side.cpu_calls for k, v in side.cpu_ms.items()}
        cpu[CLIENT] -= cpu.pop(SINK, 0.0)  # the sink's threads are not the client's work
        if name == "tracing":  # all it decoded, whichever stack's batch it came during
            cpu[SINK] = spans["sink_cpu_ms_per_call"]
        stack_ms = sum(v for k, v in cpu.items() if k in PROCESSES)
        lat = sorted(side.latencies)
        configs[name] = {
            "settings": {k: v for k, v in settings[name].items() if k != "TOOLPLANE_OTLP_ENDPOINT"}
            | ({"TOOLPLANE_OTLP_ENDPOINT": "the sink"} if name == "tracing" else {}),
            "throughput_per_s": _figure(side, "throughput"),
            "throughput_rounds": side.rounds,
            "latency_p50_ms": _figure(side, "latency"),
            "latency_p99_ms": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] * 1000,
            "latency_samples": len(lat),
            "cpu_ms_per_call": cpu,
            "cpu_ms_per_call_stack": stack_ms,  # api + control + workers
        }
    off = configs["off"]["cpu_ms_per_call"]
    deltas = {
        name: {k: v - off.get(k, 0.0) for k, v in configs[name]["cpu_ms_per_call"].items()}
        | {
            "stack": configs[name]["cpu_ms_per_call_stack"]
            - configs["off"]["cpu_ms_per_call_stack"]
        }
        for name in ("metrics", "tracing")
    }
    m_tput, t_tput = _ratios(sides, "throughput")
    m_lat, t_lat = _ratios(sides, "latency")
    load_after = os.getloadavg()
    notes = [
        "tracing = metrics on and tracing on; each ratio is to off (metrics and tracing off)",
        "CPU ms per call: summed over every throughput batch; postgres is the whole server "
        "(all databases), so other users of the machine count in it",
    ]
    # the load after counts the benchmark's own three stacks: only the load before says
    # whether other work shared the machine
    if load_before[0] > QUIET_LOAD:
        notes.append(
            f"NOISY RUN: 1-minute load average {load_before[0]:.2f} before (> {QUIET_LOAD}): "
            "other work shared the machine"
        )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
        "settings": {
            k: getattr(ns, k) for k in ("rounds", "inflight", "latency", "workers", "submitters")
        }
        | {"stack_env": list(ns.stack_env)},
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "notes": notes,
        "configs": configs,
        "ratio": {
            "metrics_throughput_ratio": m_tput,
            "tracing_throughput_ratio": t_tput,
            "metrics_latency_p50_ratio": m_lat,
            "tracing_latency_p50_ratio": t_lat,
            "tracing_to_metrics_throughput_ratio": t_tput / m_tput,
            "tracing_to_metrics_latency_p50_ratio": t_lat / m_lat,
        },
        "cpu_ms_per_call_delta": deltas,
        "spans": spans,
    }


def write(result: dict[str, Any], results: Path, stem: str) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{stem}-observability.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def table(result: dict[str, Any]) -> Table:
    out = Table(title="observability overhead (ratios to off)")
    for column in ("", *CONFIGS):
        out.add_column(column, justify="left" if not column else "right")
    c = result["configs"]
    out.add_row("throughput /s", *(f"{c[n]['throughput_per_s']:.1f}" for n in CONFIGS))
    out.add_row("latency p50 ms", *(f"{c[n]['latency_p50_ms']:.1f}" for n in CONFIGS))
    out.add_row("latency p99 ms", *(f"{c[n]['latency_p99_ms']:.1f}" for n in CONFIGS))
    out.add_row("stack CPU ms/call", *(f"{c[n]['cpu_ms_per_call_stack']:.2f}" for n in CONFIGS))
    for where in c["tracing"]["cpu_ms_per_call"]:
        out.add_row(
            f"  {where}", *(f"{c[n]['cpu_ms_per_call'].get(where, 0.0):.2f}" for n in CONFIGS)
        )
    r = result["ratio"]
    out.add_row(
        "throughput ratio",
        "1",
        f"{r['metrics_throughput_ratio']:.3f}",
        f"{r['tracing_throughput_ratio']:.3f}",
    )
    out.add_row(
        "latency p50 ratio",
        "1",
        f"{r['metrics_latency_p50_ratio']:.3f}",
        f"{r['tracing_latency_p50_ratio']:.3f}",
    )
    s = result["spans"]
    out.caption = (
        f"spans received: {s['received']} for {s['calls']} calls on the tracing stack: "
        f"{s['run_spans_per_call']:.1f} of the run per call (median per trace "
        f"{s['run_spans_per_trace_median']}), {s['http_spans_per_call']:.1f} of HTTP requests"
        + ("; NOISY RUN (load average > 2)" if any("NOISY" in n for n in result["notes"]) else "")
    )
    return out
