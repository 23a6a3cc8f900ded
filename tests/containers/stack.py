"""The compose topology as podman containers: secrets made, services started in order.

What docs/deployment.md tells an operator to do, done by the test: keys (``toolplane
keys init``), the compose variables (``docker/keyfiles.py``), the broker's ACL users
(``toolplane broker-acl``), the passwords, the API's TLS certificate, each file owned by
the uid that reads it; then every service of docker/compose.yaml started from the
commands ``compose_podman`` derives from it, in the order and with the conditions of its
``depends_on``; then the tools' manifests approved and a tenant created in one-off
migrate containers, as the guide does with ``compose run --rm migrate``.

Changes to compose.yaml, each for a reason stated here:
- redis and postgres run stand-in images (docker/standins) since the official images
  cannot be pulled here; the ACL file is written for their Redis 7.0.
- ports are published on free ports of the host's loopback (other stacks on this host).
- a fifth sandbox service, ``worker-container_probe``, a copy of ``worker-lint_python``'s
  settings with its own uid, broker user and key, runs the probe tool; the control gets
  a copy of the shipped policy bundle with one policy more that permits it.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.containers.compose_podman import Compose, load

REPO = Path(__file__).resolve().parents[2]
PROBE = "container_probe"
PROBE_MODULE = "toolplane_container_probe"
SITE = "/opt/venv/lib/python3.11/site-packages"
TOOL_UIDS = {"search_docs": 10101, "read_repo_file": 10102, "lint_python": 10103, PROBE: 10104}
PROBE_POLICY = f"""
// tests/containers: the probe tool may run in dev, on public data.
@id("container-probe")
permit (principal, action == Toolplane::Action::"call", resource == Toolplane::Tool::"{PROBE}")
when {{ context.environment == "dev" }};
"""


class StackError(Exception):
    """A step of bringing the stack up failed (the step, and podman's words)."""


def podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(  # noqa: S603 - podman, with arguments built here
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise StackError(f"podman {' '.join(args[:3])}...: {done.stderr.strip()[-2000:]}")
    return done


def wait_for(what: str, ok: Callable[[], bool], timeout: float, every: float = 0.5) -> float:
    """Seconds until ``ok()``; StackError after ``timeout``. Polls a condition, no sleep-and-hope."""
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > timeout:
            raise StackError(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    compose: Compose
    work: Path
    api_url: str
    ca_bundle: Path
    token: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)

    def client(self, token: str | None = None) -> Any:
        from control.client import Client, ClientSettings

        settings = ClientSettings(
            url=self.api_url, token=token or self.token, ca_bundle=self.ca_bundle
        )
        return Client(settings=settings, timeout=60)

    def inspect(self, container: str) -> dict[str, Any]:
        return dict(json.loads(podman("inspect", container).stdout)[0])

    def exec(self, container: str, *argv: str) -> str:
        return podman("exec", container, *argv).stdout

    def logs(self, container: str, tail: int | None = 60) -> str:
        done = podman("logs", *(["--tail", str(tail)] if tail else []), container, check=False)
        return done.stdout + done.stderr

    def one_off(self, service: str, *command: str) -> str:
        """`compose run --rm SERVICE COMMAND`: the service's settings, another command."""
        name = f"{self.compose.project}-{service}-run"
        args = self.compose.run_args(service, command=list(command), container=name)
        args = [a for a in args if a != "-d"]
        args.insert(1, "--rm")
        done = podman(*args, check=False, timeout=180)
        if done.returncode != 0:
            raise StackError(f"{service} {' '.join(command)}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def healthy(self, container: str) -> bool:
        return podman("healthcheck", "run", container, check=False, timeout=60).returncode == 0

    def wait_healthy(self, container: str, timeout: float = 180) -> float:
        return wait_for(f"{container} healthy", lambda: self.healthy(container), timeout, every=1.0)

    def start(self, service: str, index: int = 1) -> str:
        name = self.compose.container(service, index)
        podman(*self.compose.run_args(service, index=index))
        self.started.append(name)
        return name


def _secrets(work: Path, env: dict[str, str]) -> dict[str, str]:
    """Every secret file compose.yaml names, owned as docs/deployment.md says."""
    docker = work / "docker"
    sec = docker / "secrets"
    home = work / "keys-home"
    tp = [sys.executable, "-m", "control.cli"]
    run = {"env": env, "cwd": REPO, "check": True, "capture_output": True, "text": True}
    subprocess.run([*tp, "keys", "init"], **run)  # noqa: S603
    keys = home / "keys"
    out = subprocess.run([sys.executable, "docker/keyfiles.py", str(keys)], **run)  # noqa: S603
    variables = dict(line.split("=", 1) for line in out.stdout.split())
    subprocess.run([*tp, "broker-acl", str(sec / "broker"), "--redis-version", "7.0"], **run)  # noqa: S603
    pg, rt = os.urandom(16).hex(), os.urandom(16).hex()
    files = {
        "postgres_password": pg,
        "database_url": f"postgresql://toolplane:{pg}@postgres:5432/toolplane",
        "postgres_runtime_password": rt,
        "database_url_runtime": f"postgresql://toolplane_runtime:{rt}@postgres:5432/toolplane",
        "flower_basic_auth": f"admin:{os.urandom(12).hex()}",
    }
    for name, value in files.items():
        (sec / name).write_text(value + "\n")
    _tls(sec / "api")
    owners: dict[str, tuple[int, int]] = {
        "broker/users.acl": (999, 1000),
        "postgres_password": (999, 999),
        "postgres_runtime_password": (999, 999),
        "database_url": (10001, 10001),
        "database_url_runtime": (10001, 10001),
        "flower_basic_auth": (10001, 10001),
        "broker/broker_url.control": (10001, 10001),
        "broker/broker_url.flower": (10001, 10001),
        "api/tls.key": (10001, 10001),
    }
    for tool, uid in TOOL_UIDS.items():
        owners[f"broker/broker_url.{tool}"] = (uid, 10001)
    for rel, (uid, gid) in owners.items():
        os.chown(sec / rel, uid, gid)
        (sec / rel).chmod(0o400)
    os.chown(keys / "checkpoint.skey", 10001, 10001)  # the control's
    (keys / "checkpoint.skey").chmod(0o400)
    for key in (keys / "private").iterdir():
        owner = key.name.split("_", 1)[0] if key.name.startswith("control") else key.name
        uid = 10001
        for tool, tuid in TOOL_UIDS.items():
            if owner.startswith(f"tool.{tool}_"):
                uid = tuid
        os.chown(key, uid, 10001)
        key.chmod(0o400)
    (keys / "index.json").chmod(0o444)
    (sec / "api" / "tls.crt").chmod(0o444)
    return variables


def _tls(directory: Path) -> None:
    """A CA and the API's certificate for control, localhost and 127.0.0.1."""
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toolplane test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("control"), x509.DNSName("localhost")]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "control")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.crt").write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    (directory / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _add_probe(compose: Compose, work: Path) -> None:
    data = compose.data
    probe = copy.deepcopy(data["services"]["worker-lint_python"])
    uid = TOOL_UIDS[PROBE]
    probe["user"] = f"{uid}:10001"
    probe["command"] = [PROBE, "--concurrency", "1"]
    probe["environment"]["TOOLPLANE_EXTRA_TOOLS"] = PROBE_MODULE
    probe["tmpfs"] = [t.replace("uid=10103", f"uid={uid}") for t in probe["tmpfs"]]
    key_file = next(
        p.name
        for p in (work / "keys-home/keys/private").iterdir()
        if p.name.startswith(f"tool.{PROBE}_")
    )
    probe["secrets"] = [
        {"source": f"broker_url_{PROBE}", "target": "/run/secrets/env/TOOLPLANE_BROKER_URL"},
        {"source": "keys_index", "target": "/var/lib/toolplane/keys/index.json"},
        {"source": f"key_{PROBE}", "target": f"/var/lib/toolplane/keys/private/{key_file}"},
    ]
    module = Path(__file__).with_name("probe_tool.py")
    probe["volumes"] = [
        {
            "type": "bind",
            "source": str(module),
            "target": f"{SITE}/{PROBE_MODULE}.py",
            "read_only": True,
        }
    ]
    data["services"][f"worker-{PROBE}"] = probe
    data["secrets"][f"broker_url_{PROBE}"] = {"file": f"./secrets/broker/broker_url.{PROBE}"}
    data["secrets"][f"key_{PROBE}"] = {"file": str(work / "keys-home/keys/private" / key_file)}
    policy = work / "policy"
    shutil.copytree(REPO / "policy/bundles/default", policy)
    shutil.rmtree(policy / "tests", ignore_errors=True)
    (policy / "container-probe.cedar").write_text(PROBE_POLICY)
    control = data["services"]["control"]
    control["environment"]["TOOLPLANE_POLICY_DIR"] = "/app/policy-probe"
    control.setdefault("volumes", []).append(
        {"type": "bind", "source": str(policy), "target": "/app/policy-probe", "read_only": True}
    )


def prepare(work: Path, project: str) -> Stack:
    """Secrets and the compose model; nothing started yet."""
    docker = work / "docker"
    docker.mkdir(parents=True)
    for part in ("compose.yaml", "seccomp", "postgres"):
        src = REPO / "docker" / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, docker / part)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOOLPLANE_", "CELERY_"))}
    env |= {
        "TOOLPLANE_HOME": str(work / "keys-home"),
        "TOOLPLANE_EXTRA_TOOLS": "tests.containers.probe_tool",
        "TOOLPLANE_BROKER_URL": "redis://127.0.0.1:1/0",
        "PYTHONPATH": str(REPO),
    }
    variables = _secrets(work, env)
    api_port, flower_port = free_port(), free_port()
    compose_env = {
        **variables,
        "TOOLPLANE_API_HOST_PORT": str(api_port),
        "TOOLPLANE_DOCS_DIR": str(REPO / "examples/docs"),
        "TOOLPLANE_REPO_DIR": str(REPO / "examples/repo"),
    }
    compose = load(docker / "compose.yaml", project=project, env=compose_env)
    compose.data["services"]["flower"]["ports"] = [f"127.0.0.1:{flower_port}:5555"]
    compose.images = {
        "redis": "toolplane-standin-redis:latest",
        "postgres": "toolplane-standin-postgres:latest",
    }
    _add_probe(compose, work)
    return Stack(
        compose=compose,
        work=work,
        api_url=f"https://127.0.0.1:{api_port}",
        ca_bundle=docker / "secrets/api/ca.crt",
    )


