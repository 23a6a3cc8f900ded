"""``toolplane``: the command line of the control plane (and the worker launcher).

Exit codes: 0 done, 1 error or failed verification, 2 usage, 3 denied,
4 the tool failed, 5 waiting for approval. Errors are one line on stderr.
"""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from control.cli.broker import broker_acl
from control.cli.bundles import ledger_export, ledger_trust, ledger_verify_bundle, witness
from control.cli.governance import approve, policy_app, reject, token_app
from control.cli.operator import (
    keys_app,
    ledger_checkpoint,
    ledger_unverified,
    migrate,
    tenant_app,
    tools_app,
)
from control.cli.output import (
    console,
    err,
    print_awaiting,
    print_json,
    print_run,
    print_runs,
    safe,
)
from control.cli.support import (
    ClassificationOpt,
    EnvOpt,
    IdempotencyOpt,
    JsonOpt,
    LogFormatOpt,
    OnBehalfOpt,
    finish_run,
    handled,
    load_settings,
    parse_args,
    parse_autoscale,
    parse_worker_counts,
    setup_logging,
    tell_waiting,
)
from control.cli.support import (
    client as _client,
)
from control.cli.support import (
    plane as _plane,
)
from control.cli.workflows import submit, workflows_app
from control.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
)
from toolplane.errors import ToolplaneError

__all__ = ["app", "main", "parse_args"]

