"""``toolplane submit`` and ``toolplane workflows``: runs of workflows (DAGs of tool calls)."""

from __future__ import annotations

from typing import Annotated

import typer

from control.cli.output import console, err, print_json, print_run, safe
from control.cli.support import (
    ClassificationOpt,
    EnvOpt,
    IdempotencyOpt,
    JsonOpt,
    OnBehalfOpt,
    finish_run,
    handled,
    parse_args,
    tell_waiting,
)
from control.cli.support import client as cli_client

__all__ = ["submit", "workflows_app"]

workflows_app = typer.Typer(help="Workflows (DAGs of tool calls).", no_args_is_help=True)


@handled
def submit(
    workflow: str,
    input_: Annotated[
        list[str] | None,
        typer.Option("--input", help="K=V, an input of the workflow (repeatable)."),
    ] = None,
    env: EnvOpt = None,
    classification: ClassificationOpt = "internal",
    idempotency_key: IdempotencyOpt = None,
    on_behalf_of: OnBehalfOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Show progress node by node until the run ends.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.", min=0.1)] = 300.0,
    json_: JsonOpt = False,
) -> None:
    """Run a workflow from the workflows directory; with --wait, exit with its status code.

    Each node is decided by policy on its own when its dependencies complete; a
    failed or denied node fails the run and cancels the nodes not yet ended.
    """
    with cli_client() as client:
        view = client.run_workflow(
            workflow,
            parse_args(input_ or [], option="--input", as_json=False),
            environment=env,
            classification=classification,
            idempotency_key=idempotency_key,
            on_behalf_of=on_behalf_of,
        )
        err.print(safe(f"submitted {view.run_id}"), markup=False)
        if wait:
            view = client.wait(
                view.run_id, timeout=timeout, on_progress=_tell_progress, on_waiting=tell_waiting
            )
    if json_:
        print_json(view.as_dict())
    else:
        print_run(view)
    finish_run(view)  # without --wait: 0 while it runs, or how it ended already (denied: 3)


def _tell_progress(node_id: str, status: str, attempt: int) -> None:
    again = f" (attempt {attempt})" if attempt > 1 else ""
    err.print(safe(f"  {node_id}: {status}{again}"), markup=False)


@workflows_app.command("list")
@handled
def workflows_list(json_: JsonOpt = False) -> None:
    """The workflows you can submit (the server's): name, inputs, nodes, whether each loads."""
    with cli_client() as client:
        rows = [w.as_dict() for w in client.workflows()]
    if json_:
        print_json(rows)
        return
    if not rows:
        console.print("no workflows on the server")
    for row in rows:
        if not row["ok"]:
            console.print(safe(f"{row['name']}: [invalid] {row['problem']}"), markup=False)
            continue
        graph = ", ".join(
            f"{n['id']}({n['tool']})" + (f" after {'+'.join(n['needs'])}" if n["needs"] else "")
            for n in row["nodes"]
        )
        inputs = ", ".join(f"{k}: {v}" for k, v in row["inputs"].items()) or "none"
        console.print(safe(f"{row['name']} — inputs {inputs}; {graph}"), markup=False)
