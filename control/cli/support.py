"""Helpers of the CLI: settings, error handling, argument parsing, exit codes."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from control.api.fields import cli_field
from control.cli.output import err, safe
from control.errors import (
    EXIT_AWAITING_APPROVAL,
    EXIT_DENIED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TOOL_FAILED,
    UsageError,
)
from toolplane import logfields
from toolplane.canonical import CanonicalJSONError, parse_json_strict
from toolplane.errors import ToolplaneError, first_problem
from toolplane.settings import Settings

__all__ = [
    "ClassificationOpt",
    "EnvOpt",
    "IdempotencyOpt",
    "JsonOpt",
    "LogFormatOpt",
    "OnBehalfOpt",
    "client",
    "exit_for",
    "finish_run",
    "handled",
    "load_settings",
    "parse_args",
    "parse_autoscale",
    "parse_worker_counts",
    "plane",
    "setup_logging",
    "tell_waiting",
]

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
EnvOpt = Annotated[str | None, typer.Option("--env", help="Environment (default: dev).")]
ClassificationOpt = Annotated[str, typer.Option(help="Data classification.")]
IdempotencyOpt = Annotated[str | None, typer.Option(help="Same key, same run.")]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="Log lines as text or json (default: TOOLPLANE_LOG_FORMAT, else text); "
        "the processes this one starts log the same way.",
    ),
]
OnBehalfOpt = Annotated[
    str | None, typer.Option(help="The agent or end user you act for (goes to policy).")
]


def plane():  # type: ignore[no-untyped-def]
    """The control plane of these settings (operator commands on the control host only)."""
    from control.ops.runtime import ControlPlane

    return ControlPlane.from_settings(load_settings())


def client():  # type: ignore[no-untyped-def]
    """A client of the API: TOOLPLANE_URL and TOOLPLANE_TOKEN (and TLS files), nothing else."""
    from control.client import Client, ClientSettings

    try:
        settings = ClientSettings()
    except ValidationError as e:
        field, rule = first_problem(e, where="settings")
        raise UsageError(rule, field="TOOLPLANE_" + field.upper()) from e
    return Client(settings=settings)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        field, rule = first_problem(e, where="settings")
        raise UsageError(rule, field="TOOLPLANE_" + field.upper()) from e


def handled(func: F) -> F:
    """Turn every expected failure into one line on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except ToolplaneError as e:
            err.print(_lines(f"error: {_shown(e)}"), markup=False)  # the API's words, escaped
            raise typer.Exit(getattr(e, "exit_code", EXIT_ERROR)) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as e:  # the last boundary: one line for people, the trace to a file
            if type(e).__name__ == "OperationalError":  # SQLAlchemy's, on operator commands
                first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
                err.print(f"error: database unavailable: {first}", markup=False)
                raise typer.Exit(EXIT_ERROR) from None
            trace = save_trace()
            err.print(
                safe(f"error: internal error: {type(e).__name__}: {e}".splitlines()[0]),
                markup=False,
            )
            err.print(f"(traceback saved to {trace})", markup=False)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


def _lines(text: str) -> str:
    """``text`` for a terminal: its lines kept, every other control character escaped."""
    return "\n".join(safe(line) for line in text.split("\n"))


def _shown(error: ToolplaneError) -> str:
    """The error as the CLI names things: a problem from the API names its JSON field
    (``args.path``), which the CLI shows as its option (``--arg path``)."""
    field = getattr(error, "field", None)
    if isinstance(error, UsageError) and field and not field.startswith("-") and field.islower():
        return f"{cli_field(field)}: {error.rule}"
    return str(error)


def save_trace() -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="toolplane-error-", suffix=".txt")
    with open(fd, "w") as handle:
        handle.write(traceback.format_exc())
    return path