def down(project: str) -> None:
    """Every container, network and volume of ``project`` (leftovers of a crashed run too)."""
    names = podman(
        "ps",
        "-a",
        "--filter",
        f"label=toolplane.test.project={project}",
        "--format",
        "{{.Names}}",
        check=False,
    ).stdout.split()
    if names:
        podman("rm", "-f", "-t", "5", *names, check=False, timeout=120)
    for net in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        if net.startswith(f"{project}-"):
            podman("network", "rm", "-f", net, check=False)
    for vol in podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        if vol.startswith(f"{project}_"):
            podman("volume", "rm", "-f", vol, check=False)


def _order(compose: Compose) -> list[str]:
    done: list[str] = []

    def visit(name: str) -> None:
        if name not in done:
            for dep in compose.services[name].depends_on:
                visit(dep)
            done.append(name)

    for name in compose.services:
        visit(name)
    return done


def up(stack: Stack, *, timeout: float = 300) -> None:
    """Networks, then every service in dependency order, each waited for as compose would."""
    compose = stack.compose
    t0 = time.monotonic()
    for net in compose.network_args():
        podman(*net)
    for name in _order(compose):
        for dep, cond in compose.services[name].depends_on.items():
            _wait_condition(stack, dep, cond, timeout)
        stack.start(name)
    for name in compose.services:
        if name != "migrate":
            _wait_condition(stack, name, "service_healthy", timeout)
    stack.timings["start_to_healthy_s"] = time.monotonic() - t0
    _approve_tools(stack, timeout)
    created = json.loads(stack.one_off("migrate", "tenant", "create", "acme", "--json"))
    stack.token = created["token"]
    stack.timings["start_to_ready_s"] = time.monotonic() - t0


