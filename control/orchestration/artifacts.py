"""Large results go to the artifact store (ledger/artifacts.py); reads check their hash.

Ingest calls :func:`externalize_result` once a verified result is bound to its
attempt: a result whose canonical JSON is longer than the threshold is written to the
store under its SHA-256, which is the ``result_sha256`` that the tool's receipt signs,
and the ledger keeps only its metadata: the node's ``artifact`` column and the
``artifact`` of its evidence event, whose ``message`` then leaves out
``result.result`` (the verifier puts the checked bytes back before it checks the
receipt). Only the control writes the store; workers never see it.

A store write that precedes a rolled-back transaction leaves an unreferenced
artifact behind: harmless (it is content-addressed, and a redelivery writes the
same bytes under the same name).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from control.errors import ArtifactInvalid
from ledger.artifacts import (
    MEDIA_TYPE,
    ArtifactProblem,
    ArtifactRef,
    ArtifactStore,
    load_result,
)
from ledger.models import Node
from toolplane.canonical import canonical_json

__all__ = ["Artifacts", "externalize_result", "needed_results", "node_result"]


@dataclass(frozen=True)
class Artifacts:
    """The control's artifact store and the size above which a result goes there."""

    store: ArtifactStore
    threshold: int


def externalize_result(
    artifacts: Artifacts | None, body: dict[str, Any], node: Node
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``body`` (a verified result message, as JSON) as the ledger keeps it, and the
    metadata of its artifact (None when the result stays inline)."""
    result = body.get("result")
    value = result.get("result") if isinstance(result, dict) else None
    if artifacts is None or not isinstance(value, dict) or not isinstance(result, dict):
        return body, None
    data = canonical_json(value)
    if len(data) <= artifacts.threshold:
        return body, None
    if hashlib.sha256(data).hexdigest() != result.get("result_sha256"):
        return body, None  # not the bytes the receipt binds (ingest verified it): keep inline
    sha256 = artifacts.store.put(data)
    ref = ArtifactRef(
        sha256, len(data), MEDIA_TYPE, str(result.get("tool")), node.run_id, node.node_id
    )
    kept = {**body, "result": {k: v for k, v in result.items() if k != "result"}}
    return kept, ref.as_dict()


def node_result(artifacts: Artifacts | None, node: Node) -> dict[str, Any] | None:
    """A node's result: inline, or read from the store and checked against its hash."""
    if node.artifact is None:
        return node.result
    try:
        ref = ArtifactRef.of(node.artifact)
        if ref.sha256 != node.result_sha256:  # another artifact than the one its receipt signs
            raise ArtifactProblem(
                ref.sha256,
                f"is not the result its receipt signs ({node.result_sha256})",
                where=ref.where,
            )
        return load_result(artifacts.store if artifacts is not None else None, ref)
    except ArtifactProblem as e:
        raise ArtifactInvalid(str(e), sha256=e.sha256) from None


def needed_results(
    artifacts: Artifacts | None, nodes: dict[str, Node], needs: list[str] | None
) -> dict[str, dict[str, Any] | None]:
    """The results of the nodes a node needs (each artifact checked against its hash)."""
    return {need: node_result(artifacts, nodes[need]) for need in needs or () if need in nodes}
