"""The overhead benchmark's chart and table: bare Celery, bare Celery with the tool in its
sandbox, and the governed path in process and through the HTTP API, side by side."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

__all__ = ["chart", "table"]


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = result["side_by_side"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bars = [
        (key, label, color)
        for key, label, color in (
            ("bare", "bare Celery", "#999"),
            ("bare_sandboxed", "bare + sandbox", "#c84"),
            ("governed", "governed (in process)", "#2a6"),
            ("api", "governed (HTTP API)", "#26a"),
        )
        if key in side
    ]
    a.bar(
        [label.replace(" (", "\n(") for _, label, _ in bars],
        [side[key]["throughput_per_s"] for key, _, _ in bars],
        color=[color for _, _, color in bars],
    )
    a.set_title("throughput (calls/s, higher is better)")
    x = range(2)
    width = 0.8 / len(bars)
    for i, (key, label, color) in enumerate(bars):
        b.bar(
            [j + (i - (len(bars) - 1) / 2) * width for j in x],
            [side[key]["latency_p50_ms"], side[key]["latency_p99_ms"]],
            width=width,
            label=label,
            color=color,
        )
    b.set_xticks(list(x), ["p50", "p99"])
    b.set_title("latency, one at a time (ms, lower is better)")
    b.legend()
    fig.suptitle(f"toolplane vs bare Celery — {result['date']} ({result['machine']['cpus']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(result: dict) -> Table:
    side = result["side_by_side"]
    t = Table(
        "metric",
        "bare Celery",
        "in process",
        "HTTP API",
        "in process / bare",
        "API / bare",
        title="side by side",
    )
    ratio = side["ratio"]
    for label, key, fmt, r in (
        ("throughput (calls/s)", "throughput_per_s", ".0f", "throughput"),
        ("latency p50 (ms)", "latency_p50_ms", ".1f", "latency_p50"),
        ("latency p99 (ms)", "latency_p99_ms", ".1f", "latency_p99"),
    ):
        t.add_row(
            label,
            format(side["bare"][key], fmt),
            format(side["governed"][key], fmt),
            format(side["api"][key], fmt),
            f"{ratio[r]:.2f}",
            f"{ratio['api_' + r]:.2f}",
        )
    if "bare_sandboxed" in side:  # what the sandbox alone costs, and governance beyond it
        sandboxed = side["bare_sandboxed"]
        t.add_row(
            "bare + sandbox: calls/s, p50 ms",
            f"{sandboxed['throughput_per_s']:.0f}, {sandboxed['latency_p50_ms']:.1f}",
            "",
            "API / bare + sandbox:",
            "",
            f"{ratio['api_throughput_to_sandboxed']:.2f}, "
            f"{ratio['api_latency_p50_to_sandboxed']:.2f}",
        )
    return t
