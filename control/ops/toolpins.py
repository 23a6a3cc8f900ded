"""The operator's own start approves the tools it starts, from the code on its own host.

``toolplane up`` (and the test harness, which starts a stack as ``up`` does) knows which
tools it starts and runs their code from this host's installation. It computes each
tool's manifest as that tool's worker will announce it (the registry's
``ToolSpec.manifest()``, in a fresh interpreter with the worker's own environment, so
that a tool whose manifest reads a variable that TOOLPLANE_WORKER_ENV passes sees what
its worker sees), checks it as an approval would, and pins exactly that digest
(ToolApproved, by the operator's user on this host, via ``toolplane up``). A worker
that announces anything else (other code, or a key used to sign other contents) is
held like any other change, and ``up`` reports it instead of becoming ready.

Nothing is approved that no code on this host would announce, and no setting turns
approval off: a deployment whose workers run elsewhere approves with
``toolplane tools approve`` or the API.
"""

from __future__ import annotations

import getpass
import json
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from control.errors import ControlError, ManifestRefused
from control.ops.processes import ProcessSpec
from control.ops.runtime import ControlPlane
from control.orchestration.manifests import check_manifest, pin_manifest
from toolplane.canonical import digest

__all__ = ["expected_manifests", "operator_name", "pin_started_tools"]

# Runs in the worker's environment; imports the sandbox plane's registry only.
MANIFESTS = """
import json, sys
from sandbox_tasks.registry import load_tools
from toolplane.settings import Settings
tools = load_tools(Settings().extra_tool_modules)
print(json.dumps({name: tools[name].manifest() for name in json.loads(sys.argv[1])}))
"""


def operator_name() -> str:
    """Who approves from this host: the operating system's user, and the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def expected_manifests(tools: Iterable[str], env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each tool's manifest as a worker started with ``env`` announces it."""
    names = sorted(set(tools))
    done = subprocess.run(  # noqa: S603 - our own interpreter and program
        [sys.executable, "-c", MANIFESTS, json.dumps(names)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise ControlError(f"could not compute the tools' manifests on this host:\n{tail}")
    found: dict[str, dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def pin_started_tools(
    plane: ControlPlane, specs: Iterable[ProcessSpec], *, via: str = "toolplane up"
) -> dict[str, str]:
    """Approve the manifest each started tool's code announces; returns tool → sha256.

    ``plane`` must connect as the database's owner (a manifest of another digest that was
    in force stops applying, which deletes its row). Commits."""
    workers = {s.name.removeprefix("worker-"): s for s in specs if s.name.startswith("worker-")}
    if not workers:
        return {}
    first = workers[min(workers)]
    manifests = expected_manifests(workers, first.env)
    pinned: dict[str, str] = {}
    by = operator_name()
    with plane.sessions() as session:
        for tool, manifest in sorted(manifests.items()):
            try:
                check_manifest(manifest)
            except ManifestRefused as e:
                raise ControlError(f"tool {tool!r}: its manifest cannot be approved: {e}") from e
            sha = digest(manifest)
            pin_manifest(
                session, tool=tool, version=str(manifest["version"]), sha256=sha, by=by, via=via
            )
            pinned[tool] = sha
        session.commit()
    plane.forget_manifests()
    return pinned
