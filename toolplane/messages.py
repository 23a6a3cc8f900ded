"""Messages that cross the trust boundary between the planes.

Strict, frozen pydantic models with ``extra="forbid"``. What gets signed is
always ``canonical_json(model.model_dump(mode="json"))`` of the inner model,
produced by :func:`signed_bytes`.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from toolplane.canonical import canonical_json, sha256_hex
from toolplane.tracecontext import TRACEPARENT_PATTERN, check_traceparent

__all__ = [
    "Envelope",
    "SignedEnvelope",
    "ToolError",
    "ToolResult",
    "Receipt",
    "ResultMessage",
    "SignedManifest",
    "signed_bytes",
    "now_ms",
    "ms_to_datetime",
    "new_nonce",
    "job_id_for",
]

Hex64 = Field(pattern=r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Traced(_Strict):
    """A message that may carry a W3C trace context (docs/tracing.md).

    ``traceparent`` is signed with the rest when present, and left out of the dump (so out
    of the signed bytes and the digest) when absent: a message made before the field
    existed, or without tracing, has the same bytes, signature and digest as before."""

    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)

    @field_validator("traceparent")
    @classmethod
    def _valid_traceparent(cls, value: str | None) -> str | None:
        return check_traceparent(value)

    @model_serializer(mode="wrap")
    def _without_absent_traceparent(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("traceparent") is None:
            data.pop("traceparent", None)
        return data


def signed_bytes(model: BaseModel) -> bytes:
    """The exact bytes that are signed or hashed for a boundary model.

    Built from the Python values (not ``mode="json"``, which would write NaN as
    null and so let a NaN ride on a signature made over null)."""
    return canonical_json(model.model_dump(mode="python"))


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def new_nonce() -> str:
    return secrets.token_hex(16)


def job_id_for(run_id: str, node_id: str, attempt: int) -> str:
    """One job per (run, node, attempt): the unit of claims and of acceptance."""
    return f"{run_id}/{node_id}/{attempt}"


class Envelope(_Traced):
    """A job that control has decided and signed; only this makes a worker run a tool."""

    v: Literal[1] = 1
    job_id: str = Field(min_length=1, max_length=300)
    run_id: str = Field(min_length=1, max_length=100)
    node_id: str = Field(min_length=1, max_length=100)
    attempt: int = Field(ge=1, le=1000)
    tenant: str = Field(min_length=1, max_length=100)
    principal: str = Field(min_length=1, max_length=200)
    on_behalf_of: str | None = Field(default=None, max_length=200)  # agent or end user
    tool: str = Field(min_length=1, max_length=63)
    audience: str = Field(min_length=1, max_length=80)  # the queue: tool.<name>
    args: dict[str, Any]
    args_sha256: str = Hex64
    policy_decision_id: str
    policy_version: str
    approval_id: str | None = None
    limits: dict[str, int | float] | None = None  # lowered by policy; never raised
    egress: list[str] | None = None  # hosts policy allows (None: whatever the tool declares)
    private_egress: list[str] | None = None  # hosts policy lets resolve to non-public addresses
    issued_at: int  # epoch ms
    expires_at: int  # epoch ms
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    key_id: str
    # traceparent (from _Traced): the dispatch span of this job, set only while tracing


class SignedEnvelope(_Strict):
    envelope: Envelope
    signature: str = Field(max_length=200)

    @property
    def digest(self) -> str:
        return sha256_hex(signed_bytes(self.envelope))


class ToolError(_Strict):
    code: str
    message: str = Field(max_length=4000)


class ToolResult(_Traced):
    """What a worker reports for one job: a run, a failure, or a refusal of the envelope."""

    v: Literal[1] = 1
    kind: Literal["result", "refusal"]
    ok: bool
    tool: str
    worker: str
    job_id: str | None
    run_id: str | None
    node_id: str | None
    attempt: int | None
    envelope_sha256: str | None
    started_at: int
    finished_at: int
    duration_ms: int
    result: dict[str, Any] | None = None
    result_sha256: str | None = None
    error: ToolError | None = None
    containment: str = "fork-rlimits"
    fetches: list[dict[str, Any]] = Field(default_factory=list)  # egress, covered by the receipt
    # traceparent (from _Traced): the worker's span; control never trusts it to pick a trace


class Receipt(_Strict):
    key_id: str
    algorithm: Literal["ed25519", "hmac-sha256"]
    signature: str = Field(max_length=200)


class ResultMessage(_Strict):
    """The body of ``control.ingest_result`` on the ``results`` queue."""

    result: ToolResult
    receipt: Receipt


class SignedManifest(_Strict):
    """A worker's announcement of the tool it serves, signed with the tool's key."""

    manifest: dict[str, Any]
    issued_at: int
    receipt: Receipt

    def body(self) -> bytes:
        return canonical_json({"manifest": self.manifest, "issued_at": self.issued_at})