app = typer.Typer(
    name="toolplane",
    help="A governed execution plane for the tools that AI agents call.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
runs_app = typer.Typer(help="Runs of your tenant.", no_args_is_help=True)
ledger_app = typer.Typer(help="The evidence ledger.", no_args_is_help=True)
for sub, name in (
    (runs_app, "runs"),
    (ledger_app, "ledger"),
    (workflows_app, "workflows"),
):
    app.add_typer(sub, name=name)

app.add_typer(keys_app, name="keys")
app.add_typer(tenant_app, name="tenant")
app.add_typer(tools_app, name="tools")
app.add_typer(token_app, name="token")
app.add_typer(policy_app, name="policy")


# -- processes -------------------------------------------------------------------


@app.command()
@handled
def up(
    workers: Annotated[str, typer.Option(help="Worker concurrency per tool: TOOL=N,...")] = "",
    flower: Annotated[bool, typer.Option("--flower/--no-flower", help="Start Flower.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Return once everything is up.")] = False,
    log_format: LogFormatOpt = None,
) -> None:
    """Start (embedded servers if needed,) the control process and a worker per tool.

    Operator command: runs on the control host with the control's settings.
    """
    from control.ops import processes
    from control.ops.embedded import embedded_acl_summary, embedded_broker_urls, start_embedded
    from control.ops.identities import describe, prepare_workers
    from control.ops.runtime import ControlPlane
    from control.ops.runtime_database import ensure_runtime_url
    from ledger.migrate import upgrade
    from sandbox_tasks.registry import load_tools

    setup_logging("WARNING", log_format)  # and the processes started here (their settings)
    settings = load_settings()
    tools = load_tools(settings.extra_tool_modules)
    counts = {k: v for k, v in parse_worker_counts(workers, tools).items() if v > 0}
    broker, database = settings.broker_url, settings.database_url
    embedded = not (broker and database)
    broker_urls: dict[str, str] = {}
    if embedded:
        urls = start_embedded(settings.home)
        if not broker:  # ours: each process connects as its own ACL user (control.broker.acl)
            broker_urls = embedded_broker_urls(settings.home, sorted(tools))
            broker = broker_urls["control"]
        database = database or urls.database_url
        console.print(f"embedded Redis, PostgreSQL under {settings.home}")
        if broker_urls:
            console.print(embedded_acl_summary(settings.home))
    plane = ControlPlane(settings, broker_url=str(broker), database_url=str(database))
    plane.check_database()
    upgrade(plane.engine)
    runtime_url, role = ensure_runtime_url(settings, plane.engine)
    console.print(f"the control connects as database role {role.name}")
    plane.keystore.ensure_all(
        sorted(tools),
        receipt_algorithm=settings.receipt_algorithm,
        per_tool=settings.tool_receipt_algorithms,
    )
    plane.sync_keys()
    plane.policy  # noqa: B018 - validate the bundle before starting anything
    ids = prepare_workers(settings, counts)  # users, directories, keys (control.ops.identities)
    console.print(describe(ids))
    specs = processes.plan_processes(
        plane,
        workers=counts,
        flower=flower,
        runtime_database_url=runtime_url,
        broker_urls=broker_urls,
        identities=ids,
    )
    from control.broker.queues import declare_results_queue

    declare_results_queue(plane.celery)  # before any worker announces itself
    from control.ops.toolpins import pin_started_tools

    pinned = pin_started_tools(plane, specs)  # from the code on this host (control.ops.toolpins)
    console.print(f"approved the manifests of {', '.join(sorted(pinned))} as built here")
    processes.start_processes(settings.home, specs)
    try:
        processes.wait_ready(plane, sorted(counts))
    except ToolplaneError:
        processes.stop_processes(settings.home)
        raise
    from control.api.server import api_url

    console.print(f"up: control and workers for {', '.join(f'{k}×{v}' for k, v in counts.items())}")
    console.print(f"API on {api_url(settings)} (set TOOLPLANE_URL to it)", markup=False)
    if flower:
        where = settings.home / "flower-password"
        console.print(
            f"Flower on http://127.0.0.1:{settings.flower_port} (user {settings.flower_user}; "
            f"password: TOOLPLANE_FLOWER_PASSWORD or {where})"
        )
    if detach:
        return
    console.print("running; Ctrl-C stops everything (a process that exits is started again)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    supervisor = processes.Supervisor(settings.home, specs)
    try:
        with processes.supervising(settings.home):  # `down` asks this process to stop first
            while not stop.wait(1.0):
                for name in supervisor.check():
                    err.print(f"{name} had exited: started again (see its log in {settings.home})")
    except KeyboardInterrupt:
        pass
    processes.stop_processes(settings.home)
    if embedded:
        from control.ops.embedded import stop_embedded

        stop_embedded(settings.home)


@app.command()
@handled
def down() -> None:
    """Stop what `toolplane up` started, embedded servers included.

    Operator command: runs on the control host with the control's settings.
    """
    from control.ops.embedded import stop_embedded
    from control.ops.processes import stop_processes, stop_supervisor

    settings = load_settings()
    stop_supervisor(settings.home)  # else it would start again what is stopped here
    stopped = stop_processes(settings.home)
    stopped += stop_embedded(settings.home)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
@handled
def control(
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 4,
    api: Annotated[
        bool, typer.Option("--api/--no-api", help="Serve the HTTP API (TOOLPLANE_API_BIND).")
    ] = True,
    loglevel: str = "INFO",
    log_format: LogFormatOpt = None,
) -> None:
    """Run the control process: the API, results ingest, relay, sweeper, approvals expiry.

    Operator command: runs on the control host with the control's settings.
    """
    from control.ops.service import run_control

    setup_logging(loglevel, log_format)
    run_control(_plane(), concurrency=concurrency, loglevel=loglevel, api=api)


@app.command()
@handled
def api(loglevel: str = "INFO", log_format: LogFormatOpt = None) -> None:
    """Serve only the HTTP API, beside `toolplane control --no-api`: from
    TOOLPLANE_API_PROCESSES processes sharing TOOLPLANE_API_BIND's one socket.

    Operator command: runs on the control host with the control's settings.
    """
    from control.api.server import serve
    from control.ops.metrics import install as install_metrics

    setup_logging(loglevel, log_format)
    plane = _plane()
    on = plane.settings.metrics == "on"
    install_metrics(plane.settings.home, plane.engine, on=on)  # before prometheus_client
    plane.check_database()
    plane.policy  # noqa: B018 - a bundle that does not load stops the start, not a request
    serve(plane, processes=plane.settings.api_processes, log_level=loglevel.lower())


@app.command()
@handled
def worker(
    tool: str,
    concurrency: Annotated[int, typer.Option(min=1, max=256)] = 1,
    autoscale: Annotated[
        str | None,
        typer.Option(help="MAX,MIN: grow and shrink the pool with the load (not --concurrency)."),
    ] = None,
    loglevel: str = "INFO",
    log_format: LogFormatOpt = None,
) -> None:
    """Run one sandbox worker for tool.TOOL (consumes only that queue).

    Operator command: finds the embedded broker's URL for the tool's own user, then becomes
    `toolplane-worker TOOL` (python -m sandbox_tasks) as `toolplane up` would start it
    (environment; from the control's HOME, its own directory and user: control.ops.processes).
    """
    import sys

    from control.ops.embedded import embedded_broker_urls, find_embedded
    from control.ops.processes import exec_worker
    from sandbox_tasks.registry import load_tools

    if autoscale is not None:
        high, low = parse_autoscale(autoscale)
        autoscale = f"{high},{low}"
    fmt = setup_logging(loglevel, log_format)
    settings = load_settings()
    tools = load_tools(settings.extra_tool_modules)
    if tool not in tools:
        raise UsageError(f"unknown tool {tool!r} (known: {', '.join(sorted(tools))})", field="TOOL")
    broker = settings.broker_url
    if not broker:
        if find_embedded(settings.home) is None:
            raise UsageError("not set and no embedded broker runs", field="TOOLPLANE_BROKER_URL")
        broker = embedded_broker_urls(settings.home, [tool])[f"worker-{tool}"]
    # The worker is its own program (sandbox_tasks): this process becomes it, so that
    # nothing of the control plane stays loaded in a process that runs tools.
    argv = [sys.executable, "-m", "sandbox_tasks", tool, "--concurrency", str(concurrency)]
    argv += ["--loglevel", loglevel, "--log-format", fmt]
    argv += ["--autoscale", autoscale] if autoscale else []
    exec_worker(settings, tool, broker_url=broker, argv=argv)


# -- calls and runs ----------------------------------------------------------------


@app.command()
@handled
def call(
    tool: str,
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="K=V (V as JSON if it parses).")
    ] = None,
    env: EnvOpt = None,
    classification: ClassificationOpt = "internal",
    idempotency_key: IdempotencyOpt = None,
    on_behalf_of: OnBehalfOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.", min=0.1)] = 60.0,
    json_: JsonOpt = False,
) -> None:
    """Call one tool under policy; with --wait, exit with the run's status code.

    A call that needs an approval waits for it (with --wait, up to --timeout) and
    exits with 5 while it still waits. --env and --classification may only be
    stricter than what the server decides for your token.
    """
    with _client() as client:
        view = client.call(
            tool,
            parse_args(arg or []),
            environment=env,
            classification=classification,
            idempotency_key=idempotency_key,
            on_behalf_of=on_behalf_of,
            wait=wait,
            timeout=timeout,
            on_waiting=tell_waiting,
        )
    if json_:
        print_json(view.as_dict())
    else:
        print_run(view)
    finish_run(view)


