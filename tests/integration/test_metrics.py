"""The control's and the workers' metrics on a real stack: after a known mix of calls
(completed, denied by policy, held then approved or rejected or left waiting, a tool that
fails, one cut off by its memory limit, an entitlement refusal, a forged job and a forged
receipt), one scrape of the API gives each counter's exact value, summed over the
control's processes; each worker's own endpoint counts its jobs exactly."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

import celeryconfig
from ledger.models import Node
from tests.harness import (
    Services,
    Stack,
    free_port,
    own_services,
    start_stack,
    stop_stack,
    wait_for,
)
from tests.integration.govern import operator_admin
from tests.integration.test_entitlements import server_plan
from tests.security.test_forgery import forged_result, push_job, push_result, unverified
from tests.stackdirs import reachable

pytestmark = pytest.mark.integration

WORKERS = {"read_repo_file": 1, "probe": 1}  # worker metrics on base port + 0 and + 1
FILE = "read_repo_file"


def scrape(url: str, token: str | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a metrics endpoint: (name, sorted labels) -> value."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ports_free(base: int, count: int) -> bool:
    import socket

    for port in range(base, base + count):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@contextlib.contextmanager
def worker_metered(
    services: Services, home: Path, *, workers: dict[str, int], extra: dict[str, str]
) -> Iterator[Stack]:
    """A stack of its own (database, Redis database: no other test's calls are counted)
    whose workers serve their metrics behind a token from a file, on ports from
    ``worker_url(stack, place)``."""
    own = own_services(services)
    count = len(workers)
    base = wait_for(lambda: (p := free_port()) < 65000 and ports_free(p, count) and p, what="ports")
    reachable(own, home)  # a directory the workers' users can reach, as start_stack makes it
    (home / "worker-metrics").mkdir(mode=0o755)  # not HOME's top: its files are the control's
    token_file = home / "worker-metrics" / "token"
    token_file.write_text(secrets.token_urlsafe(24) + "\n")
    token_file.chmod(0o644)  # the workers run as users of their own
    extra = {
        "TOOLPLANE_WORKER_METRICS_BIND": f"127.0.0.1:{base}",
        "TOOLPLANE_WORKER_METRICS_TOKEN_FILE": str(token_file.resolve()),  # not via the link
        **extra,
    }
    try:
        running = start_stack(own, home, workers=workers, extra_env=extra)
        running.env["TP_TEST_METRICS_BASE"] = str(base)
        try:
            yield running
        finally:
            stop_stack(running)
    finally:
        own.close()


@pytest.fixture(scope="module")
def metered(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("metered"))
    # with the control daemon: three control processes
    extra = {"TOOLPLANE_API_PROCESSES": "2"}
    with worker_metered(services, home, workers=dict(WORKERS), extra=extra) as running:
        yield running


def worker_url(stack: Stack, place: int) -> str:
    return f"http://127.0.0.1:{int(stack.env['TP_TEST_METRICS_BASE']) + place}/metrics"


def worker_token(stack: Stack) -> str:
    return Path(stack.env["TOOLPLANE_WORKER_METRICS_TOKEN_FILE"]).read_text().strip()


@pytest.fixture(scope="module")
def mix(metered: Stack) -> dict[str, Any]:
    """The known mix of calls, made through the API (where the control counts them)."""
    stack = metered
    admin = stack.tenant()
    as_admin = stack.http(admin)
    http = stack.http(as_admin.issue_token("metrics-submitter", "submitter").token)
    approver = stack.http(as_admin.issue_token("metrics-approver", "approver").token)
    tenant_a = stack.client(admin).identity.tenant_id
    done = {}
    done["completed"] = http.call(FILE, {"path": "README.md"}, wait=True)
    assert done["completed"].status == "completed"
    done["denied"] = http.call(FILE, {"path": ".env"}, wait=True)
    assert done["denied"].status == "denied"
    held = [
        http.call(FILE, {"path": p}, environment="prod")
        for p in ("README.md", "pyproject.toml", "Makefile")
    ]
    assert [h.status for h in held] == ["awaiting_approval"] * 3
    assert approver.approve(held[0].run_id, FILE, reason="ok").status == "granted"
    assert approver.reject(held[1].run_id, FILE, reason="no").run.status == "denied"
    assert http.wait(held[0].run_id, timeout=60).status == "completed"
    failed = http.call("probe", {"action": "no-such-action"}, wait=True)
    assert failed.status == "failed" and failed.nodes[0].error["code"] == "tool_error"
    killed = http.call("probe", {"action": "allocate"}, wait=True)
    assert killed.status == "failed", killed
    # Tenant B: one call a day; its second is refused by that entitlement.
    limited = stack.tenant()
    server_plan(stack, limited, f"one{secrets.token_hex(3)}", {"daily_calls": 1})
    http_b = stack.http(limited)
    assert http_b.call(FILE, {"path": "README.md"}, wait=True).status == "completed"
    refused = http_b.call(FILE, {"path": "README.md"}, wait=True)
    assert refused.status == "denied"
    assert refused.nodes[0].error["code"] == "entitlement_exceeded"
    # A forged job on the tool's queue (the worker refuses it, in a signed refusal), and a
    # forged receipt for the completed call pushed straight onto results.
    broker = Celery("attacker", set_as_current=False)
    broker.conf.update(celeryconfig.build_config(stack.services.redis_url))
    push_job(broker, celeryconfig.tool_queue(FILE), {"envelope": {"tool": FILE}, "sig": "x"})
    client = stack.client(admin)
    with client.plane.sessions() as session:
        node = session.scalar(select(Node).where(Node.run_id == done["completed"].run_id))
    forged = forged_result(stack, node, result={"path": "README.md", "content": "lie"})
    push_result(broker, forged)
    wait_for(lambda: unverified(client, forged), what="the forged receipt recorded")
    wait_for(lambda: refusals_recorded(client) >= 1, what="the worker's refusal ingested")
    return {"tenant_a": tenant_a, "killed": killed}


def refusals_recorded(client: Any) -> int:
    from ledger.models import EvidenceEvent

    with client.plane.sessions() as session:
        found = select(EvidenceEvent.id).where(EvidenceEvent.kind == "JobRefused")
        return len(session.scalars(found).all())


def durations(client: Any, tool: str) -> list[int]:
    """The tool's run times (ms) in the ledger's accepted results."""
    from ledger.models import EvidenceEvent

    kinds = ("ToolCallCompleted", "ToolCallFailed")
    with client.plane.sessions() as session:
        payloads = session.scalars(
            select(EvidenceEvent.payload).where(EvidenceEvent.kind.in_(kinds))
        ).all()
    results = [p["message"]["result"] for p in payloads]
    return [r["duration_ms"] for r in results if r["tool"] == tool]


def test_one_scrape_counts_every_control_process_exactly(metered: Stack, mix: dict) -> None:
    samples = scrape(metered.url + "/metrics", operator_admin(metered))

    def v(name: str, **labels: str) -> float:
        return value(samples, name, **labels)

    # decided in the API's process (intake): 1 completed, B's 2 (1 completed, 1 refused by
    # its entitlement); the approved call is not decided again; 3 held; 1 denied
    assert v("toolplane_decisions_total", tool=FILE, effect="allow") == 3
    assert v("toolplane_decisions_total", tool=FILE, effect="hold") == 3
    assert v("toolplane_decisions_total", tool=FILE, effect="deny") == 1
    assert v("toolplane_decisions_total", tool="probe", effect="allow") == 2
    assert v("toolplane_denials_total", tool=FILE, reason="policy") == 1
    assert v("toolplane_denials_total", tool=FILE, reason="entitlement") == 1
    assert v("toolplane_denials_total", tool=FILE, reason="approval_rejected") == 1
    assert v("toolplane_denials_total", tool=FILE, reason="approval_expired") == 0
    assert v("toolplane_entitlement_refusals_total", limit="daily_calls") == 1
    assert v("toolplane_approvals_decided_total", outcome="granted") == 1
    assert v("toolplane_approvals_decided_total", outcome="rejected") == 1
    assert v("toolplane_approvals_pending", tenant=mix["tenant_a"]) == 1
    # ingested by the control daemon's process
    assert v("toolplane_runs_finished_total", status="completed") == 3
    assert v("toolplane_runs_finished_total", status="denied") == 3
    assert v("toolplane_runs_finished_total", status="failed") == 2
    # 3 results and the worker's signed refusal of the forged job; the forged receipt
    assert v("toolplane_receipts_total", tool=FILE, outcome="verified") == 4
    assert v("toolplane_receipts_total", tool=FILE, outcome="refused") == 1
    assert v("toolplane_receipts_total", tool="probe", outcome="verified") == 2
    assert v("toolplane_receipts_total", tool="other", outcome="verified") == 0
    assert v("toolplane_results_ignored_total", tool=FILE) == 0
    assert v("toolplane_sandbox_kills_total", tool="probe", limit="memory") == 1
    assert v("toolplane_sandbox_kills_total", tool=FILE, limit="memory") == 0
    client = metered.client(metered.tenant())
    for tool, calls in ((FILE, 3), ("probe", 2)):
        assert v("toolplane_call_duration_seconds_count", tool=tool) == calls
        assert v("toolplane_queue_wait_seconds_count", tool=tool) == calls
        assert v("toolplane_tool_duration_seconds_count", tool=tool) == calls
        took = durations(client, tool)
        assert len(took) == calls
        assert v("toolplane_tool_duration_seconds_sum", tool=tool) == pytest.approx(
            sum(took) / 1000
        )
        # from submission to acceptance: at least the tool's own time
        assert v("toolplane_call_duration_seconds_sum", tool=tool) >= sum(took) / 1000
    # the state, read at the scrape
    assert v("toolplane_outbox_backlog") == 0
    assert v("toolplane_ingest_lag_seconds") == 0
    for queue in ("results", "tool.probe", "tool.read_repo_file"):
        assert ("toolplane_queue_depth", (("queue", queue),)) in samples
        assert v("toolplane_queue_depth", queue=queue) == 0
    # Counted in several processes (the control daemon, the API's), summed by one scrape.
    files = list((metered.home / "run" / "metrics").glob("*.db"))
    pids = {int(f.stem.rsplit("_", 1)[1]) for f in files}
    assert metered.pid("control") in pids and len(pids) >= 2, files
    api = psutil.Process(metered.pid("api"))
    assert len(pids & {p.pid for p in api.children(recursive=True)}) >= 1, files


def test_each_worker_counts_its_jobs_exactly(metered: Stack, mix: dict) -> None:
    reads = scrape(worker_url(metered, 0), worker_token(metered))
    assert value(reads, "toolplane_worker_up", tool=FILE) == 1
    assert value(reads, "toolplane_worker_jobs_total", tool=FILE, outcome="ok") == 3
    assert value(reads, "toolplane_worker_jobs_total", tool=FILE, outcome="refused") == 1
    assert value(reads, "toolplane_worker_jobs_total", tool=FILE, outcome="tool_error") == 0
    assert value(reads, "toolplane_worker_refusals_total", tool=FILE, code="envelope_invalid") == 1
    assert value(reads, "toolplane_worker_tool_seconds_count", tool=FILE) == 3
    probes = scrape(worker_url(metered, 1), worker_token(metered))
    assert value(probes, "toolplane_worker_up", tool="probe") == 1
    assert value(probes, "toolplane_worker_jobs_total", tool="probe", outcome="tool_error") == 2
    assert value(probes, "toolplane_worker_jobs_total", tool="probe", outcome="ok") == 0
    assert value(probes, "toolplane_worker_sandbox_kills_total", tool="probe", limit="memory") == 1
    assert not any(
        name.startswith("toolplane_worker") and dict(labels).get("tool") == FILE
        for name, labels in probes
    ), "a worker shows only its own tool"


def test_a_worker_endpoint_answers_only_its_token(metered: Stack) -> None:
    url = worker_url(metered, 0)
    assert httpx.get(url, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * 32}
    assert httpx.get(url, headers=wrong, timeout=10).status_code == 401
    right = {"Authorization": f"Bearer {worker_token(metered)}"}
    assert httpx.get(url, headers=right, timeout=10).status_code == 200


def totals(samples: dict) -> dict:
    return {k: v for k, v in samples.items() if k[0].endswith(("_total", "_count"))}


def test_a_restarted_control_process_keeps_the_counts(metered: Stack, mix: dict) -> None:
    """The supervisor empties the directory only for a stack none of whose control
    processes runs: the control daemon started again (the API running) counts on."""
    token = operator_admin(metered)
    before = totals(scrape(metered.url + "/metrics", token))
    assert before[("toolplane_receipts_total", (("outcome", "verified"), ("tool", FILE)))] == 4
    old = metered.pid("control")
    metered.kill("control")
    metered.start_missing()
    assert metered.pid("control") != old
    ready = lambda: metered.log("control").count(" ready.") >= 2  # noqa: E731 - its log appends
    wait_for(ready, timeout=60, what="the control serving again")
    assert totals(scrape(metered.url + "/metrics", token)) == before


def families(url: str, token: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each toolplane metric an endpoint exports: name -> (type, label names)."""
    response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(response.text):
        if not family.name.startswith("toolplane_") or not family.samples:
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k not in ("le", "quantile")}
        found[name] = (family.type, tuple(sorted(labels)))
    return found


def test_the_endpoints_export_exactly_the_catalog(metered: Stack, mix: dict) -> None:
    """What the dashboard and the alert rules are checked against (toolplane.metric_names)
    is what the control and the workers really export: names, types and labels."""
    from toolplane.metric_names import CONTROL, WORKER

    for exported, catalog in (
        (families(metered.url + "/metrics", operator_admin(metered)), CONTROL),
        (  # the two workers' together: each counted some of the kinds
            families(worker_url(metered, 0), worker_token(metered))
            | families(worker_url(metered, 1), worker_token(metered)),
            WORKER,
        ),
    ):
        wanted = {n: (t, tuple(sorted(labels))) for n, (t, labels) in catalog.items()}
        assert exported.items() <= wanted.items()
        # a labelled family shows once something was counted under it; the mix counts all
        # but copies of accepted results (none were made)
        assert set(wanted) - set(exported) <= {"toolplane_results_ignored_total"}
