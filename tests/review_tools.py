"""A tool that runs the code it is given (security review tests only).

Loaded with TOOLPLANE_EXTRA_TOOLS=tests.review_tools. ``review_probe`` stands for a tool
whose parser an attacker exploited: it runs ``code`` (Python) in the call's process, with
``ctx`` and ``out`` (a dict of strings it answers with) in scope. Every attempt reports
"ok..." or the errno it got, so a test can say which layer refused what.
"""

from __future__ import annotations

import errno
import os

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.registry import Limits, ToolContext, ToolSpec


class CodeArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    code: str = Field(max_length=20_000)


class CodeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    out: dict[str, str]


def err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def review_probe(args: CodeArgs, ctx: ToolContext) -> CodeResult:
    out: dict[str, str] = {"pid": str(os.getpid()), "ppid": str(os.getppid())}
    exec(args.code, {"ctx": ctx, "out": out, "err": err, "os": os})  # noqa: S102 - the point
    return CodeResult(out={k: str(v)[:2000] for k, v in out.items()})


TOOLS = [
    ToolSpec(
        name="review_probe",
        version="1.0.0",
        description="Runs the code it is given, as an exploited tool would (tests only).",
        args_model=CodeArgs,
        result_model=CodeResult,
        func=review_probe,
        limits=Limits(timeout_s=10, cpu_s=5, output_bytes=200_000),
        data_root="repo",
    )
]
