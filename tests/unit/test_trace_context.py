"""The trace context in envelopes and results: its pattern, its signature, its old format,
the control's rule that a result's claim never picks a trace, and tracing off at no cost."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from control.ops.processes import worker_env
from control.orchestration.dispatch import sign_envelope
from ledger.receipts import ReceiptProblem, check_result_message
from sandbox_tasks.envelope import verify_envelope
from sandbox_tasks.errors import EnvelopeRefused
from sandbox_tasks.receipts import build_result, sign_result
from toolplane.canonical import canonical_json
from toolplane.messages import Envelope, SignedEnvelope, ToolResult, now_ms, signed_bytes
from toolplane.settings import Settings
from toolplane.signing import Ed25519Signer, KeyRing, PublicKey, key_id_for
from toolplane.tracecontext import TraceContextError, Traceparent, parse_traceparent, run_trace
from toolplane.tracing import otlp_endpoint, trace_env

ROOT = Path(__file__).resolve().parents[2]
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
TOOL = "read_repo_file"
TP = "00-" + "4b" * 16 + "-" + "a1" * 8 + "-01"
OTHER = "00-" + "c3" * 16 + "-" + "d2" * 8 + "-01"


def ed25519(owner: str) -> tuple[Ed25519Signer, PublicKey]:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    key_id = key_id_for(owner, public)
    key = PublicKey(
        key_id=key_id, owner=owner, algorithm="ed25519", material=public, not_before=EPOCH
    )
    return Ed25519Signer(private_key=private, key_id=key_id, owner=owner), key


CONTROL, CONTROL_KEY = ed25519("control")
WORKER, WORKER_KEY = ed25519(f"tool.{TOOL}")
RING = KeyRing([CONTROL_KEY, WORKER_KEY])


def envelope(traceparent: str | None = TP) -> SignedEnvelope:
    return sign_envelope(
        signer=CONTROL,
        run_id="run_1",
        node_id="n1",
        attempt=1,
        tenant="acme",
        principal="alice",
        tool=TOOL,
        args={"path": "README.md"},
        decision_id="dec_1",
        policy_version="a" * 64,
        ttl_s=600,
        traceparent=traceparent,
    )


def verify(raw: dict) -> SignedEnvelope:
    return verify_envelope(raw, tool=TOOL, keys=RING, now_ms=now_ms())


# -- the W3C format --------------------------------------------------------------------


def test_a_traceparent_parses_and_prints_the_same() -> None:
    parsed = parse_traceparent(TP)
    assert parsed == Traceparent("4b" * 16, "a1" * 8, True)
    assert str(parsed) == TP
    assert parse_traceparent(TP[:-1] + "0").sampled is False


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "55 characters"),
        (TP + "-", "55 characters"),
        ("01" + TP[2:], "version 00"),
        ("ff" + TP[2:], "version 00"),
        (TP.upper(), "lower-case hex"),
        (TP[:-2] + "02", "flags are 00 or 01"),
        (TP[:-2] + "zz", "lower-case hex"),
        ("00-" + "0" * 32 + TP[35:], "all-zero"),
        (TP[:36] + "0" * 16 + "-01", "all-zero"),
        (TP.replace("-", "_"), "separated by '-'"),
    ],
)
def test_a_bad_traceparent_is_refused_naming_the_rule(value: str, rule: str) -> None:
    with pytest.raises(TraceContextError, match=rule):
        parse_traceparent(value)
    with pytest.raises(ValidationError) as info:  # and in a message, naming the field
        Envelope.model_validate({**envelope().envelope.model_dump(), "traceparent": value})
    assert info.value.errors()[0]["loc"] == ("traceparent",)


def test_a_runs_trace_is_derived_from_its_id_alone() -> None:
    first = run_trace("run_abc")
    assert first == run_trace("run_abc")
    assert parse_traceparent(str(first)) == first
    other = run_trace("run_abd")
    assert other.trace_id != first.trace_id and other.span_id != first.span_id


# -- signed with the rest ---------------------------------------------------------------


def test_the_traceparent_is_covered_by_the_envelopes_signature() -> None:
    raw = envelope().model_dump(mode="json")
    assert raw["envelope"]["traceparent"] == TP
    assert verify(copy.deepcopy(raw)).envelope.traceparent == TP
    for altered in (OTHER, TP[:-2] + "00", None):  # another run's, unsampled, removed
        tampered = copy.deepcopy(raw)
        tampered["envelope"]["traceparent"] = altered
        with pytest.raises(EnvelopeRefused) as info:
            verify(tampered)
        assert info.value.code == "envelope_invalid"
    added = envelope(None).model_dump(mode="json")
    added["envelope"]["traceparent"] = TP  # added to an envelope signed without one
    with pytest.raises(EnvelopeRefused):
        verify(added)


def test_an_envelope_from_before_the_field_verifies_unchanged() -> None:
    """Without a trace context, the bytes signed are exactly those of the old format."""
    signed = envelope(None)
    raw = signed.model_dump(mode="json")
    assert "traceparent" not in raw["envelope"]
    old = json.loads(json.dumps(raw))  # as an old control wrote it: no such key at all
    assert canonical_json(old["envelope"]) == signed_bytes(signed.envelope)
    assert verify(old).digest == signed.digest
    assert verify(old).envelope.traceparent is None


def result(traceparent: str | None) -> ToolResult:
    signed = envelope()
    return build_result(
        kind="result",
        tool=TOOL,
        worker="w@h",
        started_at=now_ms(),
        envelope=signed.envelope,
        envelope_sha256=signed.digest,
        result={"content": "x"},
        containment="test",
        traceparent=traceparent,
    )


def test_the_traceparent_is_covered_by_the_receipt_and_old_results_verify() -> None:
    received = datetime.now(UTC)
    message = sign_result(result(TP), WORKER).model_dump(mode="json")
    assert check_result_message(message, RING, received=received).result.traceparent == TP
    for altered in (OTHER, None):
        tampered = copy.deepcopy(message)
        tampered["result"]["traceparent"] = altered
        with pytest.raises(ReceiptProblem, match="signature"):
            check_result_message(tampered, RING, received=received)
    bad = copy.deepcopy(message)
    bad["result"]["traceparent"] = "00-zz"
    with pytest.raises(ReceiptProblem, match="traceparent"):
        check_result_message(bad, RING, received=received)
    old = sign_result(result(None), WORKER).model_dump(mode="json")
    assert "traceparent" not in old["result"]
    assert check_result_message(old, RING, received=received).result.traceparent is None


# -- settings ---------------------------------------------------------------------------


def test_an_endpoint_turns_tracing_on_and_nothing_else_does() -> None:
    assert otlp_endpoint({}) is None
    assert otlp_endpoint({"OTEL_BSP_SCHEDULE_DELAY": "1"}) is None
    assert otlp_endpoint({"TOOLPLANE_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    assert otlp_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == (
        "http://c:4318/v1/traces"
    )
    full = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c/x", "OTEL_EXPORTER_OTLP_ENDPOINT": "y"}
    assert otlp_endpoint(full) == "https://c/x"
    assert otlp_endpoint({**full, "OTEL_SDK_DISABLED": "true"}) is None


def test_a_worker_gets_the_otlp_settings_and_no_other(tmp_path: Path) -> None:
    source = {
        "PATH": "/bin",
        "TOOLPLANE_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer t",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_PYTHON_SOMETHING_ELSE": "no",
        "TOOLPLANE_DATABASE_URL": "postgresql://secret@db/x",
    }
    assert set(trace_env(source)) == {
        "TOOLPLANE_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_BSP_SCHEDULE_DELAY",
    }
    env = worker_env(
        Settings(home=tmp_path / "home", repo_root=tmp_path, docs_root=tmp_path),
        tool=TOOL,
        home=tmp_path / "w",
        broker_url="redis://w:pw@127.0.0.1:6379/0",
        source=source,
    )
    assert env["TOOLPLANE_OTLP_ENDPOINT"] == "http://collector:4318"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == "authorization=Bearer t"
    assert "OTEL_PYTHON_SOMETHING_ELSE" not in env and "TOOLPLANE_DATABASE_URL" not in env


# -- in a fresh interpreter: the SDK's global provider must not leak into other tests -----


def run_probe(code: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


OFF = """
import json, sys, threading
from types import SimpleNamespace
from control.ops.tracing import start_control_tracing
from control.orchestration import spans
from sandbox_tasks.tracing import JobTrace, start_worker_tracing

