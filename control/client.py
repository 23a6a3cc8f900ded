"""The Python client: the same governed path as the CLI, for applications.

from control.client import Client

client = Client.from_env()                      # TOOLPLANE_* settings, TOOLPLANE_TOKEN
run = client.call("read_repo_file", {"path": "README.md"}, wait=True)
print(run.status, run.nodes[0].result["sha256"])
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from control.auth import SUBMITTERS, Identity, authenticate, require_role
from control.dispatch import publish_pending
from control.errors import ControlError
from control.intake import CallRequest, submit_call
from control.runs import RunView, get_run, list_runs
from control.runtime import ControlPlane
from control.states import TERMINAL_RUN
from ledger.models import Run
from ledger.verify import VerifyReport, verify_ledger
from toolplane.settings import Settings

__all__ = ["Client", "WaitTimeout"]


class WaitTimeout(ControlError):
    def __init__(self, run_id: str, timeout: float) -> None:
        super().__init__(f"run {run_id!r} did not finish within {timeout:g}s")
        self.run_id = run_id


class Client:
    def __init__(self, plane: ControlPlane, *, token: str | None) -> None:
        self.plane = plane
        self._token = token
        self._identity: Identity | None = None

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Client:
        settings = settings or Settings()
        token = settings.token.get_secret_value() if settings.token else None
        return cls(ControlPlane.from_settings(settings), token=token)

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            with self.plane.sessions() as session:
                self._identity = authenticate(session, self._token)
        return self._identity

    def submit(
        self,
        tool: str,
        args: dict[str, Any],
        *,
        environment: str | None = None,
        classification: str = "internal",
        idempotency_key: str | None = None,
    ) -> str:
        """Submit one tool call and return its run id (decided and, if allowed, published)."""
        require_role(self.identity, SUBMITTERS, "submit calls")  # an auditor changes nothing
        request = CallRequest(
            tool=tool,
            args=args,
            environment=environment or self.plane.settings.environment,
            classification=classification,
            idempotency_key=idempotency_key,
        )
        with self.plane.sessions() as session:
            submitted = submit_call(
                session,
                identity=self.identity,
                request=request,
                engine=self.plane.policy,
                signer=self.plane.signer,
                visibility_timeout=self.plane.settings.visibility_timeout,
                manifests=self.plane.manifest,
            )
        if submitted.outbox_ids:
            publish_pending(self.plane.sessions, self.plane.publisher, ids=submitted.outbox_ids)
        return submitted.run_id

    def call(
        self,
        tool: str,
        args: dict[str, Any],
        *,
        environment: str | None = None,
        classification: str = "internal",
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 60.0,
    ) -> RunView:
        """Submit one tool call; with ``wait``, return once the run has ended."""
        run_id = self.submit(
            tool,
            args,
            environment=environment,
            classification=classification,
            idempotency_key=idempotency_key,
        )
        if wait:
            return self.wait(run_id, timeout=timeout)
        return self.run(run_id)

    def run(self, run_id: str) -> RunView:
        with self.plane.sessions() as session:
            return get_run(session, self.identity, run_id)

    def runs(self, *, limit: int = 50) -> list[RunView]:
        with self.plane.sessions() as session:
            return list_runs(session, self.identity, limit=limit)

    def wait(self, run_id: str, *, timeout: float = 60.0, poll_s: float = 0.002) -> RunView:
        """Poll the run's status (cheaply) until it ends; then read it whole."""
        deadline = time.monotonic() + timeout
        delay = poll_s
        identity = self.identity
        while True:
            with self.plane.sessions() as session:
                status = session.scalar(
                    select(Run.status).where(Run.id == run_id, Run.tenant_id == identity.tenant_id)
                )
            if status is None or status in TERMINAL_RUN:
                return self.run(run_id)  # raises NotFound for another tenant's run
            if time.monotonic() >= deadline:
                raise WaitTimeout(run_id, timeout)
            time.sleep(delay)
            delay = min(delay * 1.2, 0.05)

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
        with self.plane.sessions() as session:
            return verify_ledger(
                session,
                self.plane.keyring(refresh=True),
                tenant_id=identity.tenant_id,
                run_id=run_id,
            )
