"""A hostile tool inside a hardened worker container: every attempt fails, and says so signed.

The probe (tests/containers/probe_tool.py) runs in ``worker-container_probe``, a sandbox
service with the settings of compose.yaml's workers, through the whole governed path. It
tries to read its worker's receipt key, its broker URL (the secret file and PID 1's
environment), the other workers' secrets, to connect to Redis, PostgreSQL and the API,
to write outside its scratch directory, to fork without end and to take all memory.
Each result is read back from the ledger as the worker signed it, the ledger verifies,
and the worker goes on serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.containers.stack import PROBE, Stack

KEYS = "/var/lib/toolplane/keys/private"


def probe(stack: Stack, *tries: tuple[str, str]) -> tuple[dict[str, str], str]:
    """The probe's result as the worker signed it (from the ledger), and its containment."""
    with stack.client() as client:
        args = {"attempts": [{"action": a, "target": t} for a, t in tries]}
        run = client.call(PROBE, args, wait=True, timeout=120)
        node = run.nodes[0]
        assert node.status == "completed", (node.status, node.error)
        assert node.receipt and node.receipt["key_id"].startswith(f"tool.{PROBE}")
        events = client.evidence(run.run_id)
        assert client.verify_ledger(run_id=run.run_id).ok
    signed = next(e.payload for e in events if e.kind == "ToolCallCompleted")
    result = signed["message"]["result"]
    assert result["result"] == node.result  # what the caller sees is what was signed
    return result["result"]["seen"], result["containment"]


def ip_of(stack: Stack, service: str) -> str:
    nets = stack.inspect(stack.compose.container(service))["NetworkSettings"]["Networks"]
    return str(next(iter(nets.values()))["IPAddress"])


def test_the_probe_is_refused_everything_and_the_worker_goes_on(cstack: Stack) -> None:
    key = next(
        p.name
        for p in (cstack.work / "keys-home/keys/private").iterdir()
        if p.name.startswith(f"tool.{PROBE}_")
    )
    other = next(
        p.name
        for p in (cstack.work / "keys-home/keys/private").iterdir()
        if p.name.startswith("tool.lint_python_")
    )
    tries = [
        ("write", "{scratch}/note"),  # its own scratch: allowed (so the probe can fail)
        ("read", f"{KEYS}/{key}"),  # its worker's receipt key
        ("list", KEYS),
        ("read", "/run/secrets/env/TOOLPLANE_BROKER_URL"),  # its worker's Redis password
        ("list", "/run/secrets/env"),
        ("read", "/proc/1/environ"),  # the worker's environment: the broker URL again
        ("read", "/proc/1/cmdline"),
        ("list", "/proc"),
        ("read", f"{KEYS}/{other}"),  # another tool's key: not in this container at all
        ("read", "/var/lib/toolplane/keys/index.json"),
        ("connect", f"{ip_of(cstack, 'redis')}:6379"),
        ("connect", "redis:6379"),
        ("connect", f"{ip_of(cstack, 'postgres')}:5432"),
        ("connect", f"{ip_of(cstack, 'control')}:8765"),
        ("write", "/tmp/planted"),  # the container's writable tmpfs
        ("write", "/var/lib/toolplane/planted"),  # the read-only root
        ("write", "/etc/planted"),
        ("fork_bomb", "2000"),
        ("memory", "4096"),
    ]
    seen, containment = probe(cstack, *tries)
    results = {f"{a} {t}": seen[f"{a} {t}"] for a, t in tries}
    assert results.pop("write {scratch}/note") == "ok"
    worked = {k: v for k, v in results.items() if v.startswith("ok")}
    assert not worked, worked
    assert "landlock" in containment and "+seccomp+nnp+rlimits" in containment
    assert containment.startswith("runner+") and containment.endswith("(no namespaces)")
    forks = results["fork_bomb 2000"]
    assert forks.startswith("EAGAIN after "), forks
    assert int(forks.split()[-2]) < 64, forks  # the call's process cap, not the container's
    memory = results["memory 4096"]
    assert memory.startswith("MemoryError after "), memory
    assert int(memory.split()[-2]) <= 512, memory  # the tool's RLIMIT_AS (512 MiB)
    report = {"containment": containment, **results}
    out = Path(cstack.work / "probe-results.json")
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    # The worker went on: healthy, and serving the next call.
    assert cstack.healthy(cstack.compose.container(f"worker-{PROBE}"))
    again, _ = probe(cstack, ("write", "{scratch}/again"))
    assert again == {"write {scratch}/again": "ok"}


def test_the_probe_container_holds_only_its_own_secrets(cstack: Stack) -> None:
    """What the worker itself (not the tool) has: its key, its broker URL, the index."""
    container = cstack.compose.container(f"worker-{PROBE}")
    keys = cstack.exec(container, "ls", KEYS).split()
    assert len(keys) == 1 and keys[0].startswith(f"tool.{PROBE}_"), keys
    secrets = cstack.exec(container, "ls", "/run/secrets/env").split()
    assert secrets == ["TOOLPLANE_BROKER_URL"], secrets
    url: Any = cstack.exec(container, "cat", "/run/secrets/env/TOOLPLANE_BROKER_URL")
    assert url.startswith(f"redis://toolplane-tool-{PROBE}:"), url.split(":")[:2]
