"""Stack directories that the workers' own users can reach (the harness's stacks live there).

As root, `toolplane up` runs each tool's workers as a user of its own, which must reach its
directory under the stack's home and the data roots put there. pytest's temporary
directories are 0700, and every pytest session sets /tmp/pytest-of-<user> back to 0700 when
it starts (another session on the same machine would cut a running stack's workers off), so
a stack's directory lives under STACKS_DIR (0711) instead, linked from pytest's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.harness import Services

STACKS_DIR = Path(tempfile.gettempdir()) / "toolplane-test-stacks"


def reachable(services: Services, path: Path) -> Path:
    """``path`` as a link to a new directory that other users can reach, removed with
    ``services`` (Services.close); ``path`` itself where we are not root."""
    if os.geteuid() != 0 or (path.is_symlink() and STACKS_DIR in path.resolve().parents):
        return path
    STACKS_DIR.mkdir(mode=0o711, exist_ok=True)
    if STACKS_DIR.is_symlink() or STACKS_DIR.stat().st_uid != 0:
        raise RuntimeError(f"{STACKS_DIR} is not root's own directory")
    STACKS_DIR.chmod(0o711)
    real = Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=STACKS_DIR))
    real.chmod(0o711)
    if path.is_dir() and not path.is_symlink():
        path.rmdir()  # an empty one, from tmp_path_factory.mktemp
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(real)
    services.reachable.append(real)
    return path
