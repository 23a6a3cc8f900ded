"""``toolplane-worker TOOL``: the sandbox worker's own entry point.

It imports the sandbox plane and the shared helpers only: no control plane, no
ledger, no database driver (a test checks the modules it really loads). It needs
TOOLPLANE_BROKER_URL (the tool's own broker user) and TOOLPLANE_HOME (the tool's
receipt key and the control's public keys); ``toolplane up`` starts it so.
Exit code 2 and one line on stderr for a bad argument or setting.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from pydantic import ValidationError

from toolplane import logfields
from toolplane.errors import ToolplaneError, first_problem
from toolplane.settings import Settings

EXIT_USAGE = 2
AUTOSCALE = re.compile(r"^([0-9]{1,3}),([0-9]{1,3})$")

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolplane-worker", description="Run one sandbox worker for tool.TOOL."
    )
    parser.add_argument("tool", metavar="TOOL")
    parser.add_argument("--concurrency", type=int, default=1, help="1 to 256 pool processes")
    parser.add_argument("--autoscale", help="MAX,MIN: grow and shrink the pool with the load")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument(
        "--log-format", help="text or json (default: TOOLPLANE_LOG_FORMAT, else text)"
    )
    return parser


def _usage(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.concurrency <= 256:
        return _usage(f"--concurrency: must be from 1 to 256, not {args.concurrency}")
    if args.autoscale is not None:
        found = AUTOSCALE.match(args.autoscale)
        if found is None or not 1 <= int(found[1]) <= 256 or int(found[2]) > int(found[1]):
            return _usage(f"--autoscale: {args.autoscale!r} is not MAX,MIN with 0 <= MIN <= MAX")
    option = "--log-format" if args.log_format is not None else logfields.ENV_NAME
    try:
        given = args.log_format if args.log_format is not None else os.environ.get(option)
        fmt = logfields.check_format(given, option=option)
    except ValueError as e:
        return _usage(str(e))
    os.environ[logfields.ENV_NAME] = fmt  # this process's settings, and its pool children
    try:
        settings = Settings()
    except ValidationError as e:
        field, rule = first_problem(e, where="settings")
        return _usage(f"TOOLPLANE_{field.upper()}: {rule}")
    if not settings.broker_url:
        return _usage("TOOLPLANE_BROKER_URL: not set (the tool's own broker user)")
    from sandbox_tasks.main import run_worker
    from sandbox_tasks.registry import load_tools

    tools = load_tools(settings.extra_tool_modules)
    if args.tool not in tools:
        return _usage(f"TOOL: unknown tool {args.tool!r} (known: {', '.join(sorted(tools))})")
    logfields.setup(args.loglevel.upper(), fmt)
    logfields.route_celery(fmt)  # Celery's own lines (main process, pool children) too
    try:
        run_worker(
            settings,
            args.tool,
            broker_url=settings.broker_url,
            concurrency=args.concurrency,
            autoscale=args.autoscale,
            loglevel=args.loglevel,
            quiet=fmt == "json",  # Celery's banner is not a log line
        )
    except ToolplaneError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
