"""The runner: a long-lived process inside the sandbox that runs one tool's calls.

Started by :class:`sandbox_tasks.bwrap.BwrapExecutor` under bubblewrap (no
network, a read-only view of only its code and its data roots, a private /tmp,
an empty environment, no keys). It reads framed requests on stdin and answers
on stdout; each call runs in a forked child with the tool's rlimits, through
the same code as the plain fork executor.

Frames: see ``sandbox_tasks.frames``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from sandbox_tasks import frames
from sandbox_tasks.executor import ForkExecutor
from sandbox_tasks.registry import ToolContext, constrained, load_tools

SANDBOX_TMP = Path("/tmp")  # noqa: S108 - the sandbox's own private tmpfs

__all__ = ["read_frame", "write_frame", "main"]


def read_frame(stream: BinaryIO) -> Any | None:
    header = stream.read(frames.HEADER)
    if len(header) < frames.HEADER:
        return None
    size = frames.body_size(header)
    body = stream.read(size)
    return None if len(body) < size else frames.decode(body)


def write_frame(stream: BinaryIO, value: Any) -> None:
    stream.write(frames.encode(value))
    stream.flush()


def main(argv: list[str]) -> int:
    tool_name, extra = argv[0], argv[2]
    roots = {name: Path(path) for name, path in json.loads(argv[1]).items()}  # the tool's own
    spec = load_tools([m for m in extra.split(",") if m])[tool_name]
    executor = ForkExecutor(scratch_root=SANDBOX_TMP)
    base = ToolContext(
        scratch_dir=SANDBOX_TMP,
        repo_root=roots.get("repo"),
        docs_root=roots.get("docs"),
        roots=roots,
    )
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if spec.prepare is not None:  # build what the tool keeps (an index, ...) before serving
        try:
            spec.prepare(base)
        except Exception as e:  # the call that needs it reports the error again
            print(f"runner: prepare failed: {type(e).__name__}: {e}", file=sys.stderr)
    write_frame(stdout, {"ready": tool_name, "pid": os.getpid()})
    while True:
        request = read_frame(stdin)
        if request is None:
            return 0
        try:
            args = spec.args_model.model_validate(request["args"])
        except ValidationError as e:
            write_frame(stdout, {"ok": False, "code": "invalid_argument", "message": str(e)[:2000]})
            continue

        def relay(request: dict[str, Any]) -> dict[str, Any]:
            """Egress crosses to the worker, which decides, fetches and records."""
            write_frame(stdout, {"fetch": request})
            answer = read_frame(stdin)
            return answer if isinstance(answer, dict) else {"ok": False, "code": "tool_error"}

        # Every fetch crosses to the worker, which checks it against the allowlist.
        call_spec = spec
        if isinstance(request.get("limits"), dict):
            call_spec = constrained(spec, request["limits"], None)
        outcome = executor.run(call_spec, args, base, fetcher=relay)
        write_frame(
            stdout,
            {
                "ok": outcome.ok,
                "result": outcome.result,
                "code": outcome.error_code,
                "message": outcome.error_message,
            },
        )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
