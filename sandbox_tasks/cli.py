"""``toolplane-worker TOOL``: the sandbox worker's own entry point.

It imports the sandbox plane and the shared helpers only: no control plane, no
ledger, no database driver (a test checks the modules it really loads). It needs
TOOLPLANE_BROKER_URL (the tool's own broker user) and TOOLPLANE_HOME (the tool's
receipt key and the control's public keys); ``toolplane up`` starts it so.
Exit code 2 and one line on stderr for a bad argument or setting.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from pydantic import ValidationError

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
    logging.basicConfig(
        level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        run_worker(
            settings,
            args.tool,
            broker_url=settings.broker_url,
            concurrency=args.concurrency,
            autoscale=args.autoscale,
            loglevel=args.loglevel,
        )
    except ToolplaneError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
