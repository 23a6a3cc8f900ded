"""Tools' manifests: what a worker announces takes effect only once the operator approved it.

A worker announces its tool's manifest signed with the tool's key. The control verifies
the signature and records each distinct manifest once (``tool_announcements``). The
operator pins one digest per tool (``tool_approvals``: ``toolplane tools approve``, the
API's ``POST /v1/tools/{name}/approve`` for an admin of an operator tenant, or
``toolplane up`` for the tools it starts from the code on its own host). A signed
announcement of the pinned digest is the manifest in force (``tool_manifests``); any
other is held (evidence ToolManifestHeld) and changes nothing: the control keeps the
approved schema, limits, read-only flag and retries. A tool with no approved manifest
cannot be called.

A tool's key is judged by when the control receives the manifest, not by its
``issued_at``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from control.errors import ManifestRefused, NotFound, UsageError
from control.governance.keys import judge_key
from control.orchestration.validation import SchemaRefused, check_args_schema
from ledger.chain import NewEvent
from ledger.models import ToolAnnouncement, ToolApproval, ToolManifest
from ledger.receipts import ReceiptProblem
from ledger.store import append_events
from toolplane.canonical import CanonicalJSONError, canonical_json, digest
from toolplane.errors import SignatureError
from toolplane.messages import SignedManifest
from toolplane.signing import KeyRing

log = logging.getLogger("toolplane.manifests")

TOOL_NAME = r"^[a-z][a-z0-9_]{0,62}$"
MAX_MANIFEST_BYTES = 256 * 1024  # canonical JSON of a whole manifest
MAX_HELD_PER_TOOL = 50  # distinct held manifests kept per tool; more are logged, not kept

__all__ = [
    "approve_manifest",
    "approved_in_force",
    "held_report",
    "check_manifest",
    "list_tools",
    "not_approved",
    "pin_manifest",
    "register_manifest",
]


class _Limits(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    timeout_s: float = Field(gt=0, le=86_400)


class _Shape(BaseModel):
    """What the control reads of a manifest; other fields are kept as they are."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: str = Field(pattern=TOOL_NAME)
    version: str = Field(min_length=1, max_length=40, pattern=r"^[\x21-\x7e]+$")
    args_schema: dict[str, Any]
    limits: _Limits
    read_only: bool = False
    max_attempts: int = Field(default=1, ge=1, le=10)


def check_manifest(manifest: dict[str, Any]) -> None:
    """Refuse a manifest the control cannot use (ManifestRefused naming the field and the
    rule): its shape, and an argument schema it will not evaluate (validation.py)."""
    try:
        _Shape.model_validate(manifest)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "manifest"
        raise ManifestRefused(error["msg"], field=where) from e
    try:
        check_args_schema(manifest["args_schema"])
    except SchemaRefused as e:
        raise ManifestRefused(e.rule, field=e.field) from e


def _lock(session: Session, tool: str) -> None:
    """Announcements and approvals of one tool, one at a time (so that an approval never
    misses an announcement that commits beside it, nor the other way round)."""
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"toolplane.tool.{tool}"}
    )


def _key_id(raw: Any) -> object:
    receipt = raw.get("receipt") if isinstance(raw, dict) else None
    return receipt.get("key_id") if isinstance(receipt, dict) else None


def _put_in_force(session: Session, row: ToolAnnouncement, at: datetime) -> bool:
    """Make the announcement the tool's manifest in force; False if it already was."""
    current = session.get(ToolManifest, row.tool)
    if current is not None and current.manifest_sha256 == row.manifest_sha256:
        return False
    values = {
        "tool": row.tool,
        "version": row.version,
        "manifest": row.manifest,
        "manifest_sha256": row.manifest_sha256,
        "key_id": row.key_id,
        "registered_at": at,
    }
    session.execute(
        pg_insert(ToolManifest)
        .values(**values)
        .on_conflict_do_update(index_elements=["tool"], set_=values)
    )
    return True


