"""The Python client: an HTTP client of the control's API (httpx), nothing more.

It holds the API's URL and a token (and, for TLS, a CA bundle and an optional client
certificate): no database, broker or key. Every rule is enforced by the server.

    from control.client import Client

    with Client.from_env() as client:          # TOOLPLANE_URL, TOOLPLANE_TOKEN
        run = client.call("read_repo_file", {"path": "README.md"}, wait=True)
        print(run.status, run.nodes[0].result_sha256)
        run = client.run_workflow("repo-review", {"query": "ledger", "path": "src/app.py"},
                                  wait=True)

``AsyncClient`` has the same methods as coroutines.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from control.api.models import (
    DecidedOut,
    EvidenceOut,
    FreezeOut,
    IssuedTokenOut,
    RunOut,
    StatusOut,
    TokenOut,
    ToolOut,
    VerifyOut,
    WorkflowOut,
)
from control.errors import ControlError
from control.wire import ApiRequest, Requests, parsed, path_segment, raise_for_problem, unreachable

__all__ = ["AsyncClient", "Client", "ClientSettings", "WaitTimeout"]

TERMINAL = frozenset({"completed", "failed", "denied", "cancelled"})
DEFAULT_URL = "http://127.0.0.1:8765"


class WaitTimeout(ControlError):
    def __init__(self, run_id: str, timeout: float) -> None:
        super().__init__(f"run {run_id!r} did not finish within {timeout:g}s")
        self.run_id = run_id


class ClientSettings(BaseSettings):
    """What a caller holds: the API's URL, a token, and TLS material."""

    model_config = SettingsConfigDict(env_prefix="TOOLPLANE_", extra="ignore", frozen=True)

    url: str = Field(default=DEFAULT_URL, description="the control's API")
    token: SecretStr | None = Field(default=None, description="an API token")
    ca_bundle: Path | None = Field(default=None, description="CA bundle to verify the API")
    client_cert: Path | None = Field(default=None, description="client certificate (PEM)")
    client_key: Path | None = Field(default=None, description="its private key (PEM)")

    def httpx_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"base_url": self.url.rstrip("/")}
        if self.ca_bundle is not None or self.client_cert is not None:
            context = ssl.create_default_context(
                cafile=str(self.ca_bundle) if self.ca_bundle is not None else None
            )
            if self.client_cert is not None:
                context.load_cert_chain(
                    str(self.client_cert), str(self.client_key) if self.client_key else None
                )
            options["verify"] = context
        if self.token is not None:
            options["headers"] = {"Authorization": f"Bearer {self.token.get_secret_value()}"}
        return options


def waiting_from(run: RunOut) -> list[dict[str, Any]]:
    """For whom a run waits: each node's pending approval."""
    return [
        {
            "approval_id": n.approval["approval_id"],
            "node_id": n.node_id,
            "submitter": n.approval["requested_by"],
            "policies": n.approval["policies"],
            "expires_at": n.approval["expires_at"],
            "who": "a principal with the approver role other than "
            + str(n.approval["requested_by"]),
        }
        for n in run.nodes
        if n.status == "awaiting_approval" and n.approval and n.approval["status"] == "pending"
    ]


