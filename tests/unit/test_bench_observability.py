"""benchmarks/observability.py's arithmetic: ratios to off, the sink's CPU out of the
client's, deltas to off, and a noisy run labelled as such."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks.observability import CLIENT, SINK, Side, _result


def side(rounds: list[float], latencies: list[float], cpu: dict[str, float]) -> Side:
    made = Side(stack=None, api=None, pool=None)  # type: ignore[arg-type]
    made.rounds, made.latencies = rounds, latencies
    made.cpu_calls = 10
    made.cpu_ms = {k: v * 10 for k, v in cpu.items()}  # as summed: ms per call * calls
    made.calls = 40
    return made


def test_ratios_deltas_and_the_sink_out_of_the_client() -> None:
    base = {"api": 10.0, "control": 5.0, "worker-read_repo_file": 4.0, CLIENT: 3.0}
    sides = {
        "off": side([20.0, 22.0, 21.0], [0.1, 0.2, 0.3], base | {SINK: 0.0}),
        "metrics": side([10.0, 11.0, 10.5], [0.2, 0.4, 0.6], base | {"api": 12.0, SINK: 0.5}),
        "tracing": side([7.0], [0.3], base | {"control": 9.0, SINK: 1.0}),
    }
    ns = SimpleNamespace(rounds=3, inflight=10, latency=1, workers=2, submitters=8, stack_env=[])
    spans = {"sink_cpu_ms_per_call": 0.25}
    result = _result(ns, sides, {n: {} for n in sides}, spans, (9.0, 0.0, 0.0))
    ratio = result["ratio"]
    assert ratio["metrics_throughput_ratio"] == 10.5 / 21.0
    assert ratio["tracing_throughput_ratio"] == 7.0 / 21.0
    assert abs(ratio["metrics_latency_p50_ratio"] - 2.0) < 1e-9
    assert abs(ratio["tracing_latency_p50_ratio"] - 1.5) < 1e-9
    configs = result["configs"]
    assert configs["metrics"]["cpu_ms_per_call"][CLIENT] == 2.5  # 3.0 less the sink's 0.5
    assert SINK not in configs["metrics"]["cpu_ms_per_call"]
    assert configs["tracing"]["cpu_ms_per_call"][SINK] == 0.25  # all it decoded, per call
    assert configs["off"]["cpu_ms_per_call_stack"] == 19.0
    assert result["cpu_ms_per_call_delta"]["metrics"]["api"] == 2.0
    assert result["cpu_ms_per_call_delta"]["tracing"]["stack"] == 4.0
    assert any(note.startswith("NOISY RUN") for note in result["notes"])