def register_manifest(session: Session, raw: Any, keys: KeyRing) -> str:
    """A worker's signed announcement: in force if the operator approved its digest, else
    held (ToolManifestHeld, once per digest). Returns the tool's name. Commits."""
    keys, received = judge_key(session, keys, _key_id(raw))
    try:
        signed = SignedManifest.model_validate(raw)
        tool = str(signed.manifest["name"])
        keys.verify(
            key_id=signed.receipt.key_id,
            algorithm=signed.receipt.algorithm,
            data=signed.body(),
            signature=signed.receipt.signature,
            owner=f"tool.{tool}",
            received=received,
        )
        sha = digest(signed.manifest)
        size = len(canonical_json(signed.manifest))
        if size > MAX_MANIFEST_BYTES:
            raise ManifestRefused(
                f"may have at most {MAX_MANIFEST_BYTES} bytes, not {size}", field="manifest"
            )
        check_manifest(signed.manifest)
        problem = None
    except ManifestRefused as e:
        if e.field in ("name", "version", "manifest"):  # nothing to hold it under
            session.rollback()
            log.warning("manifest.invalid problem=%s", e)
            raise ReceiptProblem(f"manifest refused: {e}") from e
        problem = str(e)  # held, and can never be approved
    except (ValidationError, KeyError, SignatureError, CanonicalJSONError) as e:
        session.rollback()
        log.warning("manifest.invalid problem=%s", e)
        raise ReceiptProblem(f"manifest refused: {e}") from e
    _lock(session, tool)
    pin = session.get(ToolApproval, tool, populate_existing=True)
    pinned = pin is not None and pin.manifest_sha256 == sha
    known = session.get(ToolAnnouncement, (tool, sha)) is not None
    if not (pinned or known) and _held_count(session, tool) >= MAX_HELD_PER_TOOL:
        session.rollback()
        log.warning("manifest.not_kept tool=%s sha=%s (too many held)", tool, sha[:12])
        raise ReceiptProblem(
            f"manifest of {tool!r} not kept: {MAX_HELD_PER_TOOL} of its manifests are held "
            "already (see `toolplane tools list`)"
        )
    announced = session.execute(
        pg_insert(ToolAnnouncement)
        .values(
            tool=tool,
            manifest_sha256=sha,
            version=str(signed.manifest["version"]),
            manifest=signed.manifest,
            key_id=signed.receipt.key_id,
            announced_at=received,
            problem=problem,
        )
        .on_conflict_do_nothing(index_elements=["tool", "manifest_sha256"])
        .returning(ToolAnnouncement.tool)
    ).first()
    row = session.get(ToolAnnouncement, (tool, sha), populate_existing=True)
    assert row is not None
    events: list[NewEvent] = []
    if pin is not None and pinned and problem is None:
        if _put_in_force(session, row, received):
            events.append(_registered(row, pin))
            log.info("tool.registered tool=%s sha=%s", tool, sha[:12])
    elif announced is not None:
        log.warning("tool.manifest_held tool=%s sha=%s problem=%s", tool, sha[:12], problem)
        events.append(
            NewEvent(
                "ToolManifestHeld",
                {
                    "tool": tool,
                    "version": row.version,
                    "manifest_sha256": sha,
                    "key_id": row.key_id,
                    "approved_sha256": pin.manifest_sha256 if pin is not None else None,
                    "problem": problem,
                    "manifest": signed.manifest,
                },
            )
        )
    append_events(session, events, at=received)
    session.commit()
    return tool


def _held_count(session: Session, tool: str) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(ToolAnnouncement).where(ToolAnnouncement.tool == tool)
        )
        or 0
    )


def _registered(row: ToolAnnouncement, pin: ToolApproval) -> NewEvent:
    return NewEvent(
        "ToolRegistered",
        {
            "tool": row.tool,
            "version": row.version,
            "manifest_sha256": row.manifest_sha256,
            "key_id": row.key_id,
            "approved_by": pin.approved_by,
            "manifest": row.manifest,
        },
    )


