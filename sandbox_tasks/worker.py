"""The sandbox worker: one Celery app per tool, consuming only ``tool.<name>``.

For each message: verify the envelope (signature by a control key trusted when the
job is received, audience, lifetime, expiry), claim the job, validate the arguments
with the tool's strict model, run the tool in the contained executor, sign the
result with the tool's key and publish it to ``results``. Anything it will not run
becomes a signed refusal.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from celery import Celery, Task, signals
from celery.worker.request import Request
from kombu import Exchange, Queue
from pydantic import BaseModel, ValidationError

import celeryconfig
from sandbox_tasks.claims import ClaimState, RedisClaims
from sandbox_tasks.envelope import verify_envelope
from sandbox_tasks.errors import EnvelopeRefused
from sandbox_tasks.executor import Outcome
from sandbox_tasks.keys import WorkerKeys
from sandbox_tasks.metrics import WorkerMetrics, job_summary
from sandbox_tasks.receipts import build_result, sign_manifest, sign_result
from sandbox_tasks.registry import ToolContext, ToolSpec, constrained
from sandbox_tasks.tracing import JobTrace, start_worker_tracing, stop_worker_tracing
from toolplane import logfields
from toolplane.canonical import CanonicalJSONError
from toolplane.canonical import digest as canonical_digest
from toolplane.errors import SettingsError, first_problem
from toolplane.messages import ToolResult, now_ms

log = logging.getLogger("toolplane.worker")

__all__ = ["WorkerDeps", "build_worker_app", "handle_job"]

CLAIM_MARGIN_MS = 5_000  # time between claim and publish beyond the tool's own limit


class Executor(Protocol):
    """Runs one call of a tool in containment; ``containment`` goes into every receipt.

    ``tenant`` is the envelope's: calls of different tenants never share a runner."""

    containment: str

    def run(self, spec: ToolSpec, args: BaseModel, ctx: ToolContext, *, tenant: str) -> Outcome: ...


@dataclass(frozen=True)
class WorkerDeps:
    """Everything a worker needs, built once by its composition root."""

    spec: ToolSpec
    keys: WorkerKeys  # control's public keys and the tool's receipt key, as of each job
    claims: RedisClaims
    executor: Executor
    context: ToolContext
    worker_name: str
    metrics: WorkerMetrics | None = None  # counted in the main process (sandbox_tasks.metrics)


def received_digest(raw: Any) -> str | None:
    """The digest of what was received (its ``envelope`` part if it has one), if hashable."""
    part = raw.get("envelope", raw) if isinstance(raw, dict) else raw
    try:
        return canonical_digest(part)
    except CanonicalJSONError:
        return None


def handle_job(
    raw: Any, deps: WorkerDeps, *, retry_in: Any = None, trace: JobTrace | None = None
) -> ToolResult:
    """Verify, claim, run and report one job; returns the (unsigned) result to publish.

    ``retry_in(seconds)`` is called (and must raise) when another worker holds a
    live claim on the job, so the message comes back later instead of being lost.
    ``trace`` gets the job's spans (sandbox_tasks.tracing), from the verified envelope on.
    """
    job = trace if trace is not None else JobTrace()
    started = now_ms()
    spec = deps.spec

    def report(kind: str, envelope: Any, digest: str | None, **kw: Any) -> ToolResult:
        return build_result(
            kind=kind,
            tool=spec.name,
            worker=deps.worker_name,
            started_at=started,
            envelope=envelope,
            envelope_sha256=digest,
            containment=deps.executor.containment,
            traceparent=job.traceparent,
            **kw,
        )

    try:
        try:
            control_keys = deps.keys.control_ring()  # revocations are seen at every job
        except SettingsError as e:  # fail closed: no job runs on keys we cannot read
            log.error("keys.unreadable problem=%s", e)
            raise EnvelopeRefused("envelope_invalid", f"control's keys: {e}") from e
        signed = verify_envelope(raw, tool=spec.name, keys=control_keys, now_ms=started)
    except EnvelopeRefused as e:
        code, message = e.code, e.message
        if code == "envelope_expired" and _already_ran(raw, deps.claims):
            # A late copy of a job that ran: say so, so that control does not take the
            # expiry for a job that never ran (and retry it, or fail it) before its result.
            code, message = "replay", "job already ran (this copy's envelope has expired)"
        log.warning("job.refused code=%s reason=%s", code, message)
        return report("refusal", None, received_digest(raw), error=(code, message))
    envelope, digest = signed.envelope, signed.digest
    job.verified(envelope)  # its trace context is the control's, signed: now followed
    ids = {"run_id": envelope.run_id, "node_id": envelope.node_id, "job_id": envelope.job_id}
    with logfields.bound(**ids, tenant=envelope.tenant):  # every line of this job carries them
        return _claim_and_run(envelope, digest, deps, report, retry_in, job)


