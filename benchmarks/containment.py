"""Per-call cost of containment: one read_repo_file call through each executor.

Measured on this host, in this process, with no broker or database: the tool's function
called in process (the floor), a forked child of this process (what the weak mode was
before runners), and the runners: under bubblewrap and without namespaces, each warm
(the same tenant's runner, checked and swept after each call) and fresh (a new runner
for every call, as where the host gives no cgroup), and warm again with the kernel layers
a worker applies in each call's process (``_layers``: Landlock, seccomp, no_new_privs, as
this host has them; what a worker really runs). ``check_us`` is the sweep alone
(``Sandbox.problem``: the runner's state, the cgroup's process set).

The figure before per-tenant runners and the sweep (one warm runner, no check) is read
from the latest earlier results file that has it (``previous``).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent

__all__ = ["measure", "previous", "report", "table"]


def _samples(call: Callable[[], Any], n: int) -> list[float]:
    call()  # warm: starts the runner, imports
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def previous(results: Path) -> dict[str, Any] | None:
    """The last earlier run's bwrap figure (one warm runner for all tenants, no sweep)."""
    for path in sorted(results.glob("*.json"), reverse=True):
        try:
            comps = json.loads(path.read_text()).get("components", {})
        except (OSError, ValueError):
            continue
        if "call_p50_ms_bwrap" in comps and "call_p50_ms_bwrap_warm" not in comps:
            return {
                "file": path.name,
                "call_p50_ms_bwrap": comps["call_p50_ms_bwrap"],
                "call_p50_ms_in_process": comps.get("call_p50_ms_in_process"),
            }
    return None


def measure(
    repo_root: Path, docs_root: Path, *, calls: int = 200, fresh_calls: int = 20
) -> dict[str, Any]:
    from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path, probe_bwrap
    from sandbox_tasks.confine import available
    from sandbox_tasks.executor import ForkExecutor
    from sandbox_tasks.plain import PlainExecutor
    from sandbox_tasks.registry import ToolContext
    from sandbox_tasks.runners import RunnerExecutor
    from sandbox_tasks.tools.read_repo_file import TOOL

    scratch = Path(tempfile.mkdtemp(prefix="tpbench-scratch-"))
    ctx = ToolContext(
        repo_root=repo_root,
        docs_root=docs_root,
        scratch_dir=scratch,
        roots={"repo": repo_root, "docs": docs_root},
    )
    args = TOOL.args_model.model_validate({"path": "src/shipit/deploy.py"})
    fork = ForkExecutor(scratch_root=scratch)
    runs: dict[str, tuple[Callable[[], Any], int]] = {
        "in_process": (lambda: TOOL.func(args, ctx), calls),
        "fork": (lambda: fork.run(TOOL, args, ctx), calls),
    }
    executors: dict[str, RunnerExecutor] = {}
    binary = bwrap_path()
    kinds = ["plain"] + (["bwrap"] if probe_bwrap(binary) is None else [])
    layers = tuple(n for n in available() if n != "rlimits")
    variants = [(False, ()), (True, ()), (False, layers)]
    for kind in kinds:
        for fresh, with_layers in variants:
            name = f"{kind}_{'fresh' if fresh else 'warm'}{'_layers' if with_layers else ''}"
            if kind == "bwrap":
                assert binary is not None
                executors[name] = BwrapExecutor(
                    binary=binary,
                    spec=TOOL,
                    roots={"repo": repo_root, "docs": docs_root},
                    extra_modules=[],
                    forbidden=[],
                    fresh=fresh,
                    layers=with_layers,
                )
            else:
                executors[name] = PlainExecutor(
                    spec=TOOL,
                    roots={"repo": repo_root, "docs": docs_root},
                    extra_modules=[],
                    scratch_root=scratch,
                    fresh=fresh,
                    layers=with_layers,
                )
            ex = executors[name]
            runs[name] = (
                lambda ex=ex: _ok(ex.run(TOOL, args, ctx, tenant="bench")),
                fresh_calls if fresh else calls,
            )
    out: dict[str, Any] = {"calls": calls, "fresh_calls": fresh_calls, "layers": list(layers)}
    try:
        for name, (call, n) in runs.items():
            samples = _samples(call, n)
            out[f"call_p50_ms_{name}"] = statistics.median(samples)
            out[f"call_p99_ms_{name}"] = _pct(samples, 0.99)
        for name in executors:
            out[f"overhead_p50_ms_{name}"] = (
                out[f"call_p50_ms_{name}"] - out["call_p50_ms_in_process"]
            )
        warm = executors.get("bwrap_warm") or executors["plain_warm"]
        sandbox = warm._runners["bench"]
        start, n = time.perf_counter(), 1000
        for _ in range(n):
            assert sandbox.problem() is None
        out["check_us"] = (time.perf_counter() - start) / n * 1e6
        out["replaced"] = sum(ex.replaced for ex in executors.values())
    finally:
        for ex in executors.values():
            ex.close()
    # the keys earlier results use, for the table and for comparison: what a worker runs
    out["call_p50_ms_bwrap"] = out.get(
        "call_p50_ms_bwrap_warm_layers", out["call_p50_ms_plain_warm_layers"]
    )
    out["containment_overhead_p50_ms"] = out["call_p50_ms_bwrap"] - out["call_p50_ms_in_process"]
    return out


def _ok(outcome: Any) -> Any:
    if not outcome.ok:
        raise RuntimeError(f"benchmark call failed: {outcome}")
    return outcome


def table(result: dict[str, Any]) -> Table:
    t = Table("executor", "p50 ms", "p99 ms", "overhead p50 ms", title="containment, per call")
    names = ("in_process", "fork", "bwrap_warm", "bwrap_warm_layers", "bwrap_fresh")
    for name in (*names, "plain_warm", "plain_warm_layers", "plain_fresh"):
        if f"call_p50_ms_{name}" in result:
            overhead = result.get(f"overhead_p50_ms_{name}")
            t.add_row(
                name,
                f"{result[f'call_p50_ms_{name}']:.2f}",
                f"{result[f'call_p99_ms_{name}']:.2f}",
                "" if overhead is None else f"{overhead:.2f}",
            )
    old = result.get("previous")
    if old:
        t.add_row(
            f"before (one runner, no sweep; {old['file']})", f"{old['call_p50_ms_bwrap']:.2f}"
        )
    return t


def report(stem: str, calls: int, results: Path, console: Console) -> None:
    """``--only containment``: measured alone, beside an earlier run's figure."""
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": psutil.cpu_count(), "python": sys.version.split()[0]},
        "containment": measure(REPO / "examples" / "repo", REPO / "examples" / "docs", calls=calls),
    }
    result["containment"]["previous"] = previous(results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{stem}-containment.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(table(result["containment"]))
    console.print(f"wrote {path}")
