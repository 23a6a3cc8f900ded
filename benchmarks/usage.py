"""What a process and everything it started use: CPU seconds, resident memory."""

from __future__ import annotations

import psutil

__all__ = [
    "cpu_s",
    "cpu_snapshot",
    "machine_busy_s",
    "own_cpu_s",
    "rss_mb",
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