on = [start_control_tracing(), start_worker_tracing("t")]
run, node = SimpleNamespace(id="run_1"), SimpleNamespace(node_id="n", tool="t", attempt=0, status="queued")
seen = []
@spans.traced("dispatch")
def step(*, run, node):
    seen.append(spans.current_traceparent())
with spans.intake_span("run_1", start_ns=0):
    step(run=run, node=node)
spans.record_ingest(run_id="run_1", node_id="n", attempt=1, tool="t", outcome="accepted",
                    dispatched=None, claimed=None, start_ns=0, end_ns=1)
job = JobTrace()
with job.span("sandbox_run"):
    pass
print(json.dumps({
    "on": on,
    "traceparents": seen + [job.traceparent],
    "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
    "exporter": sorted(m for m in sys.modules if m.startswith("opentelemetry.exporter")),
    "threads": [t.name for t in threading.enumerate()],
}))
"""


def test_with_no_endpoint_tracing_is_off_at_no_cost() -> None:
    """No SDK imported, no exporter thread, no span, no traceparent in an envelope."""
    report = run_probe(OFF, {"OTEL_BSP_SCHEDULE_DELAY": "100"})
    assert report == {
        "on": [False, False],
        "traceparents": [None, None],
        "sdk": [],
        "exporter": [],
        "threads": ["MainThread"],
    }


def test_the_probe_sees_tracing_when_an_endpoint_is_set() -> None:
    # The same probe can fail: with an endpoint (nothing listens there; the spans wait in
    # the exporter's queue), the SDK, its exporter thread and a traceparent are there.
    report = run_probe(
        OFF, {"TOOLPLANE_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    )
    assert report["on"] == [True, True]
    assert report["traceparents"][0] is not None
    assert parse_traceparent(report["traceparents"][0]).trace_id == run_trace("run_1").trace_id
    assert report["sdk"] and report["exporter"] and len(report["threads"]) > 1


CLAIMS = """
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from control.orchestration import spans
from toolplane import tracing
from toolplane.tracecontext import Traceparent, run_trace