class Client(Requests):
    """A synchronous client of the API; a context manager (``close()`` ends it)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        settings: ClientSettings | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        settings = settings or ClientSettings(url=url, token=token)
        self.settings = settings
        self._http = httpx.Client(timeout=timeout, transport=transport, **settings.httpx_options())

    @classmethod
    def from_env(cls, **options: Any) -> Client:
        """From TOOLPLANE_URL, TOOLPLANE_TOKEN, TOOLPLANE_CA_BUNDLE, TOOLPLANE_CLIENT_CERT/_KEY."""
        return cls(settings=ClientSettings(), **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: ApiRequest) -> Any:
        try:
            response = self._http.request(
                request.method,
                request.path,
                json=request.body,
                params=request.params,
                headers=request.headers,
            )
        except httpx.TransportError as e:
            raise unreachable(self.settings.url, e) from e
        raise_for_problem(response)
        return parsed(request, response)

    # -- runs --------------------------------------------------------------------------
    def submit(self, tool: str, args: dict[str, Any], **options: Any) -> str:
        """Submit one tool call; returns its run id (decided, and published if allowed)."""
        run: RunOut = self._send(self.r_call(tool, args, **options))
        return run.run_id

    def call(
        self,
        tool: str,
        args: dict[str, Any],
        *,
        wait: bool = False,
        timeout: float = 60.0,
        on_waiting: Callable[[list[dict[str, Any]]], None] | None = None,
        **options: Any,
    ) -> RunOut:
        """Submit one call; with ``wait``, return once the run has ended (or, waiting for
        an approval at the timeout, as it is)."""
        run: RunOut = self._send(self.r_call(tool, args, **options))
        if not wait or run.status in TERMINAL:  # a denied call is final as submitted
            return run
        return self.wait(run.run_id, timeout=timeout, on_waiting=on_waiting)

    def call_many(self, calls: list[dict[str, Any]]) -> list[RunOut]:
        """Submit up to 100 calls in one request, each decided on its own."""
        return list(self._send(self.r_batch(calls)))

    def submit_workflow(
        self, workflow: str, inputs: dict[str, Any] | None = None, **options: Any
    ) -> str:
        run: RunOut = self._send(self.r_workflow(workflow, inputs, **options))
        return run.run_id

    def run_workflow(
        self,
        workflow: str,
        inputs: dict[str, Any] | None = None,
        *,
        wait: bool = False,
        timeout: float = 120.0,
        on_progress: Callable[[str, str, int], None] | None = None,
        on_waiting: Callable[[list[dict[str, Any]]], None] | None = None,
        **options: Any,
    ) -> RunOut:
        run: RunOut = self._send(self.r_workflow(workflow, inputs, **options))
        if not wait:
            return run
        return self.wait(
            run.run_id, timeout=timeout, on_progress=on_progress, on_waiting=on_waiting
        )

    def run(self, run_id: str) -> RunOut:
        return self._send(self.r_run(run_id))  # type: ignore[no-any-return]

    def runs(self, **filters: Any) -> list[RunOut]:
        """Your tenant's runs, newest first (``limit``, ``status``, ``awaiting_approval``,
        ``cursor``, ``ids``); :meth:`runs_page` gives the next cursor too."""
        return list(self.runs_page(**filters).runs)

    def runs_page(self, **filters: Any) -> Any:
        return self._send(self.r_runs(**filters))

    def cancel(self, run_id: str, *, reason: str | None = None) -> RunOut:
        return self._send(self.r_cancel(run_id, reason))  # type: ignore[no-any-return]

    def approve(self, run_id: str, node_id: str, *, reason: str | None = None) -> DecidedOut:
        return self._send(self.r_decide(run_id, node_id, "approve", reason))  # type: ignore[no-any-return]

    def reject(self, run_id: str, node_id: str, *, reason: str) -> DecidedOut:
        return self._send(self.r_decide(run_id, node_id, "reject", reason))  # type: ignore[no-any-return]

    def evidence(self, run_id: str) -> list[EvidenceOut]:
        return list(self._send(self.r_evidence(run_id)))

    def wait(
        self,
        run_id: str,
        *,
        timeout: float = 60.0,
        on_progress: Callable[[str, str, int], None] | None = None,
        on_waiting: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> RunOut:
        """Follow the run's event stream (pushed by the server) until the run ends.

        ``on_progress(node_id, status, attempt)`` hears every node's change in order;
        ``on_waiting`` hears once for whom a run waits that needs an approval. A run still
        waiting for an approval at the timeout is returned as it is.
        """
        self._follow(run_id, timeout=timeout, on_progress=on_progress, on_waiting=on_waiting)
        return self.run(run_id)

    def _follow(
        self,
        run_id: str,
        *,
        timeout: float,
        on_progress: Callable[[str, str, int], None] | None = None,
        on_waiting: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> str:
        """Follow the run's event stream until it ends; its last status (terminal, or
        ``awaiting_approval`` at the timeout)."""
        deadline = time.monotonic() + timeout
        last_id: str | None = None
        told = False
        status = "running"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if status == "awaiting_approval":
                    return status
                raise WaitTimeout(run_id, timeout)
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(
                    self._http,
                    "GET",
                    f"/v1/runs/{path_segment(run_id, 'run')}/events",
                    headers=headers,
                    timeout=httpx.Timeout(min(remaining, 30.0), read=min(remaining, 30.0)),
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                    raise_for_problem(source.response)
                    for event in source.iter_sse():
                        if event.event == "end":
                            return str(event.json()["status"])
                        if event.event not in ("node", "run") or not event.id or not event.data:
                            continue  # a keep-alive: the decoder repeats the last id on it
                        last_id = event.id
                        data = event.json()
                        if event.event == "node" and on_progress is not None:
                            on_progress(data["node_id"], data["status"], data["attempt"])
                        elif event.event == "run":
                            status = data["status"]
                            if status == "awaiting_approval" and not told:
                                told = True
                                if on_waiting is not None:
                                    on_waiting(waiting_from(self.run(run_id)))
            except httpx.TimeoutException:
                continue  # the deadline decides
            except httpx.TransportError as e:
                if time.monotonic() >= deadline:
                    raise unreachable(self.settings.url, e) from e
                time.sleep(0.2)  # reconnect with Last-Event-ID: nothing is missed

    def wait_all(self, run_ids: list[str], *, timeout: float = 120.0) -> dict[str, str]:
        """Wait until every run has ended; returns run id -> status. Reads them in bulk,
        and follows the event stream of one that has not ended before reading again."""
        deadline = time.monotonic() + timeout
        done: dict[str, str] = {}
        pending = list(dict.fromkeys(run_ids))
        while pending:
            for start in range(0, len(pending), 1000):  # one request per 1000 runs
                chunk = pending[start : start + 1000]
                for run in self.runs(ids=chunk, limit=len(chunk)):
                    if run.status in TERMINAL:
                        done[run.run_id] = run.status
            unknown = [r for r in pending if r not in done]
            if not unknown:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(unknown[0], timeout)
            # follow one that has not ended (its stream's end names its status); the others
            # are read again in bulk after it
            status = self._follow(unknown[0], timeout=remaining)
            if status not in TERMINAL:
                raise WaitTimeout(unknown[0], timeout)
            done[unknown[0]] = status
            pending = unknown[1:]
        return {run_id: done[run_id] for run_id in dict.fromkeys(run_ids)}

    # -- governance ----------------------------------------------------------------------
    def issue_token(
        self,
        principal: str,
        role: str,
        *,
        expires_in_s: int | None = None,
        environment: str | None = None,
    ) -> IssuedTokenOut:
        return self._send(self.r_issue(principal, str(role), expires_in_s, environment))  # type: ignore[no-any-return]

    def tokens(self) -> list[TokenOut]:
        return list(self._send(self.r_tokens()))

    def revoke_token(self, token_id: str) -> None:
        self._send(self.r_revoke(token_id))

    def freeze(self, *, everything: bool = False, reason: str) -> list[FreezeOut]:
        return list(self._send(self.r_freeze("freeze", everything, reason)))

    def unfreeze(self, *, everything: bool = False, reason: str) -> list[FreezeOut]:
        return list(self._send(self.r_freeze("unfreeze", everything, reason)))

    def freezes(self) -> list[FreezeOut]:
        return list(self._send(self.r_freezes()))

    def policy(self) -> StatusOut:
        return self._send(self.r_policy())  # type: ignore[no-any-return]

    def explain(self, tool: str, args: dict[str, Any] | None = None, **options: Any) -> Any:
        return self._send(self.r_explain(tool, args, **options))

    def tools(self) -> list[ToolOut]:
        return list(self._send(self.r_tools()))

    def workflows(self) -> list[WorkflowOut]:
        return list(self._send(self.r_workflows()))

    def verify_ledger(self, *, run_id: str | None = None) -> VerifyOut:
        return self._send(self.r_verify(run_id))  # type: ignore[no-any-return]

    def export_bundle(self, run_id: str) -> bytes:
        """The run's offline evidence bundle (ledger/bundle_check.py checks it)."""
        return self._send(self.r_bundle(run_id))  # type: ignore[no-any-return]


