"""What a process and everything it started use: CPU seconds, resident memory."""

from __future__ import annotations

from collections.abc import Callable

import psutil

__all__ = [
    "backend_cpu_s",
    "cpu_per_call",
    "cpu_s",
    "cpu_snapshot",
    "machine_busy_s",
    "others_by_name",
    "others_cpu",
    "own_cpu_s",
    "rss_mb",
    "tree_pids",
]


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


def cpu_s(pid: int) -> float:
    """CPU seconds of a process, its live children and its reaped children."""
    proc = psutil.Process(pid)
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


def own_cpu_s(pid: int) -> float:
    """CPU seconds of one process alone (the processes it started not counted)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def machine_busy_s() -> float:
    """CPU seconds the machine has been busy, all cores together (as psutil.cpu_percent)."""
    t = psutil.cpu_times()._asdict()
    busy = sum(v for k, v in t.items() if k not in ("idle", "iowait", "guest", "guest_nice"))
    return float(busy)


def cpu_snapshot(trees: dict[str, int], alone: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: of each process tree in ``trees``, each process in ``alone``,
    and of the whole machine (``machine``)."""
    out = {name: cpu_s(pid) for name, pid in trees.items()}
    out.update({name: own_cpu_s(pid) for name, pid in alone.items()})
    out["machine"] = machine_busy_s()
    return out


def others_cpu(skip: set[int]) -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds so far of every other process: (pid, start) -> (name, seconds)."""
    out = {}
    for proc in psutil.process_iter(["name", "cpu_times", "create_time"]):
        times = proc.info["cpu_times"]
        if proc.pid in skip or times is None:
            continue
        out[(proc.pid, proc.info["create_time"])] = (
            proc.info["name"] or "?",
            times.user + times.system,
        )
    return out


def tree_pids(pids: list[int]) -> set[int]:
    """These processes and all they started (that still run)."""
    out = set(pids)
    for pid in pids:
        try:
            out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return out


def others_by_name(
    before: dict[tuple[int, float], tuple[str, float]],
    after: dict[tuple[int, float], tuple[str, float]],
) -> dict[str, float]:
    """CPU seconds each command name spent between two ``others_cpu`` (processes that
    ended in between are not counted)."""
    spent: dict[str, float] = {}
    for key, (name, seconds) in after.items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(key, (name, 0.0))[1]
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def backend_cpu_s(redis_port: int) -> dict[str, float]:
    """CPU seconds so far of the PostgreSQL server (the postmaster with every backend,
    live or ended: all databases, so other users of the server count too) and of the
    Redis server listening on ``redis_port``."""
    pg = redis_s = 0.0
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times", "ppid"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        line = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "postgres":
            pg += times.user + times.system
            if proc.info["ppid"] == 1 or "postmaster" in line or line.startswith("/usr/lib"):
                pg += times.children_user + times.children_system  # ended backends
        elif proc.info["name"] == "redis-server" and f":{redis_port}" in line:
            redis_s += times.user + times.system
    return {"postgres (the whole server)": pg, "redis-server": redis_s}


def cpu_per_call(
    trees: dict[str, int],
    client: tuple[str, int],
    run: Callable[[], int],
    servers: Callable[[], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Milliseconds of CPU per call in each process tree, and in the client process alone
    (the stack's processes are its children: counting them in would count them twice),
    while ``run`` makes its calls; with ``servers``, the database's and broker's too."""
    alone = dict([client])
    before = cpu_snapshot(trees, alone) | (servers() if servers else {})
    calls = run()
    after = cpu_snapshot(trees, alone) | (servers() if servers else {})
    names = [*trees, *alone, *(k for k in after if k not in trees and k not in alone)]
    return {n: (after[n] - before[n]) * 1000 / calls for n in names if n != "machine"}
