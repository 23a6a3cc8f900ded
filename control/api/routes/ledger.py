"""The ledger's transparency: signed checkpoints of your tenant's chain, and a run's
offline evidence bundle (the formats: docs/ledger.md)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict

from control.api.deps import Caller
from control.errors import NotFound, ServiceUnavailable
from control.governance.auth import ADMINS, require_role
from control.orchestration.bundles import export_bundle
from ledger.chain import chain_for
from ledger.checkpoints import newest_checkpoint

router = APIRouter(prefix="/v1", tags=["ledger"])

__all__ = ["router"]


class CheckpointOut(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    chain_id: str
    origin: str
    size: int
    new: bool
    note: str


@router.post("/ledger/checkpoint", response_model=CheckpointOut)
def checkpoint(ops: Caller) -> CheckpointOut:
    """Integrate your tenant's chain into its Merkle tree and sign a checkpoint now (admin;
    the control also does so at its interval). 503 if the chain is not consistent with
    its newest checkpoint: nothing is signed then."""
    require_role(ops.identity, ADMINS, "sign checkpoints")
    signed, refused = ops.plane.checkpoint([chain_for(ops.identity.tenant_id)])
    if refused:
        raise ServiceUnavailable("ledger", f"checkpoint refused: {refused[0].problem}")
    s = signed[0]
    return CheckpointOut(
        chain_id=s.chain_id,
        origin=s.checkpoint.origin,
        size=s.checkpoint.size,
        new=s.written,
        note=s.note.decode("utf-8"),
    )


@router.get(
    "/ledger/checkpoint",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def latest_checkpoint(ops: Caller) -> Response:
    """The newest signed checkpoint of your tenant's chain: a C2SP signed note."""
    chain_id = chain_for(ops.identity.tenant_id)
    newest = newest_checkpoint(ops.plane.checkpoints, chain_id, ops.plane.checkpoint_verifiers())
    if newest is None:
        raise NotFound("checkpoint", chain_id)
    return Response(newest[1], media_type="text/plain; charset=utf-8")


@router.get(
    "/runs/{run_id}/bundle",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}},
)
def bundle(run_id: str, ops: Caller) -> Response:
    """The run's evidence bundle: its events (leaf bytes) with inclusion proofs against a
    signed checkpoint, and the keys that signed its envelopes and receipts. Check it
    offline with `toolplane ledger verify-bundle`."""
    ops.run(run_id)  # not found unless it is your tenant's
    data = export_bundle(ops.plane, tenant_id=ops.identity.tenant_id, run_id=run_id)
    return Response(data, media_type="application/json")