class AsyncClient(Requests):
    """The same API as :class:`Client`, as coroutines (``async with AsyncClient(...)``)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        settings: ClientSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = settings or ClientSettings(url=url, token=token)
        self.settings = settings
        self._http = httpx.AsyncClient(
            timeout=timeout, transport=transport, **settings.httpx_options()
        )

    @classmethod
    def from_env(cls, **options: Any) -> AsyncClient:
        return cls(settings=ClientSettings(), **options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: ApiRequest) -> Any:
        try:
            response = await self._http.request(
                request.method,
                request.path,
                json=request.body,
                params=request.params,
                headers=request.headers,
            )
        except httpx.TransportError as e:
            raise unreachable(self.settings.url, e) from e
        raise_for_problem(response)
        return parsed(request, response)

    async def submit(self, tool: str, args: dict[str, Any], **options: Any) -> str:
        run: RunOut = await self._send(self.r_call(tool, args, **options))
        return run.run_id

    async def call(
        self,
        tool: str,
        args: dict[str, Any],
        *,
        wait: bool = False,
        timeout: float = 60.0,
        **options: Any,
    ) -> RunOut:
        run: RunOut = await self._send(self.r_call(tool, args, **options))
        return await self.wait(run.run_id, timeout=timeout) if wait else run

    async def call_many(self, calls: list[dict[str, Any]]) -> list[RunOut]:
        return list(await self._send(self.r_batch(calls)))

    async def run_workflow(
        self,
        workflow: str,
        inputs: dict[str, Any] | None = None,
        *,
        wait: bool = False,
        timeout: float = 120.0,
        **options: Any,
    ) -> RunOut:
        run: RunOut = await self._send(self.r_workflow(workflow, inputs, **options))
        return await self.wait(run.run_id, timeout=timeout) if wait else run

    async def run(self, run_id: str) -> RunOut:
        return await self._send(self.r_run(run_id))  # type: ignore[no-any-return]

    async def runs(self, **filters: Any) -> list[RunOut]:
        return list((await self._send(self.r_runs(**filters))).runs)

    async def cancel(self, run_id: str, *, reason: str | None = None) -> RunOut:
        return await self._send(self.r_cancel(run_id, reason))  # type: ignore[no-any-return]

    async def approve(self, run_id: str, node_id: str, *, reason: str | None = None) -> DecidedOut:
        return await self._send(self.r_decide(run_id, node_id, "approve", reason))  # type: ignore[no-any-return]

    async def reject(self, run_id: str, node_id: str, *, reason: str) -> DecidedOut:
        return await self._send(self.r_decide(run_id, node_id, "reject", reason))  # type: ignore[no-any-return]

    async def verify_ledger(self, *, run_id: str | None = None) -> VerifyOut:
        return await self._send(self.r_verify(run_id))  # type: ignore[no-any-return]

    async def export_bundle(self, run_id: str) -> bytes:
        return await self._send(self.r_bundle(run_id))  # type: ignore[no-any-return]

    async def wait(self, run_id: str, *, timeout: float = 60.0) -> RunOut:
        """Follow the run's event stream until it ends (an approval still pending at the
        timeout: the run as it is)."""
        deadline = time.monotonic() + timeout
        last_id: str | None = None
        status = "running"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if status == "awaiting_approval":
                    return await self.run(run_id)
                raise WaitTimeout(run_id, timeout)
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with aconnect_sse(
                    self._http,
                    "GET",
                    f"/v1/runs/{path_segment(run_id, 'run')}/events",
                    headers=headers,
                    timeout=httpx.Timeout(min(remaining, 30.0)),
                ) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                    raise_for_problem(source.response)
                    async for event in source.aiter_sse():
                        if event.event == "end":
                            return await self.run(run_id)
                        if event.event in ("node", "run") and event.id and event.data:
                            last_id = event.id
                            if event.event == "run":
                                status = event.json()["status"]
            except httpx.TimeoutException:
                continue
            except httpx.TransportError as e:
                if time.monotonic() >= deadline:
                    raise unreachable(self.settings.url, e) from e
                await asyncio.sleep(0.2)