def pin_manifest(
    session: Session,
    *,
    tool: str,
    version: str,
    sha256: str,
    by: str,
    via: str,
    replaces: bool = True,
) -> bool:
    """Pin ``tool`` to the manifest of digest ``sha256`` (ToolApproved); in force at once if
    a worker announced it, else from its announcement on. With ``replaces`` (the owner's
    role only: it deletes), a manifest in force of another digest stops applying now.
    False if it was pinned to that digest already. Does not commit."""
    _lock(session, tool)
    now = datetime.now(UTC)
    pin = session.get(ToolApproval, tool, populate_existing=True)
    if pin is not None and pin.manifest_sha256 == sha256:
        return False
    previous = pin.manifest_sha256 if pin is not None else None
    values = {
        "tool": tool,
        "version": version,
        "manifest_sha256": sha256,
        "approved_by": by,
        "via": via,
        "approved_at": now,
    }
    session.execute(
        pg_insert(ToolApproval)
        .values(**values)
        .on_conflict_do_update(index_elements=["tool"], set_=values)
    )
    pin = session.get(ToolApproval, tool, populate_existing=True)
    row = session.get(ToolAnnouncement, (tool, sha256), populate_existing=True)
    in_force = row is not None and row.problem is None
    events = [
        NewEvent(
            "ToolApproved",
            {
                "tool": tool,
                "version": version,
                "manifest_sha256": sha256,
                "previous_sha256": previous,
                "by": by,
                "via": via,
                "announced": row is not None,
            },
        )
    ]
    if row is not None and in_force:
        assert pin is not None
        if _put_in_force(session, row, now):
            events.append(_registered(row, pin))
    elif replaces:
        session.execute(
            delete(ToolManifest).where(
                ToolManifest.tool == tool, ToolManifest.manifest_sha256 != sha256
            )
        )
    append_events(session, events, at=now)
    log.info("tool.approved tool=%s sha=%s by=%s", tool, sha256[:12], by)
    return True


def approve_manifest(
    session: Session, *, tool: str, version: str, sha256: str | None, by: str, via: str
) -> ToolAnnouncement:
    """Approve the announced manifest of ``tool`` at ``version`` (of digest ``sha256``, which
    must be named when that version was announced with different contents). Does not
    commit. NotFound if no worker announced it; ManifestRefused if it cannot be used."""
    query = select(ToolAnnouncement).where(
        ToolAnnouncement.tool == tool, ToolAnnouncement.version == version
    )
    if sha256 is not None:
        query = query.where(ToolAnnouncement.manifest_sha256 == sha256)
    found = list(session.scalars(query.order_by(ToolAnnouncement.announced_at)))
    if not found:
        said = f" with sha256 {sha256}" if sha256 else ""
        raise NotFound(
            "tool manifest",
            f"{tool} {version}",
            message=f"no worker announced tool {tool!r} at version {version!r}{said} "
            f"(see `toolplane tools list`)",
        )
    if len(found) > 1:
        digests = ", ".join(r.manifest_sha256 for r in found)
        raise ManifestRefused(
            f"version {version!r} of {tool!r} was announced with different contents "
            f"({digests}): name the one to approve",
            field="sha256",
        )
    row = found[0]
    if row.problem is not None:
        raise ManifestRefused(f"cannot be approved: {row.problem}", field="version")
    check_manifest(row.manifest)  # the rules of this control's version
    pin_manifest(
        session,
        tool=tool,
        version=version,
        sha256=row.manifest_sha256,
        by=by,
        via=via,
        replaces=False,
    )
    return row