memory = InMemorySpanExporter()
provider = TracerProvider(id_generator=tracing._RunIdGenerator())
provider.add_span_processor(SimpleSpanProcessor(memory))
trace.set_tracer_provider(provider)
tracing._state["provider"] = provider

mine, theirs = run_trace("run_mine"), run_trace("run_theirs")
dispatched = str(Traceparent(mine.trace_id, "ab" * 8))
with spans.intake_span("run_mine", start_ns=1):
    pass
cases = {
    "honest": str(Traceparent(mine.trace_id, "cd" * 8)),
    "other_run": str(Traceparent(theirs.trace_id, theirs.span_id)),
    "malformed": "00-not-a-trace",
    "none": None,
}
for name, claimed in cases.items():
    spans.record_ingest(run_id="run_mine", node_id=name, attempt=1, tool="t", outcome="accepted",
                        dispatched=dispatched, claimed=claimed, start_ns=5, end_ns=9)
spans.record_ingest(run_id="run_mine", node_id="forged_dispatch", attempt=1, tool="t",
                    outcome="accepted", dispatched=cases["other_run"], claimed=None,
                    start_ns=5, end_ns=9)
out = {}
for s in memory.get_finished_spans():
    c = s.get_span_context()
    out[s.attributes.get("toolplane.node_id", s.name)] = {
        "trace": f"{c.trace_id:032x}", "span": f"{c.span_id:016x}",
        "parent": f"{s.parent.span_id:016x}" if s.parent else None,
        "mismatch": s.attributes.get("toolplane.trace_claimed_mismatch"),
        "links": [f"{l.context.trace_id:032x}-{l.context.span_id:016x}" for l in s.links],
    }
print(json.dumps({"spans": out, "mine": [mine.trace_id, mine.span_id]}))
"""


def test_a_results_claimed_trace_never_chooses_the_trace_of_its_ingest() -> None:
    report = run_probe(CLAIMS)
    spans, (trace_id, root) = report["spans"], report["mine"]
    assert spans["toolplane.intake"] == {
        "trace": trace_id,
        "span": root,
        "parent": None,
        "mismatch": None,
        "links": [],
    }
    for name in ("honest", "other_run", "malformed", "none"):
        assert spans[name]["trace"] == trace_id, name  # the run's, whatever was claimed
        assert spans[name]["parent"] == "ab" * 8, name  # the dispatch span the control signed
    assert spans["honest"]["links"] == [f"{trace_id}-{'cd' * 8}"]
    assert spans["honest"]["mismatch"] is False and spans["none"]["mismatch"] is False
    for name in ("other_run", "malformed"):
        assert spans[name]["mismatch"] is True and spans[name]["links"] == [], name
    # a dispatch record of another trace (never written by the control) falls back to the root
    assert spans["forged_dispatch"]["trace"] == trace_id
    assert spans["forged_dispatch"]["parent"] == root


def test_a_failed_span_names_the_exception_type_and_nothing_of_its_message() -> None:
    """The collector is outside the control's trust boundary: an exception's message (a
    statement's parameters, a tool's arguments) and traceback stay in the logs."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from toolplane.tracing import errors_by_type

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with (
        pytest.raises(ValueError),
        tracer.start_as_current_span(
            "toolplane.stage", record_exception=False, set_status_on_exception=False
        ) as span,
        errors_by_type(span),
    ):
        raise ValueError("password=hunter2 args={'path': 'secret.txt'}")
    (done,) = exporter.get_finished_spans()
    assert done.status.description == "ValueError"
    assert not done.events  # no exception event: no message, no traceback
    assert "hunter2" not in done.to_json() and "secret.txt" not in done.to_json()


def test_every_span_of_ours_records_no_exception_text() -> None:
    """Each place that opens a span around our code turns the SDK's exception recording
    off (and uses errors_by_type), so no later span forgets it."""
    import re

    from tests.harness import REPO

    opened = re.compile(r"(start_as_current_span|use_span)\(")
    for path in [*REPO.glob("control/**/*.py"), *REPO.glob("sandbox_tasks/**/*.py")]:
        text = path.read_text()
        for match in opened.finditer(text):
            call = text[match.end() : text.find("\n)", match.end()) + 2]
            head = text[match.end() : match.end() + 600]
            assert "record_exception=False" in head, f"{path}: {call[:80]}"
            assert "errors_by_type(" in text[match.end() : match.end() + 900], path
