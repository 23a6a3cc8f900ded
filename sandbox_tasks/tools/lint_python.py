"""lint_python: lint a Python snippet with ruff; the code is never run or imported.

ruff runs as a subprocess with the code on stdin, ``--isolated`` (no config
files are read), no cache, a timeout and an environment holding only ``PATH``,
``HOME`` (the scratch directory) and a one-thread limit.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.registry import Limits, ToolContext, ToolSpec

MAX_CODE_CHARS = 200_000
MAX_FINDINGS = 1_000
RUFF_TIMEOUT_S = 15.0
ALLOWED_SELECTORS = frozenset({"E", "F", "W", "S", "B", "I", "UP", "C4", "SIM", "PL"})
DEFAULT_SELECT = ("E", "F", "W", "S", "B")

__all__ = ["LintPythonArgs", "LintPythonResult", "lint_python", "ruff_command", "TOOL"]


class LintPythonArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    code: str = Field(description=f"Python source, at most {MAX_CODE_CHARS} characters")
    select: list[str] = Field(
        default=list(DEFAULT_SELECT),
        max_length=10,
        description="ruff rule prefixes, from: " + ", ".join(sorted(ALLOWED_SELECTORS)),
    )


class Finding(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    code: str
    message: str
    line: int
    column: int
    end_line: int
    end_column: int


class LintPythonResult(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    findings: list[Finding]
    count: int  # all findings, even beyond those listed
    truncated: bool  # more than MAX_FINDINGS findings
    ruff_version: str
    selected: list[str]


@functools.cache
def ruff_command() -> tuple[str, ...]:
    """How to run ruff: the binary installed with us, else on PATH, else ``python -m ruff``."""
    beside = Path(sys.executable).parent / "ruff"
    if beside.is_file() and os.access(beside, os.X_OK):
        return (str(beside),)
    found = shutil.which("ruff")
    if found:
        return (found,)
    return (sys.executable, "-m", "ruff")


def _run_ruff(argv: list[str], stdin: bytes, scratch: Path) -> subprocess.CompletedProcess[bytes]:
    scratch.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(scratch),
        "RAYON_NUM_THREADS": "1",  # one snippet: one thread keeps ruff inside RLIMIT_AS
    }
    try:
        return subprocess.run(
            [*ruff_command(), *argv],
            input=stdin,
            capture_output=True,
            env=env,
            cwd=scratch,
            timeout=RUFF_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise ToolFailure("timeout", f"ruff did not finish in {RUFF_TIMEOUT_S:g}s") from e
    except OSError as e:
        raise ToolFailure("tool_error", f"cannot run ruff: {e.strerror}") from e


def _first_line(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").replace("\x00", "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else "no output"


_VERSIONS: dict[tuple[str, ...], str] = {}


def _ruff_version(scratch: Path) -> str:
    """``ruff --version``, asked once per ruff command."""
    command = ruff_command()
    if command not in _VERSIONS:
        done = _run_ruff(["--version"], b"", scratch)
        if done.returncode != 0:
            raise ToolFailure("tool_error", f"ruff --version failed: {_first_line(done.stderr)}")
        _VERSIONS[command] = _first_line(done.stdout).removeprefix("ruff ").strip()
    return _VERSIONS[command]


def _selected(select: list[str]) -> list[str]:
    if not select:
        raise ToolFailure(
            "invalid_argument", "select: must name at least one rule prefix", field="select"
        )
    for selector in select:
        if selector not in ALLOWED_SELECTORS:
            allowed = ", ".join(sorted(ALLOWED_SELECTORS))
            raise ToolFailure(
                "invalid_argument",
                f"select: {selector[:40]!r} is not one of the allowed prefixes ({allowed})",
                field="select",
            )
    return list(dict.fromkeys(select))


def _finding(item: dict) -> Finding:
    start = item.get("location") or {}
    end = item.get("end_location") or start
    return Finding(
        code=str(item.get("code") or "syntax-error"),
        message=str(item.get("message", "")).replace("\x00", ""),
        line=int(start.get("row", 0)),
        column=int(start.get("column", 0)),
        end_line=int(end.get("row", 0)),
        end_column=int(end.get("column", 0)),
    )


def lint_python(args: LintPythonArgs, ctx: ToolContext) -> LintPythonResult:
    if len(args.code) > MAX_CODE_CHARS:
        raise ToolFailure(
            "too_large", f"code: longer than {MAX_CODE_CHARS} characters", field="code"
        )
    if "\x00" in args.code:
        raise ToolFailure("invalid_argument", "code: must not contain NUL", field="code")
    try:
        source = args.code.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ToolFailure("invalid_argument", "code: not valid Unicode", field="code") from e
    selected = _selected(args.select)
    argv = [
        "check",
        "--isolated",
        "--no-cache",
        "--output-format",
        "json",
        "--select",
        ",".join(selected),
        "--stdin-filename",
        "snippet.py",
        "-",
    ]
    done = _run_ruff(argv, source, ctx.scratch_dir)
    if done.returncode not in (0, 1):
        raise ToolFailure("tool_error", f"ruff failed: {_first_line(done.stderr)}")
    try:
        items = json.loads(done.stdout or b"[]")
        findings = sorted(
            (_finding(item) for item in items), key=lambda f: (f.line, f.column, f.code)
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise ToolFailure("tool_error", f"ruff gave unreadable output: {e}") from e
    return LintPythonResult(
        findings=findings[:MAX_FINDINGS],
        count=len(findings),
        truncated=len(findings) > MAX_FINDINGS,
        ruff_version=_ruff_version(ctx.scratch_dir),
        selected=selected,
    )


TOOL = ToolSpec(
    name="lint_python",
    version="1.0.0",
    description=(
        "Lint a Python snippet with ruff (never runs it). Returns findings with rule "
        "code, message and position, sorted by position. select picks rule prefixes "
        "from E, F, W, S, B, I, UP, C4, SIM, PL."
    ),
    args_model=LintPythonArgs,
    result_model=LintPythonResult,
    func=lint_python,
    limits=Limits(timeout_s=20, memory_mb=1024),
    read_only=True,
)
