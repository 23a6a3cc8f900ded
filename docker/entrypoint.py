"""The images' entrypoint: secrets from files into the environment, then exec.

    python /app/entrypoint.py toolplane control          # the control image
    python /app/entrypoint.py celery -A ... flower       # Flower, from the control image
    python /app/entrypoint.py toolplane-worker lint_python  # the worker image

Settings are read from the environment (``TOOLPLANE_*``), but a broker or
database URL carries a password, and a password in a container's environment
is visible to anyone who may inspect the container (``docker inspect``, the pod
spec). So the deployment mounts such values as files, one per variable, named
for the variable, under ``/run/secrets/env`` (compose secrets, Kubernetes secret
volumes), and this program exports each into its own environment before it
replaces itself with the program named. Only ``TOOLPLANE_*`` and ``FLOWER_*`` may
be set this way, and a variable that is also set in the container's environment
is refused rather than silently overridden. Not ``CELERY_BROKER_URL``: Celery
prefers it to any app's configured broker, so it would replace the process's own
broker user (control.broker.acl) with whatever it held.

The program is one of a fixed set, run from the image's venv (the worker image
has no ``toolplane``: it runs ``toolplane-worker``). Exit code 2 and one line on
stderr for anything refused.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

SECRETS_DIR = Path("/run/secrets/env")
VENV_BIN = Path("/opt/venv/bin")
PROGRAMS = ("toolplane", "toolplane-worker", "celery")
NAME = re.compile(r"^(TOOLPLANE_[A-Z0-9_]+|FLOWER_[A-Z0-9_]+)$")
EXIT_USAGE = 2

__all__ = ["SecretEnvError", "environment", "read_secret_env"]


class SecretEnvError(Exception):
    """A secret file that cannot become a variable (its path and the rule broken)."""


def read_secret_env(directory: Path) -> dict[str, str]:
    """The variables held as files in ``directory`` (none if it does not exist)."""
    if not directory.is_dir():
        return {}
    found: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".."):  # Kubernetes' atomic-writer bookkeeping
            continue
        if not NAME.match(path.name):
            raise SecretEnvError(f"{path}: not a variable that may come from a file")
        if not path.is_file():
            raise SecretEnvError(f"{path}: not a regular file")
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
        if not value or "\n" in value or "\0" in value:
            raise SecretEnvError(f"{path}: must hold one non-empty line")
        found[path.name] = value
    return found


def environment(base: Mapping[str, str], directory: Path = SECRETS_DIR) -> dict[str, str]:
    """``base`` plus the secret files' variables; a variable set in both is refused."""
    secret = read_secret_env(directory)
    clash = sorted(name for name in secret if name in base)
    if clash:
        raise SecretEnvError(
            f"{', '.join(clash)}: set both in the environment and in {directory}; "
            "keep it only in the secret file"
        )
    return {**base, **secret}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in PROGRAMS:
        sys.stderr.write(f"error: program: must be one of {', '.join(PROGRAMS)}\n")
        raise SystemExit(EXIT_USAGE)
    try:
        env = environment(os.environ)
    except (SecretEnvError, OSError) as e:
        sys.stderr.write(f"error: secrets: {e}\n")
        raise SystemExit(EXIT_USAGE) from e
    program = str(VENV_BIN / argv[0])
    os.execve(program, [program, *argv[1:]], env)  # noqa: S606 - a fixed program, no shell


if __name__ == "__main__":
    main(sys.argv[1:])
