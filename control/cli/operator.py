"""``toolplane`` operator commands on the control host: migrations, keys, tenants, tools.

They use the control's own settings (the database's owner URL, the key store);
no caller needs them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from control.cli.output import console, print_json
from control.cli.support import JsonOpt, handled, load_settings
from control.cli.support import plane as _plane
from control.errors import UsageError

__all__ = [
    "keys_app",
    "ledger_checkpoint",
    "ledger_unverified",
    "migrate",
    "tenant_app",
    "tools_app",
]

keys_app = typer.Typer(
    help="Signing keys of control and the tools (operator commands, on the control host).",
    no_args_is_help=True,
)
tenant_app = typer.Typer(
    help="Tenants (operator commands, on the control host).", no_args_is_help=True
)
tools_app = typer.Typer(
    help="Tools' manifests: approve what workers announce (operator commands, on the "
    "control host).",
    no_args_is_help=True,
)


@handled
def migrate() -> None:
    """Create or upgrade the ledger's tables, then grant the control's database role
    (operator command, on the control host)."""
    from control.ops.runtime_database import ensure_runtime_url
    from ledger.migrate import current_revision, upgrade

    plane = _plane()
    plane.check_database()
    upgrade(plane.engine)
    _, role = ensure_runtime_url(plane.settings, plane.engine)
    if plane.keystore.entries():
        plane.sync_keys()
    console.print(f"ledger at revision {current_revision(plane.engine)}")
    made = "created, " if role.created else ""
    console.print(f"runtime role {role.name}: {made}granted on {len(role.tables)} tables")


@handled
def ledger_unverified(json_: JsonOpt = False) -> None:
    """Count the messages on `results` that changed nothing, per problem (operator command).

    A receipt that did not verify, a result not bound to its dispatched envelope, or a
    message ingest kept failing on: how many arrived, and how many distinct ones are
    recorded on the system chain."""
    from control.orchestration.unverified import counts

    plane = _plane()
    with plane.sessions() as session:
        rows = counts(session)
    if json_:
        print_json([r.as_dict() for r in rows])
        return
    if not rows:
        console.print("no unverified messages")
    for r in rows:
        console.print(
            f"{r.problem}: {r.received} received, {r.recorded} distinct recorded, "
            f"last {r.last_at.isoformat(timespec='seconds')}",
            markup=False,
        )


@handled
def ledger_checkpoint(json_: JsonOpt = False) -> None:
    """Integrate every chain into its Merkle tree and sign a checkpoint of each one that
    grew, into the checkpoint directory (operator command, on the control host). Exits 1
    if a chain is not consistent with its newest checkpoint (nothing is signed for it)."""
    plane = _plane()
    signed, refused = plane.checkpoint()
    if json_:
        print_json(
            {
                "signed": [
                    {
                        "chain_id": s.chain_id,
                        "origin": s.checkpoint.origin,
                        "size": s.checkpoint.size,
                        "new": s.written,
                    }
                    for s in signed
                ],
                "refused": [{"chain_id": r.chain_id, "problem": r.problem} for r in refused],
                "directory": plane.checkpoints.location,  # or s3://bucket/prefix/
                "vkey": plane.checkpoint_signer.verifier.vkey,
            }
        )
    else:
        for s in signed:
            state = "signed" if s.written else "unchanged"
            console.print(f"{s.checkpoint.origin}: {s.checkpoint.size} events, {state}")
        for r in refused:
            console.print(f"REFUSED {r.chain_id}: {r.problem}", markup=False)
        console.print(f"verifier key: {plane.checkpoint_signer.verifier.vkey}", markup=False)
    if refused:
        raise typer.Exit(1)


# -- keys --------------------------------------------------------------------------


@keys_app.command("init")
@handled
def keys_init(json_: JsonOpt = False) -> None:
    """Create the control key, a receipt key for every registered tool and the checkpoint
    key (those missing)."""
    from ledger.checkpoints import load_signer
    from sandbox_tasks.registry import load_tools
    from toolplane.keystore import KeyStore

    settings = load_settings()
    created = KeyStore(settings.keys_dir).ensure_all(
        sorted(load_tools(settings.extra_tool_modules)),
        receipt_algorithm=settings.receipt_algorithm,
        per_tool=settings.tool_receipt_algorithms,
    )
    if not (settings.keys_dir / "checkpoint.skey").exists():  # signs the ledger's checkpoints
        load_signer(settings.keys_dir, settings.deployment)
        created.append("checkpoint")
    if json_:
        print_json({"created": created, "keys_dir": str(settings.keys_dir)})
    else:
        console.print(
            f"created: {', '.join(created) or 'none (all present)'} in {settings.keys_dir}"
        )


@keys_app.command("rotate")
@handled
def keys_rotate(
    tool: str,
    algorithm: Annotated[
        str | None,
        typer.Option(
            "--algorithm",
            help="ed25519 or hmac-sha256 (a tool's receipts; default: TOOLPLANE_RECEIPT_"
            "ALGORITHMS for TOOL, else TOOLPLANE_RECEIPT_ALGORITHM).",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Give TOOL (or `control`) a new key; the old one still verifies what it signed."""
    from control.ops.identities import refresh_worker_keys
    from toolplane.keystore import KeyStore
    from toolplane.signing import ALGORITHMS

    settings = load_settings()
    store = KeyStore(settings.keys_dir)
    owner = "control" if tool == "control" else f"tool.{tool}"
    if owner not in store.owners():
        raise UsageError(f"no key for {owner!r} to rotate", field="TOOL")
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise UsageError(f"must be one of {', '.join(ALGORITHMS)}", field="--algorithm")
    if owner == "control" and algorithm not in (None, "ed25519"):
        raise UsageError("the control's key signs envelopes: ed25519 only", field="--algorithm")
    if algorithm is None:
        algorithm = "ed25519" if owner == "control" else settings.receipt_algorithm_for(tool)
    key_id = store.rotate(owner, algorithm)  # type: ignore[arg-type]
    refreshed = refresh_worker_keys(settings)  # the workers' own key directories, at once
    if json_:
        print_json(
            {
                "owner": owner,
                "key_id": key_id,
                "algorithm": algorithm,
                "worker_dirs_refreshed": refreshed,
            }
        )
    else:
        console.print(
            f"{owner}: new {algorithm} key {key_id} (processes that can read its private file "
            "use it from their next job; restart those that cannot)"
        )


