"""What a principal may do, carried out in the control's own process.

The HTTP API builds one :class:`Operations` per request for the identity its token
names, and calls it; nothing here is for callers, who hold only the API's URL and a
token (``control.client``). Tests of the control plane call it directly too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from control.errors import ControlError
from control.governance.approvals import Decided, decide_approval, waiting_for
from control.governance.auth import (
    ADMINS,
    SUBMITTERS,
    Identity,
    IssuedToken,
    Role,
    authenticate,
    issue_token,
    list_tokens,
    require_role,
    revoke_token,
)
from control.governance.freeze import freeze, list_freezes, unfreeze
from control.governance.scope import Scope, decide_scope
from control.ops.runtime import ControlPlane
from control.orchestration.dispatch import publish_pending, publish_staged
from control.orchestration.orchestrator import cancel_run
from control.orchestration.runs import RunView, get_run, list_runs
from control.orchestration.states import TERMINAL_RUN, RunStatus
from control.orchestration.submission import CallRequest, RunRequest, check_run, submit_run
from control.orchestration.workflows import WorkflowSpec, load_workflow
from ledger.chain import chain_for
from ledger.checkpoints import trusted_checkpoints
from ledger.models import Node, Run
from ledger.verify import Broken, VerifyReport, verify_ledger
from toolplane.settings import Settings

__all__ = ["Operations", "WaitTimeout"]

IDENTITY_TTL_S = 5.0


class WaitTimeout(ControlError):
    def __init__(self, run_id: str, timeout: float) -> None:
        super().__init__(f"run {run_id!r} did not finish within {timeout:g}s")
        self.run_id = run_id


class Operations:
    """The operations of one principal: by token (checked again every few seconds), or for
    an identity the caller has already authenticated (the API, once per request)."""

    def __init__(
        self,
        plane: ControlPlane,
        *,
        token: str | None = None,
        identity: Identity | None = None,
        reads: sessionmaker[Session] | None = None,  # for views (the API's: autocommit)
    ) -> None:
        self.plane = plane
        self.reads = reads or plane.sessions
        self._token = token
        self._identity: Identity | None = identity
        self._fixed = identity is not None
        self._identity_at = 0.0

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Operations:
        settings = settings or Settings()
        token = settings.token.get_secret_value() if settings.token else None
        return cls(ControlPlane.from_settings(settings), token=token)

    @property
    def identity(self) -> Identity:
        """Who the token names; checked again every few seconds (revocation, expiry)."""
        if self._fixed and self._identity is not None:
            return self._identity
        if self._identity is None or time.monotonic() - self._identity_at > IDENTITY_TTL_S:
            with self.plane.sessions() as session:
                self._identity = authenticate(session, self._token)
            self._identity_at = time.monotonic()
        return self._identity

    def scope(self, environment: str | None, classification: str | None) -> Scope:
        """What this principal's calls run under: the server's, or stricter if asked."""
        settings = self.plane.settings
        return decide_scope(
            environments=settings.environment_order,
            classifications=settings.classification_order,
            server_environment=self.identity.environment or settings.environment,
            server_classification=settings.classification,
            environment=environment,
            classification=classification,
        )

    def submit(self, tool: str, args: dict[str, Any], **options: Any) -> str:
        """Submit one tool call and return its run id; ``options`` as :meth:`submit_call`."""
        return self.submit_call(tool, args, **options).run_id

    def submit_call(
        self,
        tool: str,
        args: dict[str, Any],
        *,
        environment: str | None = None,
        classification: str | None = None,
        idempotency_key: str | None = None,
        on_behalf_of: str | None = None,
    ) -> RunView:
        """Submit one tool call and return its run as committed (decided and, if allowed,
        published)."""
        request = self._call_request(
            tool, args, environment, classification, idempotency_key, on_behalf_of
        )
        return self._start(request, call=True)

    def check_call(self, tool: str, args: dict[str, Any], **options: Any) -> None:
        """Refuse what :meth:`submit_call` would refuse before recording anything (role,
        scope, tool, arguments, a reused key), recording nothing: a batch checks every call
        first. ``options`` as :meth:`submit_call`."""
        require_role(self.identity, SUBMITTERS, "submit calls")
        keys = ("environment", "classification", "idempotency_key", "on_behalf_of")
        if unknown := set(options) - set(keys):
            raise TypeError(f"check_call() got unexpected options {sorted(unknown)}")
        request = self._call_request(tool, args, *(options.get(k) for k in keys))
        with self.plane.sessions() as session:
            check_run(
                session,
                identity=self.identity,
                request=request,
                gov=self.plane.governance(),
                call=True,
            )

    def _call_request(
        self,
        tool: str,
        args: dict[str, Any],
        environment: str | None,
        classification: str | None,
        idempotency_key: str | None,
        on_behalf_of: str | None,
    ) -> RunRequest:
        """One call as the one-node run it is, under the scope this principal may use."""
        scope = self.scope(environment, classification)
        return CallRequest(
            tool=tool,
            args=args,
            environment=scope.environment,
            classification=scope.classification,
            idempotency_key=idempotency_key,
            on_behalf_of=on_behalf_of,
        ).as_run()

    def _start(self, request: RunRequest, *, call: bool = False) -> RunView:
        """Record the run, decide its first nodes, publish what was allowed."""
        # an auditor changes nothing
        require_role(self.identity, SUBMITTERS, "submit calls" if call else "submit runs")
        with self.plane.sessions() as session:
            submitted = submit_run(
                session,
                identity=self.identity,
                request=request,
                gov=self.plane.governance(),
                call=call,
            )
        if submitted.staged:  # from the rows in hand
            publish_staged(self.plane.sessions, self.plane.publisher, submitted.staged)
        elif submitted.outbox_ids:
            publish_pending(self.plane.sessions, self.plane.publisher, ids=submitted.outbox_ids)
        # the same idempotency key again: its run as it is now
        return submitted.view or self.run(submitted.run_id)

    def workflow(self, name: str) -> WorkflowSpec:
        """The workflow ``name`` from the workflows directory, checked."""
        return load_workflow(self.plane.settings.workflow_dir, name)

    def submit_workflow(
        self, workflow: str | WorkflowSpec, inputs: dict[str, Any] | None = None, **options: Any
    ) -> str:
        """Start a run of a workflow (by name, or a spec) and return its id; ``options`` as
        :meth:`start_workflow`.

        Its first nodes are decided and, if allowed, published before this returns;
        the control process dispatches the rest as their dependencies complete.
        """
        return self.start_workflow(workflow, inputs, **options).run_id

    def start_workflow(
        self,
        workflow: str | WorkflowSpec,
        inputs: dict[str, Any] | None = None,
        *,
        environment: str | None = None,
        classification: str | None = None,
        idempotency_key: str | None = None,
        on_behalf_of: str | None = None,
    ) -> RunView:
        """Start a run of a workflow and return it as committed (see :meth:`submit_workflow`)."""
        require_role(self.identity, SUBMITTERS, "submit runs")
        spec = self.workflow(workflow) if isinstance(workflow, str) else workflow
        scope = self.scope(environment, classification)
        return self._start(
            RunRequest(
                spec=spec,
                inputs=dict(inputs or {}),
                environment=scope.environment,
                classification=scope.classification,
                idempotency_key=idempotency_key,
                on_behalf_of=on_behalf_of,
            )
        )

    def run_workflow(
        self,
        workflow: str | WorkflowSpec,
        inputs: dict[str, Any] | None = None,
        *,
        wait: bool = False,
        timeout: float = 120.0,
        on_progress: Callable[[str, str, int], None] | None = None,
        on_waiting: Callable[[list[dict[str, Any]]], None] | None = None,
        **options: Any,
    ) -> RunView:
        """Submit a workflow; with ``wait``, return once the run has ended (see :meth:`wait`)."""
        run_id = self.submit_workflow(workflow, inputs, **options)
        if wait:
            return self.wait(
                run_id, timeout=timeout, on_progress=on_progress, on_waiting=on_waiting
            )
        return self.run(run_id)

    def cancel(self, run_id: str, *, reason: str | None = None) -> RunView:
        """Cancel a run of this tenant: nothing more is dispatched (RunCancelled).

        Jobs already with a worker are revoked where the workers still hold them; a
        result that arrives anyway is recorded and ignored.
        """
        with self.plane.sessions() as session:
            _, in_flight = cancel_run(session, self.identity, run_id, reason=reason)
        if in_flight:
            with contextlib.suppress(Exception):  # best effort: the node is cancelled anyway
                self.plane.celery.control.revoke(in_flight)
        return self.run(run_id)

    def call(
        self,
        tool: str,
        args: dict[str, Any],
        *,
        environment: str | None = None,
        classification: str | None = None,
        idempotency_key: str | None = None,
        on_behalf_of: str | None = None,
        wait: bool = False,
        timeout: float = 60.0,
        on_waiting: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> RunView:
        """Submit one tool call; with ``wait``, return once the run has ended.

        A run that waits for an approval is waited for too (``on_waiting`` hears
        once for whom); if it still waits at the timeout, it is returned as it is.
        """
        run_id = self.submit(
            tool,
            args,
            environment=environment,
            classification=classification,
            idempotency_key=idempotency_key,
            on_behalf_of=on_behalf_of,
        )
        if wait:
            return self.wait(run_id, timeout=timeout, on_waiting=on_waiting)
        return self.run(run_id)

    def run(self, run_id: str) -> RunView:
        with self.reads() as session:
            return get_run(session, self.identity, run_id, artifacts=self.plane.artifacts)

    def runs(
        self,
        *,
        limit: int = 50,
        awaiting_approval: bool = False,
        status: RunStatus | None = None,
        before: tuple[datetime, str] | None = None,
        ids: list[str] | None = None,
        summary: bool = False,
    ) -> list[RunView]:
        """This tenant's runs, newest first (``before``: the page after that run;
        ``summary``: without results and receipts)."""
        with self.reads() as session:
            return list_runs(
                session,
                self.identity,
                limit=limit,
                awaiting_approval=awaiting_approval,
                status=status,
                before=before,
                ids=ids,
                summary=summary,
                artifacts=self.plane.artifacts,
            )

    def wait(
        self,
        run_id: str,
        *,
        timeout: float = 60.0,
        poll_s: float = 0.002,
        on_waiting: Callable[[list[dict[str, Any]]], None] | None = None,
        on_progress: Callable[[str, str, int], None] | None = None,
    ) -> RunView:
        """Poll the run's status (cheaply) until it ends; then read it whole.

        ``on_progress(node_id, status, attempt)`` hears of every node's status as it
        changes; ``on_waiting`` hears once for whom a run waits that needs an approval.
        """
        deadline = time.monotonic() + timeout
        delay = poll_s
        identity = self.identity
        told = False
        seen: dict[str, tuple[str, int]] = {}
        while True:
            with self.plane.sessions() as session:
                status = session.scalar(
                    select(Run.status).where(Run.id == run_id, Run.tenant_id == identity.tenant_id)
                )
                if status is not None and on_progress is not None:
                    for node_id, node_status, attempt in session.execute(
                        select(Node.node_id, Node.status, Node.attempt)
                        .where(Node.run_id == run_id)
                        .order_by(Node.created_at, Node.node_id)
                    ):
                        if seen.get(node_id) != (node_status, attempt):
                            seen[node_id] = (node_status, attempt)
                            on_progress(node_id, node_status, attempt)
                if status == RunStatus.AWAITING_APPROVAL and not told:
                    told = True
                    if on_waiting is not None:
                        on_waiting(waiting_for(session, identity.tenant_id, run_id))
            if status is None or status in TERMINAL_RUN:
                return self.run(run_id)  # raises NotFound for another tenant's run
            if time.monotonic() >= deadline:
                if status == RunStatus.AWAITING_APPROVAL:
                    return self.run(run_id)
                raise WaitTimeout(run_id, timeout)
            time.sleep(delay)
            delay = min(delay * 1.2, 0.05 if status != RunStatus.AWAITING_APPROVAL else 0.5)

    # -- approvals -------------------------------------------------------------------
    def approve(self, run_id: str, node_id: str, *, reason: str | None = None) -> Decided:
        """Approve a waiting call (approver role, not its submitter) and dispatch it."""
        return self._decide(run_id, node_id, grant=True, reason=reason)

    def reject(self, run_id: str, node_id: str, *, reason: str) -> Decided:
        return self._decide(run_id, node_id, grant=False, reason=reason)

    def _decide(self, run_id: str, node_id: str, *, grant: bool, reason: str | None) -> Decided:
        with self.plane.sessions() as session:
            decided = decide_approval(
                session,
                self.identity,
                self.plane.governance(),
                run_id=run_id,
                node_id=node_id,
                grant=grant,
                reason=reason,
            )
        if decided.outbox_ids:
            publish_pending(self.plane.sessions, self.plane.publisher, ids=decided.outbox_ids)
        return decided

    # -- tokens and the kill switch ----------------------------------------------------
    def issue_token(
        self,
        principal: str,
        role: Role,
        *,
        expires_in_s: int | None = None,
        environment: str | None = None,
    ) -> IssuedToken:
        """A token for a principal of this tenant; ``environment`` binds it there (never
        laxer than the issuing token's own)."""
        require_role(self.identity, ADMINS, "issue tokens")
        if environment is not None or self.identity.environment is not None:
            environment = self.scope(environment, None).environment
        with self.plane.sessions() as session:
            issued = issue_token(
                session,
                tenant_id=self.identity.tenant_id,
                principal=principal,
                role=role,
                expires_in_s=expires_in_s,
                issued_by=self.identity,
                environment=environment,
            )
            session.commit()
        return issued

    def tokens(self) -> list[dict[str, Any]]:
        require_role(self.identity, ADMINS, "list tokens")
        with self.plane.sessions() as session:
            return list_tokens(session, self.identity)

    def revoke_token(self, token_id: str) -> None:
        with self.plane.sessions() as session:
            revoke_token(session, self.identity, token_id)
            session.commit()

    def freeze(self, *, everything: bool = False, reason: str) -> None:
        """Deny every new dispatch of this tenant (or, for an operator, of all) at once."""
        with self.plane.sessions() as session:
            freeze(session, self.identity, everything=everything, reason=reason)
            session.commit()

    def unfreeze(self, *, everything: bool = False, reason: str) -> None:
        with self.plane.sessions() as session:
            unfreeze(session, self.identity, everything=everything, reason=reason)
            session.commit()

    def freezes(self) -> list[dict[str, Any]]:
        with self.plane.sessions() as session:
            return [
                {
                    "scope": "all" if f.scope == "*" else "tenant",
                    "by": f.frozen_by
                    if f.scope != "*" or self.identity.operator
                    else "an operator",
                    "reason": f.reason,
                    "frozen_at": f.frozen_at.isoformat(),
                }
                for f in list_freezes(session, self.identity)
            ]

    def wait_all(
        self, run_ids: list[str], *, timeout: float = 120.0, poll_s: float = 0.02
    ) -> dict[str, str]:
        """Wait until every run has ended; returns run id -> status (one query per poll)."""
        deadline = time.monotonic() + timeout
        pending = set(run_ids)
        done: dict[str, str] = {}
        while pending:
            with self.plane.sessions() as session:
                rows = session.execute(
                    select(Run.id, Run.status).where(
                        Run.tenant_id == self.identity.tenant_id, Run.id.in_(list(pending))
                    )
                ).all()
            for run_id, status in rows:
                if status in TERMINAL_RUN:
                    done[run_id] = status
                    pending.discard(run_id)
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise WaitTimeout(sorted(pending)[0], timeout)
            time.sleep(poll_s)
        return done

    def verify_ledger(self, *, run_id: str | None = None) -> VerifyReport:
        """Verify this tenant's evidence chain (optionally naming only one run's events)."""
        identity = self.identity
        if run_id is not None:
            self.run(run_id)  # not found unless it is this tenant's
        chain_id = chain_for(identity.tenant_id)
        witnesses = self.plane.witnesses
        checkpoints, problems = trusted_checkpoints(
            self.plane.checkpoints,
            [chain_id],
            self.plane.checkpoint_verifiers(),
            witnesses.keys if witnesses is not None else (),
        )
        with self.plane.sessions() as session:
            report = verify_ledger(
                session,
                self.plane.keyring(refresh=True),
                tenant_id=identity.tenant_id,
                run_id=run_id,
                checkpoints=checkpoints,
                artifacts=self.plane.artifacts.store,
            )
        report.broken.extend(Broken(None, chain_id, None, None, p) for p in problems)
        return report
