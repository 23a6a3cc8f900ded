"""Tools that only the tests register (TOOLPLANE_EXTRA_TOOLS=tests.fixture_tools).

Real worker processes import this module, so it must stay importable on its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.registry import Limits, ToolContext, ToolSpec


class SleepyArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    seconds: float = Field(ge=0, le=30)
    marker_dir: str = ""  # where to drop a file per execution (counts real runs)


class SleepyResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    slept: float
    pid: int


def sleepy(args: SleepyArgs, ctx: ToolContext) -> SleepyResult:
    if args.marker_dir:
        Path(args.marker_dir, f"run-{os.getpid()}-{time.time_ns()}").write_text("ran")
    time.sleep(args.seconds)
    return SleepyResult(slept=args.seconds, pid=os.getpid())


TOOLS = [
    ToolSpec(
        name="sleepy",
        version="1.0.0",
        description="Sleeps; counts its executions (for fault tests).",
        args_model=SleepyArgs,
        result_model=SleepyResult,
        func=sleepy,
        limits=Limits(timeout_s=8, cpu_s=5),
    )
]
