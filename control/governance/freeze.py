"""The kill switch: freeze one tenant, or every tenant, so that nothing new dispatches.

A freeze is a row in ``freezes`` (scope: a tenant id, or ``*`` for all) plus
its evidence. Intake and approval hold a shared advisory lock on the scopes
they dispatch under for the length of their transaction; freezing takes the
same lock exclusively, so once ``policy freeze`` returns, no dispatch that
began before it can still commit, and every later one sees the freeze.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from control.errors import Forbidden, UsageError, require_text
from control.governance.auth import ADMINS, Identity, require_role
from ledger.chain import NewEvent
from ledger.db import pipelined
from ledger.models import Freeze
from ledger.store import append_events

ALL = "*"

__all__ = ["ALL", "active_freeze", "freeze", "list_freezes", "unfreeze"]


def _lock(session: Session, scope: str, *, shared: bool) -> None:
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    session.execute(
        text(f"SELECT {function}(hashtext(:key))"), {"key": f"toolplane.freeze.{scope}"}
    )


# Every dispatch runs these two: the locks first, then the read, in its own statement so
# that its snapshot follows the locks (one statement would read from a snapshot taken
# before it waited for a freeze to commit). Both go in one pipeline: one round trip.
_SHARED_LOCKS = (
    "SELECT pg_advisory_xact_lock_shared(hashtext(%(every)s)) AS every_lock,"
    " pg_advisory_xact_lock_shared(hashtext(%(tenant)s)) AS tenant_lock"
)
_ACTIVE = (
    "SELECT scope, frozen_by, reason, frozen_at FROM freezes"
    " WHERE scope = %(every_scope)s OR scope = %(tenant_scope)s ORDER BY scope LIMIT 1"
)


_HELD = "toolplane.freeze_held"
"""``session.info`` key: (transaction, tenant id, freeze) read under the locks that
transaction holds (no freeze of those scopes can be added or lifted until it ends)."""


def active_freeze(
    session: Session, tenant_id: str, *, before: Sequence[tuple[str, dict[str, Any]]] = ()
) -> Any:
    """The freeze that stops this tenant's dispatches, if any (takes the shared locks): a
    row with the columns of ``freezes`` (scope, frozen_by, reason, frozen_at), or None.

    Read once per transaction: the locks are held until it ends, and a freeze or an
    unfreeze of these scopes needs them exclusively, so the answer cannot change before.
    ``before``: statements (without rows) to send first, in the same round trip."""
    transaction = session.get_transaction()
    held = session.info.get(_HELD)
    if not before and held is not None and held[0] is transaction and held[1] == tenant_id:
        return held[2]
    # Nothing is flushed here: what the caller is writing (a new node, say) goes in with
    # its final values at the caller's next flush, not as an insert now and an update later.
    *_, found = pipelined(
        session,
        [
            *before,
            (  # both locks in one statement, ALL first as before
                _SHARED_LOCKS,
                {"every": f"toolplane.freeze.{ALL}", "tenant": f"toolplane.freeze.{tenant_id}"},
            ),
            (_ACTIVE, {"every_scope": ALL, "tenant_scope": tenant_id}),
        ],
    )
    row = found[0] if found else None
    session.info[_HELD] = (session.get_transaction(), tenant_id, row)
    return row


def _scope(identity: Identity, everything: bool) -> str:
    require_role(identity, ADMINS, "freeze or unfreeze dispatches")
    if everything and not identity.operator:
        raise Forbidden("freezing every tenant needs an admin of an operator tenant")
    return ALL if everything else identity.tenant_id


def freeze(session: Session, identity: Identity, *, everything: bool, reason: str) -> Freeze:
    """Stop every new dispatch of the caller's tenant (or of all). Does not commit."""
    require_text(reason, field="--reason")
    scope = _scope(identity, everything)
    session.info.pop(_HELD, None)  # this transaction changes what it may have read
    _lock(session, scope, shared=False)
    if session.get(Freeze, scope) is not None:
        raise UsageError("already frozen", field="--all" if everything else "tenant")
    row = Freeze(
        scope=scope,
        frozen_by=f"{identity.tenant_name}/{identity.principal}",
        reason=reason,
        frozen_at=datetime.now(UTC),
    )
    session.add(row)
    session.flush()
    append_events(
        session,
        [
            NewEvent(
                "PolicyFrozen",
                {"scope": scope, "by": row.frozen_by, "reason": reason},
                tenant_id=None if scope == ALL else identity.tenant_id,
            )
        ],
    )
    return row


def unfreeze(session: Session, identity: Identity, *, everything: bool, reason: str) -> None:
    """Lift the caller's tenant's freeze (or the global one). Does not commit."""
    require_text(reason, field="--reason")
    scope = _scope(identity, everything)
    session.info.pop(_HELD, None)  # this transaction changes what it may have read
    _lock(session, scope, shared=False)
    if session.execute(delete(Freeze).where(Freeze.scope == scope)).rowcount == 0:
        raise UsageError("not frozen", field="--all" if everything else "tenant")
    append_events(
        session,
        [
            NewEvent(
                "PolicyUnfrozen",
                {
                    "scope": scope,
                    "by": f"{identity.tenant_name}/{identity.principal}",
                    "reason": reason,
                },
                tenant_id=None if scope == ALL else identity.tenant_id,
            )
        ],
    )


def list_freezes(session: Session, identity: Identity) -> list[Freeze]:
    """The freezes that apply to the caller's tenant."""
    return list(session.scalars(select(Freeze).where(Freeze.scope.in_([ALL, identity.tenant_id]))))
