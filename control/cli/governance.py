"""``toolplane`` commands of governance: tokens, approvals, and policy bundles."""

from __future__ import annotations

from typing import Annotated

import typer

from control.cli.output import console, err, print_json, print_run, safe
from control.cli.support import (
    JsonOpt,
    exit_for,
    handled,
    load_settings,
    parse_args,
)
from control.cli.support import (
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

__all__ = ["approve", "policy_app", "reject", "token_app"]

token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
policy_app = typer.Typer(
    help="Policy bundles, decisions, tests and the kill switch.", no_args_is_help=True
)


ROLES = ("submitter", "approver", "auditor", "admin")


@token_app.command("issue")
@handled
def token_issue(
    principal: Annotated[str, typer.Option(help="Principal name.")],
    role: Annotated[str, typer.Option(help="submitter, approver, auditor or admin.")],
    tenant: Annotated[
        str | None, typer.Option(help="Your tenant's name (checked; tokens are per tenant).")
    ] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="Lifetime such as 12h, 30d (default: no expiry).")
    ] = None,
    environment: Annotated[
        str | None,
        typer.Option(
            "--environment",
            help="Bind the token to an environment (its calls run there or stricter).",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Issue a token for a principal of your tenant (needs an admin token).

    The token is printed once, alone on stdout; its id (for `token revoke`) goes to stderr.
    """
    from control.errors import NotFound
    from policy.bundle import parse_duration

    if role not in ROLES:
        raise UsageError(f"must be one of {', '.join(ROLES)}", field="--role")
    require_text(principal, field="--principal", max_chars=200)
    expires_in_s = None
    if expires_in is not None:
        try:
            expires_in_s = parse_duration(expires_in)
        except ValueError as e:
            raise UsageError(str(e), field="--expires-in") from None
    with _client() as client:
        if tenant is not None and client.policy().tenant != tenant:
            raise NotFound("tenant", tenant)
        issued = client.issue_token(
            principal, role, expires_in_s=expires_in_s, environment=environment
        )
    if json_:
        print_json(issued.as_dict())
    else:
        console.print(issued.token, markup=False)
        err.print(
            f"token id {issued.token_id}; expires {issued.expires_at or 'never'}", markup=False
        )


@token_app.command("list")
@handled
def token_list(json_: JsonOpt = False) -> None:
    """Your tenant's tokens: id, principal, role, state (needs an admin token)."""
    with _client() as client:
        rows = client.tokens()
    if json_:
        print_json([row.as_dict() for row in rows])
        return
    for row in rows:
        console.print(
            safe(
                f"{row.token_id}  {row.principal}  {row.role}  {row.state}"
                f"  expires {row.expires_at or 'never'}"
            ),
            markup=False,
        )


@token_app.command("revoke")
@handled
def token_revoke(token_id: str, json_: JsonOpt = False) -> None:
    """Revoke a token of your tenant at once (needs an admin token)."""
    with _client() as client:
        client.revoke_token(token_id)
    if json_:
        print_json({"token_id": token_id, "revoked": True})
    else:
        console.print(f"revoked {token_id}", markup=False)


def _decided(json_: bool, decided) -> None:  # type: ignore[no-untyped-def]
    view = decided.run
    if json_:
        approval = {k: v for k, v in decided.as_dict().items() if k != "run"}
        print_json({"approval": approval, "run": view.as_dict()})
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
    with _client() as client:
        decided = client.approve(run, node, reason=reason)
    _decided(json_, decided)


@handled
def reject(
    run: str,
    node: str,
    reason: Annotated[str, typer.Option(help="Why (recorded as evidence).")],
    json_: JsonOpt = False,
) -> None:
    """Reject a call that waits for approval; it is denied."""
    with _client() as client:
        decided = client.reject(run, node, reason=reason)
    _decided(json_, decided)


@policy_app.command("explain")
@handled
def policy_explain(
    tool: Annotated[str, typer.Option()],
    env: Annotated[str | None, typer.Option("--env", help="Only stricter than yours.")] = None,
    classification: Annotated[str | None, typer.Option(help="Only stricter than yours.")] = None,
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="K=V (V as JSON if it parses).")
    ] = None,
    on_behalf_of: Annotated[str | None, typer.Option()] = None,
    json_: JsonOpt = False,
) -> None:
    """Show how the server's policy bundle decides this call for you, and which policies
    decided it (nothing runs). Exit code 0 allow, 3 deny, 5 approval required."""
    with _client() as client:
        decision = client.explain(
            tool,
            parse_args(arg or []),
            environment=env,
            classification=classification,
            on_behalf_of=on_behalf_of,
        )
    if json_:
        print_json(decision)
    else:
        outcome = str(decision.get("decision", decision.get("outcome", "deny")))
        console.print(safe(f"{outcome.upper()}: {decision.get('reason', '')}"), markup=False)
        if decision.get("approval_ttl_s") is not None:
            console.print(f"an approval would be valid for {decision['approval_ttl_s']} s")
        constraints = decision.get("constraints") or {}
        if any(constraints.get(k) for k in ("limits", "egress", "private_egress")):
            console.print(safe(f"constraints: {constraints}"), markup=False)
        log_only = decision.get("log_only") or {}
        if log_only.get("policies"):
            console.print(
                safe(
                    f"log-only: would {log_only['decision']} under "
                    f"{', '.join(log_only['policies'])}"
                    + (" (differs)" if log_only.get("differs") else "")
                ),
                markup=False,
            )
        console.print(f"bundle {str(decision.get('bundle_version', ''))[:16]}…", style="dim")
    code = {"allow": EXIT_OK, "approval_required": EXIT_AWAITING_APPROVAL}
    raise typer.Exit(code.get(str(decision.get("decision")), EXIT_DENIED))


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
    with _client() as client:
        client.freeze(everything=all_, reason=reason)
        tenant = client.policy().tenant
    scope = "every tenant" if all_ else f"tenant {tenant}"
    if json_:
        print_json({"frozen": "all" if all_ else tenant, "reason": reason})
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
    with _client() as client:
        client.unfreeze(everything=all_, reason=reason)
        tenant = client.policy().tenant
    if json_:
        print_json({"unfrozen": "all" if all_ else tenant})
    else:
        console.print("unfrozen", markup=False)


@policy_app.command("status")
@handled
def policy_status(json_: JsonOpt = False) -> None:
    """The bundle in force, its policies and plans, and any freeze on your tenant."""
    with _client() as client:
        status = client.policy()
    if json_:
        print_json(status.as_dict())
        return
    console.print(f"bundle {status.version[:16]}… (the server's)", markup=False)
    for pid, mode in status.policies.items():
        console.print(f"  {pid}" + ("  (log-only)" if mode == "log_only" else ""), markup=False)
    console.print(f"plan: {status.plan or 'unlimited'}", markup=False)
    console.print(
        f"your calls run in {status.environment}, classification {status.classification} "
        "or stricter",
        markup=False,
    )
    for f in status.freezes:
        console.print(safe(f"FROZEN ({f.scope}) by {f.by}: {f.reason}"), markup=False)
