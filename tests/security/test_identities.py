"""A worker, and a tool that gets out of its sandbox into it, holds nothing of the control's.

`toolplane up --detach` starts everything as it does on a fresh host (embedded Redis 7 and
PostgreSQL under HOME), with decoy secrets in its own environment, and a worker for
`escapee` (tests/escape_tools.py: a tool whose calls run in a plain fork of the worker, as
code that escaped bubblewrap or a plugin's import-time code would) and one for
`lint_python`. Through the API, the escaped tool then tries to read every file under HOME
(it is told every name: it need not list anything), the control's private key, the
control's and the servers' /proc/<pid>/environ, the embedded Redis's passwords and ACL
file, the database URL in embedded.json, and the other tool's receipt keys; and it lists
what it may. The test asserts on the errno the tool saw. It also reads each worker's
/proc/<pid>/environ and status itself.

As root, each tool's workers run as a user of their own and the OS refuses all of it. Not
as root they run as the control's user: only the environment is checked then (the OS
keeps nothing apart: docs/deployment.md), and the rest is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from control.broker import acl as brokeracl
from control.client import Client
from control.ops.processes import WORKER_BASE_ENV
from tests.harness import REPO, Services, make_env
from tests.stackdirs import reachable

pytestmark = pytest.mark.integration

ROOT = os.geteuid() == 0
DECOYS = {  # what an operator's shell may hold; no worker may get any of it
    "DATABASE_URL": "postgresql://app:tp-decoy-db@db.internal/app",
    "PGPASSWORD": "tp-decoy-pgpassword",
    "AWS_SECRET_ACCESS_KEY": "tp-decoy-aws",
    "REDIS_URL": "redis://:tp-decoy-redis@cache.internal/0",
    "TOOLPLANE_TOKEN": "tp-decoy-token",
    "TOOLPLANE_FLOWER_PASSWORD": "tp-decoy-flower",
}
WORKER_SETTINGS = {
    "HOME",
    "USER",
    "LOGNAME",
    "TOOLPLANE_HOME",
    "TOOLPLANE_BROKER_URL",
    "TOOLPLANE_REPO_ROOT",
    "TOOLPLANE_DOCS_ROOT",
    "TOOLPLANE_DATA_ROOTS",
    "TOOLPLANE_EXTRA_TOOLS",
    "TOOLPLANE_SANDBOX_WARM_RUNNERS",
    "TOOLPLANE_RECEIPT_ALGORITHM",
    "TOOLPLANE_VISIBILITY_TIMEOUT",
    "TOOLPLANE_LOG_FORMAT",
    "TOOLPLANE_QUEUE_WAIT_S",
    "TP_TEST_EGRESS",  # named by the harness's TOOLPLANE_WORKER_ENV
}


@dataclass
class Up:
    home: Path
    env: dict[str, str]
    token: str

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "control.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def pid(self, name: str) -> int:
        for entry in json.loads((self.home / "run" / "processes.json").read_text()):
            if entry["name"] == name:
                return int(entry["pid"])
        raise KeyError(name)

    def server_pid(self, name: str) -> int:
        return int(json.loads((self.home / "embedded.json").read_text())[name]["pid"])

    def escapee(self, action: str, paths: list[str]) -> dict[str, Any]:
        with Client(self.env["TOOLPLANE_URL"], token=self.token) as client:
            run = client.call("escapee", {"action": action, "paths": paths}, wait=True, timeout=90)
        node = run.nodes[0]
        assert node.status == "completed", (node.status, node.error)
        assert node.receipt is not None and node.receipt["key_id"].startswith("tool.escapee:")
        return dict(node.result)


@pytest.fixture(scope="module")
def up(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    base = tmp_path_factory.mktemp("identities")
    env = make_env(services, base / "data")  # policy and repository beside HOME, not in it
    home = reachable(services, base / "home").resolve()  # the path the workers see
    for name in ("TOOLPLANE_BROKER_URL", "TOOLPLANE_DATABASE_URL"):
        env.pop(name)  # embedded servers, as `toolplane up` starts them on a fresh host
    env.update(DECOYS, TOOLPLANE_HOME=str(home), TOOLPLANE_EXTRA_TOOLS="tests.escape_tools")
    stack = Up(home=home, env=env, token="")
    workers = "escapee=1,lint_python=1,read_repo_file=0,search_docs=0"
    started = stack.cli("up", "--detach", "--workers", workers)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "Redis 7" in started.stdout, started.stdout
        assert ("run as their own users" in started.stdout) == ROOT, started.stdout
        created = stack.cli("tenant", "create", "identities", "--json")
        assert created.returncode == 0, created.stderr
        stack.token = json.loads(created.stdout)["token"]
        yield stack
    finally:
        stack.cli("down")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def ids(pid: int) -> tuple[int, int, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status}
    return int(field["Uid"][1]), int(field["Gid"][1]), [int(g) for g in field["Groups"]]


def control_secrets(up: Up) -> dict[str, str]:
    """Every secret the control holds: its environment's URLs and token, every broker
    password (admin, control, Flower and each tool's), and the decoys."""
    found = dict(DECOYS)
    control = environ(up.pid("control"))
    found["control's TOOLPLANE_DATABASE_URL"] = control["TOOLPLANE_DATABASE_URL"]
    found["control's TOOLPLANE_BROKER_URL"] = control["TOOLPLANE_BROKER_URL"]
    users = json.loads((up.home / "redis" / "users.json").read_text())
    found.update({f"broker password of {user}": pw for user, pw in users.items()})
    return found


def test_workers_run_as_users_of_their_own_with_only_their_own_settings(up: Up) -> None:
    control_uid = ids(up.pid("control"))[0]
    users = json.loads((up.home / "redis" / "users.json").read_text())
    seen_uids = set()
    for tool in ("escapee", "lint_python"):
        main = psutil.Process(up.pid(f"worker-{tool}"))
        for process in [main, *main.children()]:  # the worker and its pool
            env = environ(process.pid)
            allowed = WORKER_SETTINGS | set(WORKER_BASE_ENV)
            assert all(k in allowed or k.startswith("LC_") for k in env), set(env) - allowed
            values = "\n".join(env.values())
            for what, secret in control_secrets(up).items():
                if what == f"broker password of {brokeracl.tool_user(tool)}":
                    continue  # its own
                assert secret not in values, f"{tool}'s worker holds {what}"
            assert "postgresql" not in values and "toolplane-control" not in values
            assert env["TOOLPLANE_HOME"] == env["HOME"] == str(up.home / "workers" / tool)
            own = f"redis://{brokeracl.tool_user(tool)}:{users[brokeracl.tool_user(tool)]}@"
            assert env["TOOLPLANE_BROKER_URL"].startswith(own), tool
            uid, gid, groups = ids(process.pid)
            if ROOT:
                assert uid != control_uid and uid != 0 and gid != 0 and groups == [], tool
                assert env["USER"] == f"toolplane-{tool}"
            seen_uids.add(uid)
    assert len(seen_uids) == (2 if ROOT else 1)  # a user per tool: neither reads the other's key


def under_home(up: Up) -> tuple[list[str], list[str]]:
    """Every file, and every directory (HOME too), under HOME but the tool's own directory."""
    own = up.home / "workers" / "escapee"
    files, dirs = [], [str(up.home)]
    for parent, subdirs, names in os.walk(up.home):
        for name, into in [*((d, dirs) for d in subdirs), *((f, files) for f in names)]:
            path = Path(parent) / name
            if path != own and own not in path.parents:
                into.append(str(path))
    return files, dirs


@pytest.mark.skipif(not ROOT, reason="not root: workers run as the control's user")
def test_an_escaped_tool_is_refused_every_file_of_the_control_and_of_other_tools(up: Up) -> None:
    files, dirs = under_home(up)
    private = up.home / "keys" / "private"
    control_key = next(p for p in private.iterdir() if p.name.startswith("control_"))
    for must in (
        control_key,
        up.home / "keys" / "index.json",
        up.home / "redis" / "users.json",  # every broker user's password, the admin's too
        up.home / "redis" / "users.acl",
        up.home / "embedded.json",  # the database URL and the control's broker URL
    ):
        assert str(must) in files, must
    others = [f for f in files if "tool.lint_python_" in Path(f).name]
    assert len(others) == 2, others  # in the control's key store and in its worker's directory
    seen = up.escapee("read", files)
    assert seen["uid"] != 0
    read = sorted(path for path, got in seen["seen"].items() if "errno" not in got)
    assert read == [], f"the escaped tool read {read}"
    for path, got in seen["seen"].items():
        gone = got["errno"] == "ENOENT" and not Path(path).exists()  # a temporary file
        assert got["errno"] == "EACCES" or gone, (path, got)
    listed = up.escapee("list", dirs)["seen"]
    shown = sorted(path for path, got in listed.items() if "errno" not in got)
    assert shown == [], f"the escaped tool listed {shown}"
    assert all(got["errno"] in ("EACCES", "ENOENT") for got in listed.values()), listed


@pytest.mark.skipif(not ROOT, reason="not root: workers run as the control's user")
def test_an_escaped_tool_reads_no_other_process_environment(up: Up) -> None:
    others = {
        "control": up.pid("control"),
        "lint_python's worker": up.pid("worker-lint_python"),
        "redis": up.server_pid("redis"),
        "postgres": up.server_pid("postgres"),
    }
    seen = up.escapee("read", [f"/proc/{pid}/environ" for pid in others.values()])["seen"]
    for name, pid in others.items():
        assert seen[f"/proc/{pid}/environ"]["errno"] == "EACCES", (name, seen)


def test_an_escaped_tool_holds_its_own_key_and_a_worker_environment_without_secrets(
    up: Up,
) -> None:
    """The other side of the refusals above: the tool does run with the worker's rights."""
    own = up.home / "workers" / "escapee" / "keys"
    keys = sorted((own / "private").iterdir())
    assert [k.name.startswith("tool.escapee_") for k in keys] == [True]
    index = json.loads((own / "index.json").read_text())["keys"]
    assert {e["owner"] for e in index} == {"control", "tool.escapee"}
    seen = up.escapee("read", [str(keys[0]), str(own / "index.json"), "/proc/{worker}/environ"])
    got = seen["seen"]
    assert got[str(keys[0])]["read"] > 0, got  # its own receipt key, and nothing more
    assert "tool.lint_python" not in got[str(own / "index.json")]["text"]
    # The worker is not dumpable (its memory holds the receipt key): not even a fork of it,
    # running as its user, opens its /proc entries. What its environment holds is checked
    # from outside (test_workers_run_as_users_of_their_own_with_only_their_own_settings).
    assert got["/proc/{worker}/environ"]["errno"] == "EACCES", got["/proc/{worker}/environ"]
