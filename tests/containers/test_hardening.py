"""Every running container has the hardening compose.yaml asks for, seen by podman and from inside."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from tests.containers.stack import Stack

UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(value: str | int) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)b?", str(value).lower())
    assert m, value
    return int(m.group(1)) * UNITS.get(m.group(2), 1)


def status(stack: Stack, container: str) -> dict[str, str]:
    """/proc/1/status of the container's main process, read from inside it."""
    text = stack.exec(container, "cat", "/proc/1/status")
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def running(stack: Stack) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, svc.spec)
        for name, svc in stack.compose.services.items()
        if name != "migrate"  # a one-off: it has exited
    ]


def test_every_long_running_service_is_up_as_compose_says(cstack: Stack) -> None:
    services = running(cstack)
    assert {n for n, _ in services} >= {
        "redis",
        "postgres",
        "control",
        "flower",
        "worker-search_docs",
        "worker-read_repo_file",
        "worker-lint_python",
    }
    report = []
    ipc_seen: set[str] = set()
    for name, spec in sorted(services, key=lambda s: "ipc" in s[1]):
        container = cstack.compose.container(name)
        info = cstack.inspect(container)
        host = info["HostConfig"]
        assert info["State"]["Running"], name
        assert host["ReadonlyRootfs"] is bool(spec.get("read_only")), name
        if "pids_limit" in spec:
            assert host["PidsLimit"] == spec["pids_limit"], name
        if "mem_limit" in spec:
            assert host["Memory"] == size(spec["mem_limit"]), name
        if "memswap_limit" in spec:
            assert host["MemorySwap"] == size(spec["memswap_limit"]), name
        if "cpus" in spec:
            assert host["NanoCpus"] == int(float(spec["cpus"]) * 1e9), name
        if spec.get("ipc") == "private":  # podman 4.3 reports every own namespace "shareable"
            assert host["IpcMode"] in {"private", "shareable"}, name
            ipc = os.readlink(f"/proc/{info['State']['Pid']}/ns/ipc")  # seen from the host
            assert ipc not in ipc_seen and ipc != os.readlink("/proc/self/ns/ipc"), name
        ipc_seen.add(os.readlink(f"/proc/{info['State']['Pid']}/ns/ipc"))
        assert info["Config"]["User"] == spec["user"], name
        expected_nets = {
            cstack.compose.network_name(n) for n in cstack.compose.services[name].networks
        }
        assert set(info["NetworkSettings"]["Networks"]) == expected_nets, name
        seccomp = [o for o in spec.get("security_opt", []) if o.startswith("seccomp=")]
        if seccomp:
            assert any(
                o.startswith("seccomp=") and o.endswith("sandbox.json") for o in host["SecurityOpt"]
            ), name
        proc = status(cstack, container)
        assert int(proc["CapEff"], 16) == 0, (name, proc["CapEff"])
        assert int(proc["CapBnd"], 16) == 0, (name, proc["CapBnd"])
        assert proc["NoNewPrivs"].strip() == "1", name
        assert proc["Seccomp"].strip() == "2", name
        uid = proc["Uid"].split()[0]
        assert uid == spec["user"].split(":")[0], name
        mounts = cstack.exec(container, "cat", "/proc/mounts")
        root = next(line for line in mounts.splitlines() if line.split()[1] == "/")
        assert root.split()[3].startswith("ro"), (name, root)
        for tmpfs in spec.get("tmpfs", []):
            path, _, opts = tmpfs.partition(":")
            path = re.sub(r"^/var/run/", "/run/", path)  # a link to /run in Debian's images
            line = next(x for x in mounts.splitlines() if x.split()[1] == path)
            for flag in ("noexec", "nosuid", "nodev"):  # podman adds nosuid, nodev unasked
                assert flag not in opts or flag in line.split()[3], (name, path, flag, line)
        report.append(
            f"{name}: ro root, CapEff 0, NoNewPrivs 1, Seccomp 2, uid {uid}, "
            f"pids {host['PidsLimit']}, mem {host['Memory'] >> 20} MiB, "
            f"nets {sorted(n.removeprefix(cstack.compose.project + '-') for n in expected_nets)}"
        )
    print("\n".join(report))


@pytest.mark.parametrize(
    ("service", "reach", "refused"),
    [
        ("worker-lint_python", ["redis:6379"], ["postgres:5432", "control:8765", "flower:5555"]),
        ("flower", ["redis:6379"], ["postgres:5432"]),
    ],
)
def test_the_networks_let_a_process_reach_only_its_peers(
    cstack: Stack, service: str, reach: list[str], refused: list[str]
) -> None:
    """From the container's own process (not a tool): TCP to each peer by its service name."""
    probe = (
        "import socket, sys\n"
        "for target in sys.argv[1:]:\n"
        "    host, port = target.split(':')\n"
        "    try:\n"
        "        socket.create_connection((host, int(port)), timeout=3).close(); print(target, 'ok')\n"
        "    except OSError as e:\n"
        "        print(target, type(e).__name__)\n"
    )
    container = cstack.compose.container(service)
    out = cstack.exec(container, "/opt/venv/bin/python", "-I", "-c", probe, *reach, *refused)
    seen = dict(line.split(" ", 1) for line in out.splitlines())
    assert {t: seen[t] for t in reach} == dict.fromkeys(reach, "ok"), seen
    assert all(seen[t] != "ok" for t in refused), seen