def parse_args(pairs: list[str], *, option: str = "--arg", as_json: bool = True) -> dict[str, Any]:
    """``K=V`` pairs; V is JSON where it parses (``as_json``), else a string."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{pair!r} is not of the form K=V", field=option)
        if key in args:
            raise UsageError(f"{key!r} given twice", field=option)
        if not as_json:
            args[key] = raw
            continue
        try:
            args[key] = parse_json_strict(raw)
        except CanonicalJSONError:
            args[key] = raw
    return args


WHOLE = re.compile(r"[0-9]{1,4}")  # ASCII digits only: str.isdigit() also takes "³"


def parse_worker_counts(text: str, tools: Iterable[str], *, most: int = 64) -> dict[str, int]:
    """``TOOL=N,...`` of ``up --workers``: every known tool at 1 unless named (0: none)."""
    known = sorted(tools)
    counts = dict.fromkeys(known, 1)
    named: set[str] = set()
    for item in filter(None, (w.strip() for w in text.split(","))):
        name, sep, n = (part.strip() for part in item.partition("="))
        if not sep:
            raise UsageError(f"{item!r} is not of the form TOOL=N", field="--workers")
        if name not in counts:
            raise UsageError(
                f"unknown tool {name!r} (known: {', '.join(known)})", field="--workers"
            )
        if name in named:
            raise UsageError(f"{name!r} given twice", field="--workers")
        if not WHOLE.fullmatch(n) or int(n) > most:
            raise UsageError(
                f"{item!r}: N must be a whole number from 0 to {most}", field="--workers"
            )
        named.add(name)
        counts[name] = int(n)
    return counts


def parse_autoscale(text: str, *, most: int = 256) -> tuple[int, int]:
    """``MAX,MIN`` of ``worker --autoscale``: 1 <= MAX <= ``most``, 0 <= MIN <= MAX."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(WHOLE.fullmatch(p) for p in parts):
        raise UsageError(
            f"{text!r} is not of the form MAX,MIN (two whole numbers)", field="--autoscale"
        )
    high, low = int(parts[0]), int(parts[1])
    if not 1 <= high <= most:
        raise UsageError(f"MAX must be from 1 to {most}, not {high}", field="--autoscale")
    if low > high:
        raise UsageError(f"MIN ({low}) must not be above MAX ({high})", field="--autoscale")
    return high, low


def setup_logging(level: str, log_format: str | None = None) -> str:
    """Log as ``--log-format`` (else TOOLPLANE_LOG_FORMAT, else text) says, Celery's own
    lines too; the format goes into this process's environment, so that its settings and
    every process it starts (``up``, ``worker``) log the same way. Returns the format."""
    option = "--log-format" if log_format is not None else logfields.ENV_NAME
    try:
        fmt = logfields.check_format(
            log_format if log_format is not None else os.environ.get(logfields.ENV_NAME),
            option=option,
        )
    except ValueError as e:
        raise UsageError(f"{e}".split(": ", 1)[1], field=option) from None
    os.environ[logfields.ENV_NAME] = fmt
    logfields.setup(level.upper(), fmt)
    logfields.route_celery(fmt)
    return fmt


def exit_for(view: Any) -> int:
    if view.status == "completed":
        return EXIT_OK
    if view.status == "denied":
        return EXIT_DENIED
    if view.status == "awaiting_approval":
        return EXIT_AWAITING_APPROVAL
    if view.status == "failed":
        rejected = any(n.status == "rejected" for n in view.nodes)
        return EXIT_ERROR if rejected else EXIT_TOOL_FAILED
    if view.status == "cancelled":
        return EXIT_ERROR
    return EXIT_OK


def finish_run(view: Any) -> None:
    """Exit with the run's status code, saying on stderr why a denied run was denied."""
    code = exit_for(view)
    if code == EXIT_DENIED:
        for node in view.nodes:
            if node.status == "denied" and node.error:
                where = f"{node.node_id}: " if len(view.nodes) > 1 else ""
                err.print(safe(f"denied: {where}{node.error['message']}"), markup=False)
    raise typer.Exit(code)


def tell_waiting(waiting: list[dict[str, Any]]) -> None:
    for item in waiting:
        err.print(
            safe(
                f"waiting: {item['node_id']} needs an approval by {item['who']} "
                f"(policies: {', '.join(item['policies'])}; expires {item['expires_at'][:19]}Z)"
            ),
            markup=False,
        )