def _claim_and_run(
    envelope: Any, digest: str, deps: WorkerDeps, report: Any, retry_in: Any, job: JobTrace
) -> ToolResult:
    spec = deps.spec

    lease_ms = int(spec.limits.timeout_s * 1000) + CLAIM_MARGIN_MS
    claim = deps.claims.acquire(envelope.job_id, lease_ms=lease_ms)
    if claim.state is ClaimState.DONE:
        log.warning("job.refused code=replay job=%s", envelope.job_id)
        return report("refusal", envelope, digest, error=("replay", "job already ran"))
    if claim.state is ClaimState.RUNNING:
        if retry_in is not None:
            retry_in(claim.ttl_ms / 1000 + 1)
        return report("refusal", envelope, digest, error=("replay", "job runs under a live claim"))

    spec = constrained(  # signed by control
        spec, envelope.limits, envelope.egress, envelope.private_egress
    )
    try:
        args = spec.args_model.model_validate(envelope.args)
    except ValidationError as e:
        outcome_result, outcome_error = (
            None,
            ("invalid_argument", ": ".join(first_problem(e, where="args"))),
        )
        fetched: list[dict[str, Any]] = []
    else:
        log.info("job.start job=%s containment=%s", envelope.job_id, deps.executor.containment)
        try:
            with job.span("sandbox_run", containment=deps.executor.containment):
                outcome = deps.executor.run(spec, args, deps.context, tenant=envelope.tenant)
        except OSError as e:  # fork, pipe or scratch failed: the call fails, the worker lives
            log.exception("executor.failed job=%s", envelope.job_id)
            outcome = Outcome(False, None, "tool_error", f"executor: {e}")
        outcome_result = outcome.result
        fetched = list(outcome.fetches)
        outcome_error = (
            None
            if outcome.ok
            else (outcome.error_code or "tool_error", outcome.error_message or "")
        )
    log.info("job.ran job=%s ok=%s", envelope.job_id, outcome_error is None)
    result = report(
        "result", envelope, digest, result=outcome_result, error=outcome_error, fetches=fetched
    )
    return result


def _already_ran(raw: Any, claims: RedisClaims) -> bool:
    envelope = raw.get("envelope") if isinstance(raw, dict) else None
    job_id = envelope.get("job_id") if isinstance(envelope, dict) else None
    return isinstance(job_id, str) and len(job_id) <= 300 and claims.done(job_id)


def heartbeat_path(scratch: Path, tool: str) -> Path:
    """The file a tool's worker touches at each Celery heartbeat (every 2 s): its liveness.

    A container's healthcheck reads its age (docker/healthcheck.py): a Redis PING proves the
    broker answers, this proves the worker's event loop still runs.
    """
    return scratch / f"heartbeat.{tool}"