@runs_app.command("list")
@handled
def runs_list(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    awaiting_approval: Annotated[
        bool, typer.Option("--awaiting-approval", help="Only runs that wait for an approval.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Your tenant's most recent runs."""
    with _client() as client:
        views = client.runs(limit=limit, awaiting_approval=awaiting_approval)
    if json_:
        print_json([v.as_dict() for v in views])
    elif awaiting_approval:
        print_awaiting(views)
    else:
        print_runs(views)


@runs_app.command("cancel")
@handled
def runs_cancel(
    run: str,
    reason: Annotated[str | None, typer.Option(help="Why (recorded as evidence).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Cancel a run of your tenant: nothing more is dispatched; RunCancelled is recorded."""
    with _client() as client:
        view = client.cancel(run, reason=reason)
    if json_:
        print_json(view.as_dict())
    else:
        print_run(view)


@runs_app.command("show")
@handled
def runs_show(run: str, json_: JsonOpt = False) -> None:
    """One run of your tenant with its nodes, results and receipts."""
    with _client() as client:
        view = client.run(run)
    if json_:
        print_json(view.as_dict())
    else:
        print_run(view)


# -- ledger and policy ---------------------------------------------------------------


@ledger_app.command("verify")
@handled
def ledger_verify(
    run: Annotated[str | None, typer.Option("--run", help="Name only this run's events.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Recompute every link, result hash and receipt of your tenant's chain, and check
    it against the newest signed checkpoint (a shorter log or another root is named)."""
    with _client() as client:
        report = client.verify_ledger(run_id=run)
    if json_:
        print_json(report.as_dict())
    else:
        verdict = "[green]ok[/green]" if report.ok else "[red]BROKEN[/red]"
        console.print(
            f"ledger {verdict}: {report.events} events in {report.chains} chain(s), "
            f"{report.receipts_verified} receipts verified"
            + "".join(f", checkpoint of {c['size']} events checked" for c in report.checkpoints)
        )
        for b in report.broken:
            where = (
                f"event {b['event_id']} ({b['chain_id']} #{b['seq']}, {b['kind']})"
                if b["event_id"] is not None
                else f"chain {b['chain_id']}"
            )
            console.print(safe(f"  {where}: {b['problem']}"), markup=False)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_ERROR)


ledger_app.command("unverified")(ledger_unverified)
ledger_app.command("checkpoint")(ledger_checkpoint)
ledger_app.command("export")(ledger_export)
ledger_app.command("verify-bundle")(ledger_verify_bundle)
ledger_app.command("trust")(ledger_trust)
app.command("witness")(witness)
app.command()(approve)
app.command()(reject)
app.command()(submit)
app.command("broker-acl")(broker_acl)
app.command()(migrate)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if e.code not in (None, EXIT_OK) and not isinstance(e.code, int):
            raise SystemExit(EXIT_USAGE) from None
        raise


if __name__ == "__main__":
    main()
