"""The pure parts of the metrics: which limit cut a tool off, bounded tenant labels, the
age of a queued result, what a worker counts of a job, and each worker's own port."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from control.ops.metrics_state import bounded_tenants, finished_at_ms
from control.ops.process_env import worker_env
from sandbox_tasks.metrics import WorkerMetrics, kill_limit, parse_bind
from toolplane.errors import SettingsError
from toolplane.settings import Settings


@pytest.mark.parametrize(
    ("code", "message", "limit"),
    [
        ("timeout", "wall time limit of 8s", "time"),
        ("timeout", "CPU time limit of 2s", "cpu"),
        ("too_large", "output beyond 200000 bytes", "output"),
        ("too_large", "result is 300000 bytes, cap 200000", "output"),
        ("tool_error", "killed (memory or hard CPU limit)", "memory"),
        ("tool_error", "memory limit", "memory"),
        ("tool_error", "ValueError: unknown action", None),
        ("not_found", "no such file", None),
    ],
)
def test_kill_limit_reads_the_executors_codes(code: str, message: str, limit: str | None):
    assert kill_limit(code, message) == limit


def test_tenant_labels_are_bounded_and_the_rest_summed():
    rows = [("tn_a", 5), ("tn_b", 1), ("tn_c", 3), ("tn_d", 2)]
    assert bounded_tenants(rows, 2) == [("tn_a", 5), ("tn_c", 3), ("other", 3)]
    assert bounded_tenants(rows, 10) == sorted(rows, key=lambda r: -r[1])
    assert bounded_tenants(rows, 0) == [("other", 11)]


def queued(body: object, encoding: str = "base64") -> bytes:
    raw = json.dumps(body).encode()
    if encoding == "base64":
        raw = base64.b64encode(raw)
    return json.dumps({"body": raw.decode(), "properties": {"body_encoding": encoding}}).encode()


def test_the_age_of_a_queued_result_comes_from_its_finish_time():
    message = [[{"result": {"finished_at": 1_700_000_000_123}, "receipt": {}}], {}, {}]
    assert finished_at_ms(queued(message)) == 1_700_000_000_123
    assert finished_at_ms(queued([[{"result": {"finished_at": "soon"}}], {}, {}])) is None
    assert finished_at_ms(queued([["junk"], {}, {}])) is None
    assert finished_at_ms(b"not json") is None
    assert finished_at_ms(queued({"x": 1}, encoding="utf-8")) is None


def test_a_worker_counts_a_jobs_summary_as_the_pool_hands_it_back():
    metrics = WorkerMetrics("probe")
    summary = {"outcome": "tool_error", "code": "tool_error", "limit": "memory", "seconds": 0.5}
    metrics.count(repr(summary))  # Celery's tracer passes the return value's repr
    metrics.count({"outcome": "refused", "code": "replay", "limit": None, "seconds": None})
    metrics.count("__import__('os').system('true')")  # not a literal: ignored
    metrics.count({"outcome": "made-up"})
    get = metrics.registry.get_sample_value
    assert get("toolplane_worker_jobs_total", {"tool": "probe", "outcome": "tool_error"}) == 1
    assert get("toolplane_worker_jobs_total", {"tool": "probe", "outcome": "refused"}) == 1
    assert get("toolplane_worker_refusals_total", {"tool": "probe", "code": "replay"}) == 1
    assert get("toolplane_worker_sandbox_kills_total", {"tool": "probe", "limit": "memory"}) == 1
    assert get("toolplane_worker_tool_seconds_count", {"tool": "probe"}) == 1
    assert get("toolplane_worker_up", {"tool": "probe"}) == 1


def test_each_tools_worker_gets_its_own_metrics_port(tmp_path: Path):
    off = Settings(home=tmp_path)
    env = worker_env(off, tool="t", home=tmp_path, broker_url="redis://x", source={})
    assert "TOOLPLANE_WORKER_METRICS_BIND" not in env  # off by default
    on = Settings(home=tmp_path, worker_metrics_bind="127.0.0.1:9500")
    env = worker_env(
        on, tool="t", home=tmp_path, broker_url="redis://x", source={}, metrics_offset=2
    )
    assert env["TOOLPLANE_WORKER_METRICS_BIND"] == "127.0.0.1:9502"
    bad = Settings(home=tmp_path, worker_metrics_bind="9500")
    with pytest.raises(SettingsError, match="WORKER_METRICS_BIND"):
        worker_env(bad, tool="t", home=tmp_path, broker_url="redis://x", source={})
    with pytest.raises(SettingsError, match="WORKER_METRICS_BIND"):
        parse_bind("localhost:http")


FALLBACK = """
import os, sys, tempfile
from pathlib import Path

def nowhere(*args, **kwargs):
    raise PermissionError("read-only")

if sys.argv[1] == "nowhere":
    tempfile.mkdtemp = nowhere
from sqlalchemy import create_engine
from control.ops.metrics import install
from control.ops.metrics_state import _Counted
from prometheus_client import REGISTRY

metrics = install(Path("/proc/no-home"), create_engine("sqlite://"))
metrics.runs.labels("completed").inc()
found = [s.value for m in _Counted(REGISTRY).collect() for s in m.samples
         if s.name == "toolplane_runs_finished_total"]
print(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "-"), found)
"""


@pytest.mark.parametrize("tmpdir_writable", [True, False])
def test_a_control_whose_home_is_read_only_still_counts(tmp_path: Path, tmpdir_writable: bool):
    """A read-only HOME (a container's): a temporary directory, else memory; never a crash."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK, "tmp" if tmpdir_writable else "nowhere"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    where, found = done.stdout.split(" ", 1)
    if tmpdir_writable:
        assert where.startswith(str(tmp_path / "toolplane-metrics-")), where
    else:
        assert where == "-"
        assert found.strip() == "[1.0]"