def build_worker_app(
    deps: WorkerDeps, *, broker_url: str, visibility_timeout: int, queue_wait_s: int = 60
) -> Celery:
    """The Celery app of one tool's worker pool."""
    app = Celery(f"toolplane-worker-{deps.spec.name}", set_as_current=False)
    queue = celeryconfig.tool_queue(deps.spec.name)
    app.conf.update(
        celeryconfig.build_config(
            broker_url, visibility_timeout=visibility_timeout, unacked_owner=queue
        )
    )
    app.conf.task_default_queue = queue
    # What a worker publishes is results: the control's ingest reports those (received,
    # succeeded) to Flower; a task-sent event of each would be one more publish per call.
    app.conf.task_send_sent_event = False
    # A pidbox queue without x-expires: the worker then runs none of kombu's binding scripts,
    # and its broker user needs no write on shared binding tables (control.broker.acl).
    app.conf.control_queue_expires = None
    # The control declares the queues; a worker's broker user may not write their bindings.
    app.conf.task_queues = [
        Queue(name, Exchange(name), routing_key=name, no_declare=True)
        for name in (queue, celeryconfig.RESULTS_QUEUE)
    ]
    # A done claim outlives every copy of the job: its envelope expires by then.
    keep_ms = (queue_wait_s + visibility_timeout + int(deps.spec.limits.timeout_s) + 60) * 1000

    @app.task(name=queue, bind=True, acks_late=True, max_retries=None, **_counted(deps))
    def run_tool(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raw = args[0] if len(args) == 1 and not kwargs else {"args": list(args), **kwargs}

        def retry_in(seconds: float) -> None:
            raise self.retry(countdown=seconds)

        job = JobTrace()
        result = handle_job(raw, deps, retry_in=retry_in, trace=job)
        ids = {"run_id": result.run_id, "node_id": result.node_id, "job_id": result.job_id}
        with logfields.bound(**ids):
            return _publish(result, job)

    def _publish(result: ToolResult, job: JobTrace) -> dict[str, Any]:
        with job.span("receipt", kind=result.kind, ok=result.ok):
            message = sign_result(result, deps.keys.signer())
            app.send_task(
                celeryconfig.INGEST_TASK,
                args=[message.model_dump(mode="json")],
                queue=celeryconfig.RESULTS_QUEUE,
                argsrepr=f"(<signed {result.kind} {result.job_id}>,)",  # events show no result
                kwargsrepr="{}",
            )
        if result.kind == "result" and result.job_id is not None:
            # Published first, then done: a crash in between re-runs the job,
            # and control accepts only one result per (node, attempt).
            deps.claims.complete(result.job_id, keep_ms=keep_ms)
        return job_summary(result)  # what the main process counts (no result, no ids)

    beat = heartbeat_path(deps.context.scratch_dir, deps.spec.name)

    @signals.heartbeat_sent.connect(weak=False)
    def alive(sender: Any = None, **_: Any) -> None:
        try:
            beat.touch()
        except OSError as e:  # a full or read-only scratch must not stop the worker
            log.warning("worker.heartbeat_file path=%s error=%s", beat, e)

    @signals.worker_process_init.connect(weak=False)
    def start_tracing(**_: Any) -> None:  # after the fork: the exporter's thread is this pool's
        start_worker_tracing(deps.spec.name, os.environ)

    @signals.worker_process_shutdown.connect(weak=False)
    def stop_runners(**_: Any) -> None:
        stop_worker_tracing()
        close = getattr(deps.executor, "close", None)  # kill the runners, remove their cgroups
        if close is not None:
            try:
                close()
            except Exception:  # a hook must never stop the shutdown
                log.exception("sandbox.close_failed tool=%s", deps.spec.name)

    @signals.worker_ready.connect(weak=False)
    def announce(sender: Any = None, **_: Any) -> None:
        signer = deps.keys.signer()
        manifest = sign_manifest(deps.spec.manifest(), signer)
        app.send_task(
            celeryconfig.MANIFEST_TASK,
            args=[manifest.model_dump(mode="json")],
            queue=celeryconfig.RESULTS_QUEUE,
        )
        log.info("tool.announced tool=%s key=%s", deps.spec.name, signer.key_id)

    return app


def _counted(deps: WorkerDeps) -> dict[str, Any]:
    """With metrics on, the task's requests count each job's summary when the pool hands
    it back: in the worker's main process, never in a pool child."""
    metrics = deps.metrics
    if metrics is None:
        return {}

    class CountedRequest(Request):
        # Celery subclasses this per task and overrides on_success there; the pool calls
        # back the instance's attribute, so the count wraps it on the instance.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            done = self.on_success

            def counted(failed__retval__runtime: Any, **kw: Any) -> Any:
                failed, summary, _ = failed__retval__runtime
                try:
                    if not failed:
                        metrics.count(summary)
                except Exception:  # a hook boundary: the job's ack must never depend on it
                    log.exception("worker.metrics_failed")
                return done(failed__retval__runtime, **kw)

            self.on_success = counted  # type: ignore[method-assign]

    return {"Request": CountedRequest}


def default_worker_name(tool: str) -> str:
    return f"{tool}@{socket.gethostname()}"


def make_claims(url: str, tool: str) -> RedisClaims:
    return RedisClaims(redis.Redis.from_url(url), prefix=celeryconfig.claims_prefix(tool))
