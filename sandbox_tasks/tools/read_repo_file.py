"""read_repo_file: read one UTF-8 text file of the repository, or a range of its lines."""

from __future__ import annotations

import hashlib
import os

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.registry import Limits, ToolContext, ToolSpec
from sandbox_tasks.safe_open import open_beneath, read_at_most

MAX_BYTES = 1_000_000

__all__ = ["ReadRepoFileArgs", "ReadRepoFileResult", "read_repo_file", "TOOL"]


class ReadRepoFileArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    path: str = Field(min_length=1, max_length=4096, description="Relative to the repository")
    start_line: int | None = Field(default=None, ge=1, description="First line, 1-based")
    end_line: int | None = Field(default=None, ge=1, description="Last line, inclusive")
    max_bytes: int = Field(default=MAX_BYTES, ge=1, le=MAX_BYTES)


class ReadRepoFileResult(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    path: str  # posix, relative to the repository root, symlinks resolved
    content: str  # the selected lines, or the whole file
    sha256: str  # of the whole file's bytes
    size: int  # bytes of the whole file
    lines: int  # lines of the whole file
    start_line: int
    end_line: int


def _split_lines(text: str) -> list[str]:
    """Lines with their ``\\n`` kept; only ``\\n`` ends a line."""
    if not text:
        return []
    parts = [part + "\n" for part in text.split("\n")]
    last = parts.pop()[:-1]
    if last:
        parts.append(last)
    return parts


def read_repo_file(args: ReadRepoFileArgs, ctx: ToolContext) -> ReadRepoFileResult:
    if args.start_line is not None and args.end_line is not None:
        if args.start_line > args.end_line:
            raise ToolFailure(
                "invalid_argument", "start_line must not be after end_line", field="start_line"
            )
    opened = open_beneath(ctx.root("repo"), args.path, field="path")
    try:
        data = read_at_most(opened.fd, args.max_bytes + 1)
    finally:
        os.close(opened.fd)
    if len(data) > args.max_bytes:
        raise ToolFailure(
            "too_large", f"path: file is larger than max_bytes ({args.max_bytes})", field="path"
        )
    if b"\x00" in data:
        raise ToolFailure("invalid_argument", "path: binary file (contains NUL)", field="path")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ToolFailure(
            "invalid_argument", f"path: not valid UTF-8 at byte {e.start}", field="path"
        ) from e
    lines = _split_lines(text)
    start = args.start_line or 1
    end = min(args.end_line or len(lines), len(lines))
    if args.start_line is not None and start > len(lines):
        raise ToolFailure(
            "invalid_argument",
            f"start_line: {start} is beyond the end of the file ({len(lines)} lines)",
            field="start_line",
        )
    whole = args.start_line is None and args.end_line is None
    return ReadRepoFileResult(
        path=opened.path,
        content=text if whole else "".join(lines[start - 1 : end]),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        lines=len(lines),
        start_line=start,
        end_line=end,
    )


TOOL = ToolSpec(
    name="read_repo_file",
    version="1.0.0",
    description=(
        "Read a UTF-8 text file of the repository by its relative path, whole or a range "
        "of lines (1-based, inclusive). Refuses paths that leave the repository, "
        "symlinks pointing outside it, non-regular, binary and oversized files."
    ),
    args_model=ReadRepoFileArgs,
    result_model=ReadRepoFileResult,
    func=read_repo_file,
    limits=Limits(timeout_s=5, output_bytes=4_000_000),
    read_only=True,
    data_roots=("repo",),
)
