"""``toolplane submit`` and ``toolplane workflows``: runs of workflows (DAGs of tool calls)."""

from __future__ import annotations

from typing import Annotated

import typer

from control.cli_support import (
    ClassificationOpt,
    EnvOpt,
    IdempotencyOpt,
    JsonOpt,
    OnBehalfOpt,
    finish_run,
    handled,
    load_settings,
    parse_args,
    tell_waiting,
)
from control.cli_support import client as cli_client
from control.errors import UsageError
from control.output import console, err, print_json, print_run, safe

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
    client = cli_client()
    run_id = client.submit_workflow(
        workflow,
        parse_args(input_ or [], option="--input", as_json=False),
        environment=env,
        classification=classification,
        idempotency_key=idempotency_key,
        on_behalf_of=on_behalf_of,
    )
    err.print(safe(f"submitted {run_id}"), markup=False)
    if not wait:
        view = client.run(run_id)
    else:
        view = client.wait(
            run_id, timeout=timeout, on_progress=_tell_progress, on_waiting=tell_waiting
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
    """The workflows you can submit: name, inputs, nodes, and whether each one loads."""
    from control.workflows import list_workflows, load_workflow

    directory = load_settings().workflow_dir
    rows = []
    for name in list_workflows(directory):
        try:
            spec = load_workflow(directory, name)
        except UsageError as e:
            rows.append({"name": name, "ok": False, "problem": str(e)})
            continue
        rows.append(
            {
                "name": name,
                "ok": True,
                "description": spec.description,
                "inputs": {k: v.type for k, v in spec.inputs.items()},
                "nodes": [{"id": n.id, "tool": n.tool, "needs": list(n.needs)} for n in spec.nodes],
            }
        )
    if json_:
        print_json(rows)
        return
    if not rows:
        console.print(f"no workflows in {directory}")
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