def _wait_condition(stack: Stack, service: str, condition: str, timeout: float) -> None:
    container = stack.compose.container(service)
    if condition == "service_completed_successfully":
        code = podman("wait", container, timeout=timeout).stdout.strip()
        if code != "0":
            raise StackError(f"{service} exited {code}:\n{stack.logs(container)}")
        return
    if condition == "service_healthy":

        def ok() -> bool:
            state = stack.inspect(container)["State"]
            if not state["Running"]:
                raise StackError(
                    f"{service} stopped ({state['ExitCode']}):\n{stack.logs(container)}"
                )
            return stack.healthy(container)

        try:
            wait_for(f"{service} healthy", ok, timeout, every=1.0)
        except StackError as e:
            raise StackError(f"{e}\n{stack.logs(container)}") from e


def _approve_tools(stack: Stack, timeout: float) -> None:
    """Once each worker announced its manifest: `migrate tools approve NAME VERSION`."""
    wanted = {s.removeprefix("worker-") for s in stack.compose.services if s.startswith("worker-")}
    listed: list[dict[str, Any]] = []

    def announced() -> bool:
        nonlocal listed
        listed = json.loads(stack.one_off("migrate", "tools", "list", "--json"))
        return wanted <= {t["tool"] for t in listed if t["held"] or t["approved_sha256"]}

    wait_for("every tool announced", announced, timeout, every=2.0)
    for tool in listed:
        if tool["tool"] in wanted and not tool["approved_sha256"]:
            held = tool["held"][0]
            stack.one_off(
                "migrate",
                "tools",
                "approve",
                tool["tool"],
                held["version"],
                "--sha256",
                held["manifest_sha256"],
            )
