"""``toolplane`` commands of governance: tokens, approvals, and policy bundles."""

from __future__ import annotations

from typing import Annotated

import typer

from control.cli_support import (
    JsonOpt,
    exit_for,
    handled,
    load_settings,
    parse_args,
)
from control.cli_support import (
    client as _client,
)
from control.errors import (
    EXIT_AWAITING_APPROVAL,
    EXIT_DENIED,
    EXIT_ERROR,
    EXIT_OK,
    UsageError,
    require_text,
)
from control.output import console, err, print_json, print_run, safe

__all__ = ["approve", "policy_app", "reject", "token_app"]

token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
policy_app = typer.Typer(
    help="Policy bundles, decisions, tests and the kill switch.", no_args_is_help=True
)


@token_app.command("issue")
@handled
def token_issue(
    tenant: Annotated[str, typer.Option(help="Tenant name (must be your own).")],
    principal: Annotated[str, typer.Option(help="Principal name.")],
    role: Annotated[str, typer.Option(help="submitter, approver, auditor or admin.")],
    expires_in: Annotated[
        str | None, typer.Option(help="Lifetime such as 12h, 30d (default: no expiry).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Issue a token for a principal of your tenant (needs an admin token).

    The token is printed once, alone on stdout; its id (for `token revoke`) goes to stderr.
    """
    from control.auth import Role
    from control.errors import NotFound
    from policy.bundle import parse_duration

    try:
        role_value = Role(role)
    except ValueError:
        raise UsageError(
            f"must be one of {', '.join(r.value for r in Role)}", field="--role"
        ) from None
    require_text(principal, field="--principal", max_chars=200)
    expires_in_s = None
    if expires_in is not None:
        try:
            expires_in_s = parse_duration(expires_in)
        except ValueError as e:
            raise UsageError(str(e), field="--expires-in") from None
    client = _client()
    if client.identity.tenant_name != tenant:
        raise NotFound("tenant", tenant)
    issued = client.issue_token(principal, role_value, expires_in_s=expires_in_s)
    expires = issued.expires_at.isoformat() if issued.expires_at else None
    if json_:
        print_json(
            {
                "tenant": tenant,
                "principal": principal,
                "role": role,
                "token": issued.token,
                "token_id": issued.token_id,
                "expires_at": expires,
            }
        )
    else:
        console.print(issued.token, markup=False)
        err.print(f"token id {issued.token_id}; expires {expires or 'never'}", markup=False)


@token_app.command("list")
@handled
def token_list(json_: JsonOpt = False) -> None:
    """Your tenant's tokens: id, principal, role, state (needs an admin token)."""
    rows = _client().tokens()
    if json_:
        print_json(rows)
        return
    for row in rows:
        console.print(
            f"{row['token_id']}  {row['principal']}  {row['role']}  {row['state']}"
            f"  expires {row['expires_at'] or 'never'}",
            markup=False,
        )


@token_app.command("revoke")
@handled
def token_revoke(token_id: str, json_: JsonOpt = False) -> None:
    """Revoke a token of your tenant at once (needs an admin token)."""
    _client().revoke_token(token_id)
    if json_:
        print_json({"token_id": token_id, "revoked": True})
    else:
        console.print(f"revoked {token_id}", markup=False)


def _decided(run: str, json_: bool, decided) -> None:  # type: ignore[no-untyped-def]
    client = _client()
    view = client.run(run)
    if json_:
        print_json({"approval": decided.__dict__, "run": view.as_dict()})
    else:
        console.print(
            safe(f"approval {decided.approval_id}: {decided.status} — {decided.message}"),
            markup=False,
        )
        print_run(view)
    raise typer.Exit(exit_for(view))


@handled
def approve(
    run: str,
    node: str,
    reason: Annotated[str | None, typer.Option(help="Why (recorded as evidence).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Approve a call that waits for you, and dispatch it (approver role; not your own call)."""
    decided = _client().approve(run, node, reason=reason)
    _decided(run, json_, decided)


@handled
def reject(
    run: str,
    node: str,
    reason: Annotated[str, typer.Option(help="Why (recorded as evidence).")],
    json_: JsonOpt = False,
) -> None:
    """Reject a call that waits for approval; it is denied."""
    decided = _client().reject(run, node, reason=reason)
    _decided(run, json_, decided)


@policy_app.command("explain")
@handled
def policy_explain(
    tool: Annotated[str, typer.Option()],
    env: Annotated[str, typer.Option("--env")] = "dev",
    classification: Annotated[str, typer.Option()] = "internal",
    principal: Annotated[str, typer.Option()] = "anyone",
    role: Annotated[str, typer.Option()] = "submitter",
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="K=V (V as JSON if it parses).")
    ] = None,
    on_behalf_of: Annotated[str | None, typer.Option()] = None,
    json_: JsonOpt = False,
) -> None:
    """Show how the policy bundle decides a call, and which policies decided it.

    Exit code 0 allow, 3 deny, 5 approval required.
    """
    from policy.bundle import load_bundle
    from policy.engine import PolicyEngine, PolicyRequest

    engine = PolicyEngine(load_bundle(load_settings().bundle_dir))
    decision = engine.decide(
        PolicyRequest(
            tenant="explain",
            principal=principal,
            role=role,
            tool=tool,
            environment=env,
            classification=classification,
            args=parse_args(arg or []),
            on_behalf_of=on_behalf_of,
        )
    )
    if json_:
        print_json(decision.as_evidence())
    else:
        console.print(f"{decision.outcome.upper()}: {decision.reason}", markup=False)
        if decision.approval_ttl_s is not None:
            console.print(f"an approval would be valid for {decision.approval_ttl_s} s")
        if decision.constraints and (decision.constraints.limits or decision.constraints.egress):
            console.print(f"constraints: {decision.constraints.as_dict()}", markup=False)
        if decision.log_only and decision.log_only["policies"]:
            lo = decision.log_only
            console.print(
                f"log-only: would {lo['decision']} under {', '.join(lo['policies'])}"
                + (" (differs)" if lo["differs"] else ""),
                markup=False,
            )
        console.print(f"bundle {decision.bundle_version[:16]}…", style="dim")
    code = {"allow": EXIT_OK, "approval_required": EXIT_AWAITING_APPROVAL}
    raise typer.Exit(code.get(decision.outcome, EXIT_DENIED))


@policy_app.command("test")
@handled
def policy_test(
    directory: Annotated[
        str | None, typer.Argument(help="Bundle directory (default: TOOLPLANE_POLICY_DIR).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Run the bundle's tests (tests/*.json); exit 1 on any mismatch."""
    from pathlib import Path

    from policy.bundle import load_bundle
    from policy.testing import run_policy_tests

    path = Path(directory).resolve() if directory else load_settings().bundle_dir
    report = run_policy_tests(load_bundle(path))
    if json_:
        print_json(report.as_dict())
    else:
        for result in report.results:
            mark = "ok  " if result.passed else "FAIL"
            console.print(f"{mark} {result.file}: {result.case.name}", markup=False)
            for problem in result.problems:
                console.print(f"     {problem}", markup=False)
        verdict = "passed" if report.ok else "FAILED"
        console.print(
            f"{len(report.results)} cases, {report.failed} failed: {verdict} "
            f"(bundle {report.bundle_version[:16]}…)",
            markup=False,
        )
    raise typer.Exit(EXIT_OK if report.ok else EXIT_ERROR)


@policy_app.command("freeze")
@handled
def policy_freeze(
    reason: Annotated[str, typer.Option(help="Why (recorded as evidence).")],
    all_: Annotated[
        bool, typer.Option("--all", help="Every tenant (admin of an operator tenant).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Kill switch: deny every new dispatch of your tenant (or of all) at once (admin)."""
    client = _client()
    client.freeze(everything=all_, reason=reason)
    scope = "every tenant" if all_ else f"tenant {client.identity.tenant_name}"
    if json_:
        print_json({"frozen": "all" if all_ else client.identity.tenant_name, "reason": reason})
    else:
        console.print(f"frozen: {scope}; no new call dispatches until unfrozen", markup=False)


@policy_app.command("unfreeze")
@handled
def policy_unfreeze(
    reason: Annotated[str, typer.Option(help="Why (recorded as evidence).")],
    all_: Annotated[bool, typer.Option("--all", help="Lift the freeze of every tenant.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Lift a freeze (admin)."""
    client = _client()
    client.unfreeze(everything=all_, reason=reason)
    if json_:
        print_json({"unfrozen": "all" if all_ else client.identity.tenant_name})
    else:
        console.print("unfrozen", markup=False)


@policy_app.command("status")
@handled
def policy_status(json_: JsonOpt = False) -> None:
    """The bundle in force, its policies and plans, and any freeze on your tenant."""
    client = _client()
    bundle = client.plane.policy.bundle
    plan = bundle.plans.for_tenant(client.identity.tenant_name)
    status = {
        "version": bundle.version,
        "path": str(bundle.path),
        "policies": {p.id: p.mode for p in bundle.policies.values()},
        "plan": None if plan is None else {"name": plan[0], **plan[1].as_dict()},
        "freezes": client.freezes(),
    }
    if json_:
        print_json(status)
        return
    console.print(f"bundle {bundle.version[:16]}… from {bundle.path}", markup=False)
    for pid, mode in status["policies"].items():
        console.print(f"  {pid}" + ("  (log-only)" if mode == "log_only" else ""), markup=False)
    console.print(f"plan: {status['plan'] or 'unlimited'}", markup=False)
    for f in status["freezes"]:
        console.print(safe(f"FROZEN ({f['scope']}) by {f['by']}: {f['reason']}"), markup=False)
