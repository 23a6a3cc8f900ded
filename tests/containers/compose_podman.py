"""compose.yaml as `podman run` commands, every key of every service accounted for.

podman-compose 1.0.3 silently drops ``ipc``, ``pids_limit``, ``memswap_limit`` and
``depends_on`` conditions, so the tests translate docker/compose.yaml themselves: each
service key is either turned into podman flags (``HARDENING`` and ``PLUMBING``), or
handled by the stack (``depends_on``: start order and conditions; ``healthcheck``: the
container's health command, run by the stack since podman without systemd does not
schedule it), or ignored for a stated reason (``build``: `make images` builds). A key in
none of these fails the translation, so nothing of compose.yaml is dropped in silence.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Compose", "ComposeError", "Service", "load"]

# Keys that harden a container; tests/containers/test_hardening.py checks each in
# `podman inspect` of the running containers.
HARDENING = {
    "read_only",
    "cap_drop",
    "security_opt",
    "ipc",
    "pids_limit",
    "mem_limit",
    "memswap_limit",
    "cpus",
    "ulimits",
    "user",
    "tmpfs",
    "networks",
}
PLUMBING = {
    "image",
    "entrypoint",
    "command",
    "environment",
    "volumes",
    "secrets",
    "ports",
    "restart",
    "stop_grace_period",
}
BY_STACK = {"depends_on", "healthcheck"}
IGNORED = {"build": "images come from `make images` (docker/images.sh)"}
# Every container gets these with any --ulimit: this kind of VM cannot raise
# RLIMIT_NOFILE above 20000 nor RLIMIT_NPROC above 32768 (containers.conf has them
# as defaults, which an explicit --ulimit replaces).
DEFAULT_ULIMITS = ("nofile=20000:20000", "nproc=32768:32768")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


class ComposeError(Exception):
    """compose.yaml holds something this translation cannot honour (service and key)."""


@dataclass(frozen=True)
class Service:
    name: str
    spec: dict[str, Any]

    @property
    def depends_on(self) -> dict[str, str]:
        deps = self.spec.get("depends_on") or {}
        if isinstance(deps, list):
            return dict.fromkeys(deps, "service_started")
        return {name: cond.get("condition", "service_started") for name, cond in deps.items()}

    @property
    def networks(self) -> list[str]:
        nets = self.spec.get("networks") or []
        return list(nets) if isinstance(nets, list) else list(nets.keys())


@dataclass
class Compose:
    directory: Path
    project: str
    data: dict[str, Any]
    images: dict[str, str] = field(default_factory=dict)  # service -> image to use instead

    @property
    def services(self) -> dict[str, Service]:
        """The default services: as `docker compose up` without --profile, none that has
        profiles (docker/compose.yaml's `observability`)."""
        return {n: Service(n, s) for n, s in self.data["services"].items() if not s.get("profiles")}

    def network_name(self, net: str) -> str:
        spec = self.data.get("networks", {}).get(net) or {}
        return f"{self.project}-{spec.get('name', net)}"

    def volume_name(self, vol: str) -> str:
        return f"{self.project}_{vol}"

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.project}-{service}-{index}"

    def network_args(self) -> list[list[str]]:
        """`podman network create` argument lists, one per network."""
        out = []
        used = {net for svc in self.services.values() for net in svc.networks}
        for net, spec in (self.data.get("networks") or {}).items():
            if net not in used:  # only a profile's services are on it
                continue
            args = ["network", "create"]
            if (spec or {}).get("internal"):
                args.append("--internal")
            out.append([*args, self.network_name(net)])
        return out

    def _path(self, source: str) -> Path:
        path = Path(source)
        return path if path.is_absolute() else (self.directory / path).resolve()

    def run_args(
        self,
        name: str,
        *,
        index: int = 1,
        command: list[str] | None = None,
        container: str | None = None,
    ) -> list[str]:
        """`podman run -d ...` for one container of service ``name`` (``command``: instead
        of the service's, as `compose run SERVICE COMMAND`)."""
        svc = self.services[name]
        s = svc.spec
        unknown = set(s) - HARDENING - PLUMBING - BY_STACK - set(IGNORED)
        if unknown:
            raise ComposeError(f"services.{name}: keys not translated: {sorted(unknown)}")
        container = container or self.container(name, index)
        a = ["run", "-d", "--name", container, "--network-alias", name]
        a += ["--label", f"toolplane.test.project={self.project}", "--label", f"service={name}"]
        # Docker's --read-only; podman would add writable tmpfs on /run, /tmp, /var/tmp.
        read_only = str(bool(s.get("read_only"))).lower()
        a += [f"--read-only={read_only}", "--read-only-tmpfs=false"]
        for cap in s.get("cap_drop") or []:
            a += ["--cap-drop", cap]
        for opt in s.get("security_opt") or []:
            if opt.startswith("seccomp="):
                opt = f"seccomp={self._path(opt.split('=', 1)[1])}"
            elif opt in {"no-new-privileges:true", "no-new-privileges"}:
                opt = "no-new-privileges"
            else:
                raise ComposeError(f"services.{name}.security_opt: {opt!r} not translated")
            a += ["--security-opt", opt]
        if "ipc" in s:
            a += ["--ipc", s["ipc"]]
        if "pids_limit" in s:
            a += ["--pids-limit", str(s["pids_limit"])]
        if "mem_limit" in s:
            a += ["--memory", str(s["mem_limit"])]
        if "memswap_limit" in s:
            a += ["--memory-swap", str(s["memswap_limit"])]
        if "cpus" in s:
            a += ["--cpus", str(s["cpus"])]
        if s.get("ulimits"):
            for limit, value in s["ulimits"].items():
                if isinstance(value, dict):
                    value = f"{value['soft']}:{value['hard']}"
                a += ["--ulimit", f"{limit}={value}"]
            for default in DEFAULT_ULIMITS:
                if default.split("=")[0] not in s["ulimits"]:
                    a += ["--ulimit", default]
        if "user" in s:
            a += ["--user", str(s["user"])]
        for mount in s.get("tmpfs") or []:
            a += ["--tmpfs", self._tmpfs(name, mount, str(s.get("user", "")))]
        nets = svc.networks
        for net in nets:
            a += ["--network", self.network_name(net)]
        if not nets:
            a += ["--network", "none"]
        for key, value in (s.get("environment") or {}).items():
            a += ["-e", f"{key}={value}"]
        for vol in s.get("volumes") or []:
            a += ["-v", self._volume(name, vol)]
        for secret in s.get("secrets") or []:
            a += ["-v", self._secret(name, secret)]
        for port in s.get("ports") or []:
            a += ["-p", str(port)]
        restart = s.get("restart", "no")
        a += ["--restart", "no" if restart == "no" else restart]
        if "stop_grace_period" in s:
            a += ["--stop-timeout", str(int(str(s["stop_grace_period"]).rstrip("s")))]
        a += self._health(name, s.get("healthcheck"))
        if "entrypoint" in s:
            a += ["--entrypoint", json.dumps(s["entrypoint"])]
        a.append(self.images.get(name, s["image"]))
        if command is None:
            command = s.get("command") or []
            command = command if isinstance(command, list) else command.split()
        a += command
        return a

    def _volume(self, name: str, vol: str | dict[str, Any]) -> str:
        if isinstance(vol, str):
            parts = vol.split(":")
            source, target, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
            kind = "bind" if source.startswith((".", "/")) else "volume"
            vol = {"type": kind, "source": source, "target": target, "read_only": mode == "ro"}
        if vol["type"] == "volume":
            source = self.volume_name(vol["source"])
        elif vol["type"] == "bind":
            source = str(self._path(vol["source"]))
            if not Path(source).exists():
                raise ComposeError(f"services.{name}.volumes: {source} does not exist")
        else:
            raise ComposeError(f"services.{name}.volumes: type {vol['type']!r} not translated")
        return f"{source}:{vol['target']}:{'ro' if vol.get('read_only') else 'rw'}"

    def _tmpfs(self, name: str, mount: str, user: str) -> str:
        """podman 4.3 takes no uid=/gid= for a tmpfs: U (owned by the container's user)
        stands for them when they name that user, and nothing else is accepted."""
        path, _, opts = mount.partition(":")
        kept, owner = [], {}
        for opt in filter(None, opts.split(",")):
            key, _, value = opt.partition("=")
            if key in {"uid", "gid"}:
                owner[key] = value
            else:
                kept.append(opt)
        if owner:
            uid, _, gid = user.partition(":")
            if owner != {"uid": uid, "gid": gid or owner.get("gid", "")}:
                raise ComposeError(f"services.{name}.tmpfs: {mount}: owner is not the user {user}")
            kept.append("U")
        return f"{path}:{','.join(kept)}" if kept else path

    def _secret(self, name: str, secret: str | dict[str, Any]) -> str:
        if isinstance(secret, str):
            secret = {"source": secret}
        source = secret["source"]
        target = secret.get("target", f"/run/secrets/{source}")
        if not target.startswith("/"):
            target = f"/run/secrets/{target}"
        spec = self.data["secrets"][source]
        path = self._path(spec["file"])
        if not path.is_file():
            raise ComposeError(f"services.{name}.secrets: {source}: {path} is not a file")
        return f"{path}:{target}:ro"

    def _health(self, name: str, check: dict[str, Any] | None) -> list[str]:
        if not check:
            return []
        test = check["test"]
        if test[0] == "CMD-SHELL":
            cmd = test[1]
        elif test[0] == "CMD":
            cmd = json.dumps(test[1:])
        else:
            raise ComposeError(f"services.{name}.healthcheck.test: {test[0]!r} not translated")
        out = ["--health-cmd", cmd]
        if "retries" in check:
            out += ["--health-retries", str(check["retries"])]
        if "timeout" in check:
            out += ["--health-timeout", check["timeout"]]
        return out


def _interpolate(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if value:
            return value
        if op == ":-":
            return arg
        if op == ":?":
            raise ComposeError(f"${{{name}}}: {arg}")
        return ""

    return VAR.sub(one, text)


def load(path: Path, *, project: str, env: dict[str, str] | None = None) -> Compose:
    """compose.yaml with ${VAR} interpolated from ``env`` (and the .env beside it)."""
    values: dict[str, str] = {}
    dotenv = path.parent / ".env"
    if dotenv.is_file():
        for line in dotenv.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    values.update(os.environ if env is None else env)
    data = yaml.safe_load(_interpolate(path.read_text(), values))
    return Compose(directory=path.parent.resolve(), project=project, data=data)
