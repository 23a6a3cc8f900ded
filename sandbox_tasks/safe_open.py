"""Open a regular file beneath a root directory, safely against symlink tricks.

The path is walked one component at a time with ``openat`` (``os.open`` with
``dir_fd``) and ``O_NOFOLLOW``, starting from a descriptor of the root, so a
symlink swapped in between a check and the open is never followed by the
kernel. The last component is opened with ``O_NONBLOCK`` (a FIFO never
blocks) and must be a regular file by ``fstat`` on the opened descriptor.

Symlinks are refused by default (``symlink_refused``), wherever they sit in the
path: policy judges the path as the caller typed it, and a symlink would make
the tool read another file than the one policy decided on (``src/settings.txt
-> ../.env``). A tool that declares ``follow_symlinks`` passes
``follow_symlinks=True``: symlinks are then resolved here, lexically, relative
to the current position, one whose target leaves the root is refused, and the
tool must report ``OpenedFile.path`` (the resolved path) in its result.

A path that ends with ``/`` is refused: ``.env/`` is no ``.env`` to a policy glob, while
dropping the empty last component would open ``.env``.

A regular file with more than one name (a hard link: ``src/settings.txt`` and ``.env``
the same inode) is refused too, whatever the tool declares: no path resolves it to the
name policy would judge, and a hard link is no symlink for ``O_NOFOLLOW`` to catch.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from sandbox_tasks.errors import ToolFailure

MAX_SYMLINK_HOPS = 40

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

__all__ = ["OpenedFile", "open_beneath", "read_at_most", "MAX_SYMLINK_HOPS"]


@dataclass(frozen=True)
class OpenedFile:
    """A descriptor of a regular file and its resolved path relative to the root."""

    fd: int
    path: str  # posix, relative to the root, symlinks resolved


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _refuse_os_error(e: OSError, shown: str, field: str) -> ToolFailure:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return ToolFailure("not_found", f"{field}: {shown!r} does not exist", field=field)
    if e.errno == errno.ENAMETOOLONG:
        return ToolFailure("invalid_argument", f"{field}: a name is too long", field=field)
    if e.errno in (errno.EACCES, errno.EPERM):
        return ToolFailure("invalid_argument", f"{field}: {shown!r} is not readable", field=field)
    return ToolFailure("tool_error", f"{field}: cannot open {shown!r}: {e.strerror}", field=field)


def _symlink_target(name: str, dir_fd: int) -> str | None:
    """The target of ``name`` if it is a symlink, else None."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


class _Walk:
    """The directories entered so far: ``fds[0]`` is the root, ``names`` their path."""

    def __init__(self, root_fd: int) -> None:
        self.fds = [root_fd]
        self.names: list[str] = []

    @property
    def here(self) -> int:
        return self.fds[-1]

    def enter(self, name: str, fd: int) -> None:
        self.fds.append(fd)
        self.names.append(name)

    def up(self) -> bool:
        if len(self.fds) == 1:
            return False
        os.close(self.fds.pop())
        self.names.pop()
        return True

    def to_root(self) -> None:
        while self.up():
            pass

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _root_spellings(root: Path) -> list[str]:
    absolute = os.path.abspath(root)
    return list(dict.fromkeys([absolute, os.path.realpath(absolute)]))


def _follow(target: str, walk: _Walk, roots: list[str], field: str) -> list[str]:
    """The components that replace a symlink whose target is ``target``."""
    if "\x00" in target:  # cannot happen on POSIX, but never trust it
        raise ToolFailure("path_outside_root", f"{field}: bad symlink target", field=field)
    if not target.startswith("/"):
        return _components(target)
    normalized = posixpath.normpath(target)
    for root in roots:
        if normalized == root or normalized.startswith(root.rstrip("/") + "/"):
            walk.to_root()
            return _components(normalized[len(root) :])
    raise ToolFailure(
        "path_outside_root", f"{field}: a symlink points outside the root", field=field
    )


def open_beneath(
    root: Path, relpath: str, *, field: str = "path", follow_symlinks: bool = False
) -> OpenedFile:
    """Open ``relpath`` under ``root`` for reading; it must be a regular file.

    Raises ToolFailure: ``invalid_argument`` (NUL, not a regular file, a trailing ``/``,
    too many symlinks), ``symlink_refused`` (a component is a symlink and ``follow_symlinks``
    is off, or the file is a hard link), ``path_outside_root`` (absolute path, ``..``
    or a symlink leaving the root), ``not_found``.
    """
    if "\x00" in relpath:
        raise ToolFailure("invalid_argument", f"{field}: must not contain NUL", field=field)
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ToolFailure("invalid_argument", f"{field}: not valid Unicode", field=field) from e
    if relpath.startswith("/"):
        raise ToolFailure(
            "path_outside_root", f"{field}: must be relative to the root", field=field
        )
    if relpath.endswith("/"):  # a directory, as the kernel reads it; policy saw another name
        raise ToolFailure(
            "invalid_argument",
            f"{field}: {_shown(relpath)!r} ends with '/', which names a directory",
            field=field,
        )
    try:
        walk = _Walk(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as e:
        raise ToolFailure("tool_error", f"the root cannot be opened: {e.strerror}") from e
    try:
        return _walk_to_file(walk, relpath, _root_spellings(root), field, follow_symlinks)
    finally:
        walk.close()


def _shown(relpath: str) -> str:
    return relpath if len(relpath) <= 120 else relpath[:117] + "..."


def _walk_to_file(
    walk: _Walk, relpath: str, roots: list[str], field: str, follow: bool
) -> OpenedFile:
    pending = deque(_components(relpath))
    hops = 0
    while pending:
        name = pending.popleft()
        if name == "..":
            if not walk.up():
                raise ToolFailure(
                    "path_outside_root", f"{field}: '..' leaves the root", field=field
                )
            continue
        last = not pending
        try:
            fd = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=walk.here)
        except OSError as e:
            target = None
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                target = _symlink_target(name, walk.here)
            if target is None:
                raise _refuse_os_error(e, _shown(relpath), field) from e
            if not follow:
                met = _shown("/".join([*walk.names, name]))
                raise ToolFailure(
                    "symlink_refused",
                    f"{field}: {met!r} is a symlink; this tool reads no file through a "
                    "symlink (policy judges the path as given)",
                    field=field,
                ) from e
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise ToolFailure(
                    "invalid_argument", f"{field}: too many levels of symlinks", field=field
                ) from e
            pending.extendleft(reversed(_follow(target, walk, roots, field)))
            continue
        if not last:
            walk.enter(name, fd)
            continue
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise ToolFailure(
                "invalid_argument", f"{field}: {_shown(relpath)!r} is {kind}", field=field
            )
        if info.st_nlink > 1:
            os.close(fd)
            raise ToolFailure(
                "symlink_refused",
                f"{field}: {_shown(relpath)!r} is a hard link ({info.st_nlink} names): it may "
                "be another file under a name policy allows, so no tool reads it",
                field=field,
            )
        return OpenedFile(fd=fd, path="/".join([*walk.names, name]))
    raise ToolFailure(
        "invalid_argument", f"{field}: {_shown(relpath)!r} is a directory", field=field
    )


def read_at_most(fd: int, limit: int) -> bytes:
    """Read from ``fd`` until end of file or ``limit`` bytes, whichever comes first."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(65_536, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
