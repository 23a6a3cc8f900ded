"""The throughput issue's bar: each figure of ``make bench`` against its bound."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["TARGETS", "targets", "targets_table"]

TARGETS = (  # (figure, where it is in the result, bound, "min" or "max"): the bar
    ("api_throughput_ratio_to_bare", ("side_by_side", "ratio", "api_throughput"), 0.5, "min"),
    ("api_latency_p50_ratio_to_bare", ("side_by_side", "ratio", "api_latency_p50"), 3.0, "max"),
    ("submit_p50_ratio_full_to_empty", ("growth", "ratio", "submit_p50_full_to_empty"), 1.2, "max"),
    (
        "runs_list_p50_ratio_full_to_empty",
        ("growth", "ratio", "runs_list_p50_full_to_empty"),
        1.2,
        "max",
    ),
    (
        "ingest_throughput_ratio_full_to_empty",
        ("growth", "ratio", "ingest_throughput_full_to_empty"),
        1 / 1.2,
        "min",
    ),
    (
        "verify_throughput_ratio_full_to_checkpoint",
        ("growth", "ratio", "verify_events_per_s_full_to_checkpoint"),
        1 / 1.2,
        "min",
    ),
    (
        "many_tenants_throughput_ratio_to_one",
        ("tenants", "ratio", "many_to_one_tenant_throughput"),
        1.0,
        "min",
    ),
)


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each measured figure against its bound, and whether it is met."""
    out = {}
    for name, path, bound, kind in TARGETS:
        value: Any = result
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        met = value >= bound if kind == "min" else value <= bound
        out[name] = {"value": value, kind: bound, "met": bool(met)}
    return out


def targets_table(figures: dict[str, dict[str, Any]]) -> Table:
    t = Table("target", "measured", "bound", "met", title="throughput targets")
    for name, figure in figures.items():
        bound = f">= {figure['min']:.2f}" if "min" in figure else f"<= {figure['max']:.2f}"
        t.add_row(name, f"{figure['value']:.2f}", bound, "yes" if figure["met"] else "no")
    return t
