"""What crosses the API, both ways: request bodies and responses (pydantic v2).

Requests are strict (``extra="forbid"``); responses are what the clients parse
back, so the Python client imports this module and nothing of the server.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchIn",
    "BatchOut",
    "CallIn",
    "CancelIn",
    "DecidedOut",
    "DecisionIn",
    "EvidenceOut",
    "ExplainIn",
    "FreezeIn",
    "FreezeOut",
    "HeldManifestOut",
    "IssuedTokenOut",
    "NodeOut",
    "Problem",
    "RejectIn",
    "RunEventOut",
    "RunOut",
    "RunPage",
    "StatusOut",
    "TokenIn",
    "TokenOut",
    "ToolApproveIn",
    "ToolApprovedOut",
    "ToolOut",
    "VerifyOut",
    "WorkflowIn",
    "WorkflowOut",
]

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
TOOL = r"^[a-z][a-z0-9_]{0,62}$"
LABEL = Field(default=None, max_length=200, description="A label: letters, digits, - and _")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # a newer server may add fields

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- requests ------------------------------------------------------------------------


class CallIn(_In):
    """One tool call: a run of one node. Environment and classification may only be
    stricter than what the server decides for the caller."""

    tool: str = Field(min_length=1, max_length=63, pattern=TOOL)
    args: dict[str, Any] = Field(default_factory=dict)
    environment: str | None = LABEL
    classification: str | None = LABEL
    on_behalf_of: str | None = Field(default=None, min_length=1, max_length=200)
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="In a batch: this call's key (the Idempotency-Key header is the "
        "request's key for a single call)",
    )


class BatchIn(_In):
    calls: list[CallIn] = Field(min_length=1, max_length=100)


class WorkflowIn(_In):
    workflow: str = Field(min_length=1, max_length=100, pattern=NAME)
    inputs: dict[str, Any] = Field(default_factory=dict)
    environment: str | None = LABEL
    classification: str | None = LABEL
    on_behalf_of: str | None = Field(default=None, min_length=1, max_length=200)


class CancelIn(_In):
    reason: str | None = Field(default=None, min_length=1, max_length=1000)


class DecisionIn(_In):
    reason: str | None = Field(default=None, min_length=1, max_length=1000)


class RejectIn(_In):
    reason: str = Field(min_length=1, max_length=1000)


class TokenIn(_In):
    principal: str = Field(min_length=1, max_length=200)
    role: Literal["submitter", "approver", "auditor", "admin"]
    expires_in_s: int | None = Field(default=None, description="Seconds; at most 3650 days")
    environment: str | None = LABEL


class FreezeIn(_In):
    reason: str = Field(min_length=1, max_length=1000)
    all: bool = Field(default=False, description="Every tenant (an operator tenant's admin)")


class ToolApproveIn(_In):
    """Approve the manifest a worker announced for a tool at ``version``, of exactly this
    digest (from `GET /v1/tools`)."""

    version: str = Field(min_length=1, max_length=40)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The manifest's SHA-256")


class ExplainIn(_In):
    tool: str = Field(min_length=1, max_length=63, pattern=TOOL)
    args: dict[str, Any] = Field(default_factory=dict)
    environment: str | None = LABEL
    classification: str | None = LABEL
    on_behalf_of: str | None = Field(default=None, min_length=1, max_length=200)


# -- responses -----------------------------------------------------------------------


class NodeOut(_Out):
    node_id: str
    tool: str
    status: str
    needs: list[str]
    attempt: int
    args: dict[str, Any] | None
    result: dict[str, Any] | None
    result_sha256: str | None
    artifact: dict[str, Any] | None = Field(
        default=None,
        description="a result kept in the artifact store: sha256, size, media_type, tool, "
        "run_id, node_id (its bytes were checked against sha256 before they were returned)",
    )
    receipt: dict[str, Any] | None
    error: dict[str, Any] | None
    approval: dict[str, Any] | None = Field(
        description="The approval this node waits for or used: approval_id, status, "
        "requested_by, expires_at, policies, policy_version, args_sha256, decided_by, reason"
    )


class RunOut(_Out):
    run_id: str
    tenant: str
    workflow: str
    status: str
    inputs: dict[str, Any] | None
    idempotency_key: str | None
    environment: str
    classification: str
    submitter: str
    on_behalf_of: str | None
    created_at: str
    nodes: list[NodeOut]


class RunPage(_Out):
    runs: list[RunOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class BatchOut(_Out):
    runs: list[RunOut]


class RunEventOut(_Out):
    """One event of a run's stream (the SSE `data`); its id is the SSE `id`."""

    id: int
    run_id: str
    node_id: str | None
    status: str
    attempt: int
    at: str


class DecidedOut(_Out):
    run_id: str
    node_id: str
    approval_id: str
    status: str
    message: str
    run: RunOut


class TokenOut(_Out):
    token_id: str
    principal: str
    role: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    environment: str | None
    state: str


class IssuedTokenOut(_Out):
    tenant: str
    token_id: str
    token: str = Field(description="Shown once; only its SHA-256 is kept")
    principal: str
    role: str
    expires_at: str | None
    environment: str | None


class FreezeOut(_Out):
    scope: str
    by: str
    reason: str
    frozen_at: str


class StatusOut(_Out):
    """Who you are, the policy bundle in force, your plan, and the freezes on you."""

    tenant: str
    principal: str
    role: str
    version: str
    policies: dict[str, str]
    plan: dict[str, Any] | None
    freezes: list[FreezeOut]
    environment: str
    classification: str


class HeldManifestOut(_Out):
    """A manifest a worker announced that is not the approved one: it changes nothing."""

    version: str
    manifest_sha256: str
    key_id: str
    announced_at: str
    problem: str | None = None  # why it cannot be approved, if it cannot


class ToolOut(_Out):
    """A tool: the approved manifest in force (``version`` to ``registered_at``; none while
    the approved one was not announced), the operator's approval, and what is held.
    ``status``: ``approved``, ``awaiting_announcement`` or ``held`` (nothing approved)."""

    tool: str
    status: str = "approved"
    version: str | None = None
    manifest: dict[str, Any] | None = None
    manifest_sha256: str | None = None
    key_id: str | None = None
    registered_at: str | None = None
    approved_version: str | None = None
    approved_sha256: str | None = None
    approved_by: str | None = None
    approved_at: str | None = None
    held: list[HeldManifestOut] = Field(default_factory=list)


class ToolApprovedOut(_Out):
    tool: str
    version: str
    manifest_sha256: str
    by: str


class WorkflowOut(_Out):
    name: str
    ok: bool
    description: str | None = None
    inputs: dict[str, str] | None = None
    nodes: list[dict[str, Any]] | None = None
    problem: str | None = None


class VerifyOut(_Out):
    ok: bool
    events: int
    chains: int
    receipts_verified: int
    broken: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]] = Field(
        default_factory=list,
        description="the signed checkpoint each chain was checked against: chain_id, size",
    )


class EvidenceOut(_Out):
    id: int
    chain_id: str
    seq: int
    kind: str
    run_id: str | None
    payload: dict[str, Any]
    created_at: str
    prev_hash: str
    hash: str


class Problem(_Out):
    """RFC 9457 problem details; ``code`` is stable, ``field`` names the input at fault."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None = None
