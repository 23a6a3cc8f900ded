"""Building and signing what a worker reports (results, refusals, manifests)."""

from __future__ import annotations

from typing import Any

from toolplane.canonical import digest
from toolplane.messages import (
    Receipt,
    ResultMessage,
    SignedManifest,
    ToolError,
    ToolResult,
    now_ms,
    signed_bytes,
)
from toolplane.signing import Signer

__all__ = ["sign_manifest", "sign_result", "build_result"]


def build_result(
    *,
    kind: str,
    tool: str,
    worker: str,
    started_at: int,
    envelope: Any | None,
    envelope_sha256: str | None,
    result: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
    containment: str,
    fetches: list[dict[str, Any]] | None = None,
    traceparent: str | None = None,
) -> ToolResult:
    finished = now_ms()
    return ToolResult(
        kind=kind,  # type: ignore[arg-type]
        ok=error is None,
        tool=tool,
        worker=worker,
        job_id=getattr(envelope, "job_id", None),
        run_id=getattr(envelope, "run_id", None),
        node_id=getattr(envelope, "node_id", None),
        attempt=getattr(envelope, "attempt", None),
        envelope_sha256=envelope_sha256,
        started_at=started_at,
        finished_at=finished,
        duration_ms=max(finished - started_at, 0),
        result=result if error is None else None,
        result_sha256=digest(result) if error is None and result is not None else None,
        error=None if error is None else ToolError(code=error[0], message=error[1][:4000]),
        containment=containment,
        fetches=fetches or [],
        traceparent=traceparent,
    )


def sign_result(result: ToolResult, signer: Signer) -> ResultMessage:
    receipt = Receipt(
        key_id=signer.key_id,
        algorithm=signer.algorithm,
        signature=signer.sign(signed_bytes(result)),
    )
    return ResultMessage(result=result, receipt=receipt)


def sign_manifest(manifest: dict[str, Any], signer: Signer) -> SignedManifest:
    issued = now_ms()
    unsigned = SignedManifest(
        manifest=manifest,
        issued_at=issued,
        receipt=Receipt(key_id=signer.key_id, algorithm=signer.algorithm, signature="-"),
    )
    return SignedManifest(
        manifest=manifest,
        issued_at=issued,
        receipt=Receipt(
            key_id=signer.key_id, algorithm=signer.algorithm, signature=signer.sign(unsigned.body())
        ),
    )