@keys_app.command("revoke")
@handled
def keys_revoke(
    key_id: str,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in KeyRevoked).")],
    json_: JsonOpt = False,
) -> None:
    """Revoke KEY_ID now: it verifies nothing received from now on (KeyRevoked)."""
    from control.governance.keys import revoke_key
    from control.ops.identities import refresh_worker_keys

    plane = _plane()
    done = revoke_key(plane.sessions, plane.keystore, key_id, reason=reason)
    refresh_worker_keys(plane.settings)  # the workers' own key directories, at once
    if json_:
        print_json(done.as_dict())
        return
    said = "was already revoked" if done.already else "revoked"
    console.print(f"{key_id} {said} at {done.revoked_at.isoformat()}: {done.reason}", markup=False)
    if done.replacement:
        console.print(f"{done.owner}: new key {done.replacement}", markup=False)


@keys_app.command("list")
@handled
def keys_list(json_: JsonOpt = False) -> None:
    """List every key with its owner, validity window and any revocation."""
    from toolplane.keystore import KeyStore

    entries = KeyStore(load_settings().keys_dir).entries()
    if json_:
        unrevoked = {"revoked_at": None, "revoked_reason": None}
        print_json([{k: v for k, v in (unrevoked | e).items() if k != "public"} for e in entries])
        return
    for e in entries:
        state = "active" if e["not_after"] is None else f"retired {e['not_after'][:19]}"
        if e.get("revoked_at"):
            state = f"REVOKED {e['revoked_at'][:19]} ({e.get('revoked_reason')})"
        console.print(f"{e['key_id']}  {e['algorithm']}  {state}", markup=False)


# -- tenants and tokens ------------------------------------------------------------


@tenant_app.command("create")
@handled
def tenant_create(
    name: str,
    operator: Annotated[
        bool, typer.Option("--operator", help="Its admins may freeze every tenant.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Create a tenant and print its first admin token (shown once).

    Operator command: runs on the control host with the control's database settings;
    the user commands need only TOOLPLANE_URL and a token.
    """
    from control.governance.auth import create_tenant

    plane = _plane()
    with plane.sessions() as session:
        tenant, token = create_tenant(session, name, operator=operator)
        session.commit()
    if json_:
        print_json(
            {"tenant_id": tenant.id, "name": tenant.name, "principal": "admin", "token": token}
        )
    else:
        console.print(f"tenant {tenant.name} ({tenant.id}) created; admin token (shown once):")
        console.print(token)


# -- tools ---------------------------------------------------------------------------


@tools_app.command("list")
@handled
def tools_list(json_: JsonOpt = False) -> None:
    """Every tool: the approved manifest in force, and the manifests workers announced that
    are held (not approved)."""
    from control.orchestration.manifests import list_tools

    plane = _plane()
    with plane.sessions() as session:
        tools = list_tools(session)
    if json_:
        print_json(tools)
        return
    for t in tools:
        if t["approved_sha256"]:
            line = f"{t['tool']}  {t['status']}  {t['approved_version']}  {t['approved_sha256']}"
            line += f"  by {t['approved_by']}"
        else:
            line = f"{t['tool']}  held (no approved manifest)"
        console.print(line, markup=False)
        for h in t["held"]:
            problem = f"  REFUSED: {h['problem']}" if h["problem"] else ""
            console.print(
                f"    held  {h['version']}  {h['manifest_sha256']}  announced "
                f"{h['announced_at'][:19]}{problem}",
                markup=False,
            )


@tools_app.command("approve")
@handled
def tools_approve(
    name: str,
    version: str,
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", help="The manifest's digest (needed when VERSION came with two)."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Approve the manifest a worker announced for NAME at VERSION: from now on the control
    uses its schema, limits and retries (ToolApproved, with you as the approver)."""
    from control.ops.toolpins import operator_name
    from control.orchestration.manifests import approve_manifest

    plane = _plane()
    by = operator_name()
    with plane.sessions() as session:
        row = approve_manifest(
            session, tool=name, version=version, sha256=sha256, by=by, via="toolplane tools approve"
        )
        session.commit()
        done = {"tool": name, "version": version, "manifest_sha256": row.manifest_sha256, "by": by}
    if json_:
        print_json(done)
    else:
        console.print(
            f"{name} {version} approved (sha256 {done['manifest_sha256']}) by {by}; the "
            "control processes apply it within seconds",
            markup=False,
        )
