"""Traces of real runs, exported over OTLP/HTTP by every process of a real stack.

The stack's control and workers export to a real OTLP/HTTP receiver in this test
(tests.otlp_receiver: protobuf decoded with opentelemetry-proto). A workflow run of three
nodes is one trace: the intake span is its root, and each node has its decision, dispatch,
queue wait, verify, sandbox run, receipt and ingest spans, parented and timed in that
order, from the control's process and the workers'. A result that claims another run's
trace context (signed with the tool's real key, as a worker that holds it could) is
ingested in the trace of the run the control dispatched, never in the one it claims.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from celery import Celery
from sqlalchemy import select

import celeryconfig
from ledger.models import Node
from tests.harness import (
    Services,
    Stack,
    own_stack,
    wait_for,
)
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.security.test_forgery import forged_result
from toolplane.tracecontext import Traceparent, parse_traceparent, run_trace

pytestmark = pytest.mark.integration

WORKER_STAGES = ("queue_wait", "verify", "sandbox_run", "receipt")
NODE_STAGES = ("decision", "dispatch", *WORKER_STAGES, "ingest")
TOOLS = ("search_docs", "read_repo_file", "lint_python", "sleepy", "probe")
MS = 1_000_000  # ns: an envelope's issued_at is in whole milliseconds


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    running = OtlpReceiver()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def traced(
    services: Services, tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver
) -> Iterator[Stack]:
    """A stack of its own whose processes export their spans to ``receiver``."""
    home = Path(tmp_path_factory.mktemp("traced"))
    extra = {"TOOLPLANE_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with own_stack(services, home, workers={t: 1 for t in TOOLS}, extra_env=extra) as running:
        yield running


def spans_of(receiver: OtlpReceiver, run_id: str, node_ids: list[str]) -> list[ReceivedSpan]:
    """Every span of the run, once each stage of each node has arrived (else [])."""
    spans = receiver.where(run_id=run_id)
    names = [(s.attributes.get("toolplane.node_id"), s.name) for s in spans]
    ready = ("toolplane.intake" in [s.name for s in spans]) and all(
        (node, f"toolplane.{stage}") in names for node in node_ids for stage in NODE_STAGES
    )
    return spans if ready else []


def one(spans: list[ReceivedSpan], stage: str, node: str | None = None) -> ReceivedSpan:
    found = [
        s
        for s in spans
        if s.name == f"toolplane.{stage}"
        and (node is None or s.attributes.get("toolplane.node_id") == node)
    ]
    assert len(found) == 1, (stage, node, found)
    return found[0]


def test_a_workflow_run_is_one_trace_with_a_span_per_stage_of_each_node(
    traced: Stack, receiver: OtlpReceiver
) -> None:
    client = traced.http(traced.tenant())
    run = client.run_workflow(
        "repo-review", {"query": "hash chain", "path": "src/shipit/deploy.py"}, wait=True
    )
    assert run.status == "completed", run
    nodes = [n.node_id for n in run.nodes]
    assert sorted(nodes) == ["lint", "read", "search"]
    try:
        spans = wait_for(lambda: spans_of(receiver, run.run_id, nodes), timeout=30)
    except AssertionError as e:  # say what came
        got = sorted(
            (s.service, s.attributes.get("toolplane.node_id"), s.name) for s in receiver.spans
        )
        raise AssertionError(f"{e}: got {got} in {receiver.requests} requests") from None

    ids = run_trace(run.run_id)
    assert {s.trace_id for s in spans} == {ids.trace_id}  # one trace, from every process
    assert receiver.of_trace(ids.trace_id) == spans  # and nothing else in it
    assert {s.service for s in spans} == {"toolplane-control", "toolplane-worker"}
    intake = one(spans, "intake")
    assert intake.parent_span_id == "" and intake.span_id == ids.span_id  # the root
    assert intake.service == "toolplane-control"
    for node in nodes:
        stage = {name: one(spans, name, node) for name in NODE_STAGES}
        decision, dispatch, ingest = stage["decision"], stage["dispatch"], stage["ingest"]
        assert decision.parent_span_id == intake.span_id, node
        assert dispatch.parent_span_id == decision.span_id, node
        assert dispatch.attributes["toolplane.node_status"] == "queued"
        for name in WORKER_STAGES:  # the worker's, under the dispatch span it was signed
            assert stage[name].parent_span_id == dispatch.span_id, (node, name)
            assert stage[name].service == "toolplane-worker", (node, name)
        assert ingest.parent_span_id == dispatch.span_id, node  # from the control's records
        assert ingest.service == "toolplane-control"
        assert ingest.attributes["toolplane.outcome"] == "accepted"
        assert ingest.attributes["toolplane.trace_claimed_mismatch"] is False
        assert ingest.links == ((ids.trace_id, stage["sandbox_run"].span_id),)
        # in time: decided, dispatched, waited in the queue, verified, ran, signed, ingested
        assert decision.start_ns <= dispatch.start_ns <= dispatch.end_ns <= decision.end_ns
        queue_wait = stage["queue_wait"]
        assert dispatch.start_ns - MS <= queue_wait.start_ns <= dispatch.end_ns, node
        assert queue_wait.end_ns == stage["verify"].start_ns, node
        assert stage["verify"].end_ns <= stage["sandbox_run"].start_ns, node
        assert stage["sandbox_run"].end_ns <= stage["receipt"].start_ns, node
        assert (
            stage["sandbox_run"].end_ns <= ingest.end_ns
            and stage["receipt"].start_ns < ingest.end_ns
        )
    # lint needed search and read: decided in the ingest of the later of the two
    last_ingest = max(one(spans, "ingest", n).end_ns for n in ("search", "read"))
    assert one(spans, "decision", "lint").start_ns >= last_ingest
    assert one(spans, "decision", "search").end_ns <= intake.end_ns


def node_of(traced: Stack, token: str, run_id: str) -> Node:
    client = traced.client(token)
    with client.plane.sessions() as session:
        node = session.scalar(select(Node).where(Node.run_id == run_id))
        assert node is not None and node.envelope is not None
        return node


def test_a_result_claiming_another_runs_trace_is_ingested_in_its_own_run(
    traced: Stack, receiver: OtlpReceiver
) -> None:
    token = traced.tenant()
    client = traced.http(token)
    first = client.call("read_repo_file", {"path": "README.md"}, wait=True)
    assert first.status == "completed"
    victim = run_trace(first.run_id)
    wait_for(lambda: [s for s in receiver.of_trace(victim.trace_id) if s.name.endswith("ingest")])

    second = client.submit("sleepy", {"seconds": 3, "tag": "traces"})
    node = node_of(traced, token, second)
    dispatched = parse_traceparent(node.envelope["envelope"]["traceparent"])
    own = run_trace(second)
    assert dispatched.trace_id == own.trace_id != victim.trace_id
    # a valid-looking trace context of the first run (its root span), signed by a real key
    lie = str(Traceparent(victim.trace_id, victim.span_id))
    app = Celery("mallory", set_as_current=False)
    app.conf.update(celeryconfig.build_config(traced.services.redis_url))
    app.send_task(
        celeryconfig.INGEST_TASK,
        args=[
            forged_result(
                traced, node, result={"slept": 0.0, "pid": 1}, key="real", traceparent=lie
            )
        ],
        queue=celeryconfig.RESULTS_QUEUE,
    )

    def claimed() -> list[ReceivedSpan]:
        return [
            s
            for s in receiver.where(run_id=second, trace_claimed_mismatch=True)
            if s.name == "toolplane.ingest"
        ]

    forged = wait_for(claimed, timeout=30, what="the ingest span of the claiming result")
    assert len(forged) == 1
    span = forged[0]
    assert span.trace_id == own.trace_id and span.parent_span_id == dispatched.span_id
    assert span.links == ()  # not even linked to the trace it claims
    assert span.attributes["toolplane.outcome"] in ("accepted", "ignored")
    assert "trace.claimed_mismatch" in traced.log("control")
    # the real worker's result is ingested in the same trace, and matches it
    honest = wait_for(
        lambda: [
            s
            for s in receiver.where(run_id=second, trace_claimed_mismatch=False)
            if s.name == "toolplane.ingest"
        ],
        timeout=30,
        what="the worker's own result",
    )
    assert [s.trace_id for s in honest] == [own.trace_id]
    # the first run's trace got nothing from the second
    in_victim = receiver.of_trace(victim.trace_id)
    assert {s.attributes.get("toolplane.run_id") for s in in_victim} == {first.run_id}
    assert len([s for s in in_victim if s.name == "toolplane.ingest"]) == 1


def test_the_worker_exports_and_the_tool_never_sees_the_endpoint(
    traced: Stack, receiver: OtlpReceiver
) -> None:
    worker = psutil.Process(traced.worker_pid("probe"))
    pool = worker.children()
    assert pool, "the worker's pool process"
    assert pool[0].environ()["TOOLPLANE_OTLP_ENDPOINT"] == receiver.endpoint  # can fail
    client = traced.http(traced.tenant())
    run = client.call("probe", {"action": "environment"}, wait=True)
    assert run.status == "completed", run
    env = run.nodes[0].result["detail"]["env"]
    port = receiver.endpoint.rsplit(":", 1)[1]
    assert not [k for k in env if k.startswith("OTEL_") or "OTLP" in k], env
    assert not [v for v in env.values() if port in v], env
    assert os.environ.get("TOOLPLANE_OTLP_ENDPOINT") is None  # the test's own process: off
    spans = wait_for(
        lambda: [s for s in receiver.where(run_id=run.run_id) if s.name.endswith("sandbox_run")],
        what="the probe's sandbox_run span",
    )
    assert spans[0].service == "toolplane-worker"
    assert spans[0].attributes["toolplane.tool"] == "probe"


def test_signed_trace_contexts_verify_in_the_ledger_and_offline(
    traced: Stack, tmp_path: Path
) -> None:
    """The envelopes and results that carry a traceparent are in the evidence as signed,
    and their digests and receipts verify there and in an offline bundle."""
    token = traced.tenant()
    run = traced.http(token).call("read_repo_file", {"path": "README.md"}, wait=True)
    assert run.status == "completed"
    node = node_of(traced, token, run.run_id)
    assert node.envelope["envelope"]["traceparent"] is not None  # tracing was on
    report = traced.client(token).verify_ledger(run_id=run.run_id)
    assert report.ok and report.receipts >= 1, report.broken
    done = traced.cli("ledger", "checkpoint", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    out, trust = tmp_path / "run.bundle.json", tmp_path / "trust.json"
    done = traced.cli("ledger", "export", run.run_id, "--out", str(out), token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    assert traced.cli("ledger", "trust", "--out", str(trust)).returncode == 0
    verified = traced.cli("ledger", "verify-bundle", str(out), "--trust", str(trust), "--json")
    assert verified.returncode == 0, verified.stdout
    assert json.loads(verified.stdout)["receipts_verified"] >= 1
    leaves = [base64.b64decode(e["leaf"]) for e in json.loads(out.read_text())["events"]]
    assert sum(b'"traceparent":"00-' in leaf for leaf in leaves) == 2  # dispatched, completed


def test_a_call_approved_later_is_dispatched_in_its_runs_trace(
    traced: Stack, receiver: OtlpReceiver
) -> None:
    """The approval comes in another request, hours later perhaps: the dispatch it makes
    still joins the run's trace, under its root."""
    admin = traced.http(traced.tenant())
    submitter = traced.http(admin.issue_token("traces-submitter", "submitter").token)
    approver = traced.http(admin.issue_token("traces-approver", "approver").token)
    held = submitter.call("read_repo_file", {"path": "README.md"}, environment="prod")
    assert held.status == "awaiting_approval", held
    assert approver.approve(held.run_id, "read_repo_file", reason="ok").status == "granted"
    assert submitter.wait(held.run_id, timeout=60).status == "completed"
    spans = wait_for(
        lambda: spans_of(receiver, held.run_id, ["read_repo_file"]), timeout=30, what="spans"
    )
    ids = run_trace(held.run_id)
    assert {s.trace_id for s in spans} == {ids.trace_id}
    intake, decision = one(spans, "intake"), one(spans, "decision")
    dispatch = one(spans, "dispatch")
    assert decision.parent_span_id == intake.span_id
    assert decision.attributes["toolplane.needs_approval"] is True
    assert decision.attributes["toolplane.node_status"] == "awaiting_approval"
    assert dispatch.parent_span_id == ids.span_id == intake.span_id  # the root, later
    assert dispatch.start_ns > intake.end_ns
    assert one(spans, "ingest").parent_span_id == dispatch.span_id