def list_tools(session: Session) -> list[dict[str, Any]]:
    """Every tool announced or approved: the manifest in force, the pin, and what is held."""
    in_force = {r.tool: r for r in session.scalars(select(ToolManifest))}
    pins = {r.tool: r for r in session.scalars(select(ToolApproval))}
    held: dict[str, list[dict[str, Any]]] = {}
    for a in session.scalars(select(ToolAnnouncement).order_by(ToolAnnouncement.announced_at)):
        pinned = pins.get(a.tool)
        if pinned is not None and pinned.manifest_sha256 == a.manifest_sha256:
            continue
        held.setdefault(a.tool, []).append(
            {
                "version": a.version,
                "manifest_sha256": a.manifest_sha256,
                "key_id": a.key_id,
                "announced_at": a.announced_at.isoformat(),
                "problem": a.problem,
            }
        )
    out = []
    for tool in sorted(set(in_force) | set(pins) | set(held)):
        row, pin = in_force.get(tool), pins.get(tool)
        if row is not None and pin is not None and row.manifest_sha256 == pin.manifest_sha256:
            status = "approved"
        elif pin is not None:
            status = "awaiting_announcement"  # approved, no worker announced it yet
        else:
            status = "held"
        out.append(
            {
                "tool": tool,
                "status": status,
                "version": row.version if row else None,
                "manifest": row.manifest if row else None,
                "manifest_sha256": row.manifest_sha256 if row else None,
                "key_id": row.key_id if row else None,
                "registered_at": row.registered_at.isoformat() if row else None,
                "approved_version": pin.version if pin else None,
                "approved_sha256": pin.manifest_sha256 if pin else None,
                "approved_by": pin.approved_by if pin else None,
                "approved_at": pin.approved_at.isoformat() if pin else None,
                "held": held.get(tool, []),
            }
        )
    return out


def not_approved(session: Session, tool: str, *, field: str) -> UsageError:
    """The error for a call of a tool with no manifest in force: held, or unknown."""
    held = list(
        session.scalars(
            select(ToolAnnouncement)
            .where(ToolAnnouncement.tool == tool)
            .order_by(ToolAnnouncement.announced_at.desc())
        )
    )
    pin = session.get(ToolApproval, tool)
    if pin is not None and all(a.manifest_sha256 != pin.manifest_sha256 for a in held[:1]):
        return UsageError(
            f"tool {tool!r}: no worker announced its approved manifest (version {pin.version}, "
            f"sha256 {pin.manifest_sha256[:16]}…) yet; start its worker (`toolplane worker "
            f"{tool}`), or approve what it announces (`toolplane tools list`)",
            field=field,
        )
    if held:
        latest = held[0]
        return UsageError(
            f"tool {tool!r} has no approved manifest in force (held: version {latest.version}, "
            f"sha256 {latest.manifest_sha256[:16]}…); an operator approves it with "
            f"`toolplane tools approve {tool} {latest.version}`",
            field=field,
        )
    known = ", ".join(session.scalars(select(ToolManifest.tool).order_by(ToolManifest.tool)))
    return UsageError(f"unknown tool {tool!r} (known: {known or 'none'})", field=field)


def approved_in_force(session: Session) -> set[str]:
    """The tools whose approved manifest is in force (announced by a worker)."""
    return set(
        session.scalars(
            select(ToolManifest.tool).join(
                ToolApproval,
                (ToolApproval.tool == ToolManifest.tool)
                & (ToolApproval.manifest_sha256 == ToolManifest.manifest_sha256),
            )
        )
    )


def held_report(session: Session, tools: set[str]) -> str:
    """What of ``tools`` was announced but is not the approved manifest (for a start that
    waits in vain)."""
    pins = {p.tool: p.manifest_sha256 for p in session.scalars(select(ToolApproval))}
    said = ""
    for a in session.scalars(
        select(ToolAnnouncement)
        .where(ToolAnnouncement.tool.in_(tools))
        .order_by(ToolAnnouncement.tool, ToolAnnouncement.announced_at)
    ):
        if pins.get(a.tool) != a.manifest_sha256:
            said += (
                f"; {a.tool}: a manifest that is not the approved one was announced and is "
                f"held (version {a.version}, sha256 {a.manifest_sha256[:16]}…; "
                "see `toolplane tools list`)"
            )
    return said
