"""A run's evidence bundle, for its tenant: checkpoint the chain, then prove each event."""

from __future__ import annotations

from control.errors import ArtifactInvalid, ServiceUnavailable
from control.ops.runtime import ControlPlane
from ledger.artifacts import ArtifactProblem
from ledger.bundle import build_bundle
from ledger.chain import chain_for
from ledger.checkpoints import newest_checkpoint

__all__ = ["export_bundle"]


def export_bundle(plane: ControlPlane, *, tenant_id: str, run_id: str) -> bytes:
    """The bundle of ``run_id`` (the caller checked that it is ``tenant_id``'s)."""
    chain_id = chain_for(tenant_id)
    _, refused = plane.checkpoint([chain_id])
    if refused:
        raise ServiceUnavailable("ledger", f"no checkpoint can be signed: {refused[0].problem}")
    newest = newest_checkpoint(plane.checkpoints, chain_id, plane.checkpoint_verifiers())
    if newest is None:
        raise ServiceUnavailable("ledger", f"{chain_id} has no checkpoint")
    with plane.sessions() as session:
        try:
            return build_bundle(
                session,
                chain_id=chain_id,
                run_id=run_id,
                checkpoint=newest[0],
                note=newest[1],
                keys=plane.keyring(refresh=True),
                artifacts=plane.artifacts.store,
            )
        except ArtifactProblem as e:
            raise ArtifactInvalid(str(e), sha256=e.sha256) from None
