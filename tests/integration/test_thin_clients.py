"""Callers hold the API's URL and a token, nothing else: every user command of the CLI and
every method of the Python clients, run from a process whose environment has only
TOOLPLANE_URL and TOOLPLANE_TOKEN (no database or broker URL, no key files), against the
real stack. And the same governance a caller cannot step around from its side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import REPO, Stack

pytestmark = pytest.mark.integration


def caller_env(stack: Stack, token: str, home: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TOOLPLANE_URL": stack.url,
        "TOOLPLANE_TOKEN": token,
        **extra,
    }
    assert not any(k.endswith(("DATABASE_URL", "BROKER_URL", "REDIS_URL")) for k in env)
    return env


def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def issue(stack: Stack, admin: str, principal: str, role: str) -> str:
    with httpx.Client(base_url=stack.url) as http:
        done = http.post(
            "/v1/tokens",
            json={"principal": principal, "role": role},
            headers={"Authorization": f"Bearer {admin}"},
        )
    assert done.status_code == 201, done.text
    return str(done.json()["token"])


def test_every_user_command_with_only_url_and_token(stack: Stack, tmp_path: Path) -> None:
    admin = stack.tenant()
    approver = issue(stack, admin, "cli-approver", "approver")
    submitter = issue(stack, admin, "cli-agent", "submitter")
    as_admin = caller_env(stack, admin, tmp_path)
    as_submitter = caller_env(stack, submitter, tmp_path)
    as_approver = caller_env(stack, approver, tmp_path)

    def ok(env: dict[str, str], *args: str, code: int = 0) -> Any:
        done = cli(env, tmp_path, *args, "--json")
        assert done.returncode == code, (args, done.stdout, done.stderr)
        return json.loads(done.stdout) if done.stdout.strip() else None

    called = ok(as_submitter, "call", "search_docs", "--arg", "query=ledger", "--wait")
    assert called["status"] == "completed" and called["nodes"][0]["receipt"]["key_id"]
    run = ok(
        as_submitter,
        "submit",
        "repo-review",
        "--input",
        "query=receipts",
        "--input",
        "path=src/shipit/deploy.py",
        "--wait",
    )
    assert run["status"] == "completed" and len(run["nodes"]) == 3
    shown = ok(as_submitter, "runs", "show", run["run_id"])
    assert shown["run_id"] == run["run_id"]
    assert run["run_id"] in [r["run_id"] for r in ok(as_admin, "runs", "list")]
    held = ok(
        as_submitter,
        "call",
        "read_repo_file",
        "--arg",
        "path=README.md",
        "--env",
        "prod",
        code=5,
    )
    assert [r["run_id"] for r in ok(as_admin, "runs", "list", "--awaiting-approval")] == [
        held["run_id"]
    ]
    decided = ok(as_approver, "approve", held["run_id"], "read_repo_file", "--reason", "fine")
    assert decided["approval"]["status"] == "granted"
    held_again = ok(
        as_submitter,
        "call",
        "read_repo_file",
        "--arg",
        "path=pyproject.toml",
        "--env",
        "prod",
        code=5,
    )
    rejected = ok(
        as_approver, "reject", held_again["run_id"], "read_repo_file", "--reason", "no", code=3
    )
    assert rejected["run"]["status"] == "denied"
    slow = ok(as_submitter, "call", "sleepy", "--arg", "seconds=3")
    cancelled = ok(as_submitter, "runs", "cancel", slow["run_id"], "--reason", "enough")
    assert cancelled["status"] == "cancelled"
    issued = ok(as_admin, "token", "issue", "--principal", "another", "--role", "auditor")
    assert issued["token"].startswith("tp_")
    listed = ok(as_admin, "token", "list")
    assert issued["token_id"] in [t["token_id"] for t in listed]
    revoked = ok(as_admin, "token", "revoke", issued["token_id"])
    assert revoked == {"token_id": issued["token_id"], "revoked": True}
    explained = ok(
        as_submitter, "policy", "explain", "--tool", "read_repo_file", "--arg", "path=.env", code=3
    )
    assert "no-secret-files" in explained["policies"]
    status = ok(as_submitter, "policy", "status")
    assert status["environment"] == "dev" and status["version"]
    assert ok(as_admin, "policy", "freeze", "--reason", "drill")["frozen"]
    assert ok(as_admin, "policy", "unfreeze", "--reason", "drill over")["unfrozen"]
    verified = ok(as_admin, "ledger", "verify")
    assert verified["ok"] and verified["receipts_verified"] >= 4
    assert ok(as_admin, "ledger", "verify", "--run", run["run_id"])["ok"]
    workflows = ok(as_submitter, "workflows", "list")
    assert "repo-review" in [w["name"] for w in workflows]


PYTHON_CALLER = textwrap.dedent(
    """
    import asyncio, inspect, json, sys
    from control.client import AsyncClient, Client

    called = set()

    def track(client):
        for name, member in inspect.getmembers(type(client), inspect.isfunction):
            if name.startswith("_") or name.startswith("r_"):
                continue
            def wrap(fn, name=name):
                if inspect.iscoroutinefunction(fn):
                    async def inner(*a, **k):
                        called.add(type(client).__name__ + "." + name)
                        return await fn(*a, **k)
                else:
                    def inner(*a, **k):
                        called.add(type(client).__name__ + "." + name)
                        return fn(*a, **k)
                return inner
            setattr(client, name, wrap(getattr(client, name)))
        return client

    approver_token, submitter_token = sys.argv[1], sys.argv[2]
    url = Client.from_env().settings.url
    sub = Client(url, token=submitter_token)  # an admin's own call is approved by nobody it
                                              # issued a token to
    with track(Client.from_env()) as c:
        run_id = c.submit("search_docs", {"query": "receipts"})
        assert c.wait(run_id, timeout=60).status == "completed"
        assert c.call("search_docs", {"query": "x"}, wait=True).status == "completed"
        batch = c.call_many([{"tool": "search_docs", "args": {"query": "a"}},
                             {"tool": "read_repo_file", "args": {"path": ".env"}}])
        assert [r.status for r in batch][1] == "denied"
        seen = []
        wf = c.run_workflow("repo-review", {"query": "q", "path": "src/shipit/deploy.py"},
                            wait=True, on_progress=lambda *e: seen.append(e))
        assert wf.status == "completed" and len(seen) >= 6, seen
        wf_id = c.submit_workflow("repo-review", {"query": "q", "path": "src/shipit/deploy.py"})
        assert c.wait_all([wf_id, run_id], timeout=60)[wf_id] == "completed"
        assert c.run(wf_id).run_id == wf_id
        assert wf_id in [r.run_id for r in c.runs(limit=100)]
        assert c.runs_page(limit=1).next_cursor
        kinds = [e.kind for e in c.evidence(wf_id)]
        assert "RunSubmitted" in kinds and "RunCompleted" in kinds
        held = sub.call("read_repo_file", {"path": "README.md"}, environment="prod")
        waiting = []
        assert c.wait(held.run_id, timeout=0.5, on_waiting=waiting.append).status == (
            "awaiting_approval")
        assert waiting and waiting[0][0]["node_id"] == "read_repo_file"
        held2 = sub.call("read_repo_file", {"path": "pyproject.toml"}, environment="prod")
        slow = c.call("sleepy", {"seconds": 3})
        assert c.cancel(slow.run_id, reason="enough").status == "cancelled"
        issued = c.issue_token("py-auditor", "auditor")
        assert issued.token_id in [t.token_id for t in c.tokens()]
        c.revoke_token(issued.token_id)
        assert c.freeze(reason="drill")[0].scope == "tenant"
        assert c.freezes()
        assert c.unfreeze(reason="over") == []
        assert c.policy().version
        assert c.explain("read_repo_file", {"path": ".env"})["decision"] == "deny"
        assert {"search_docs", "read_repo_file", "lint_python"} <= {t.tool for t in c.tools()}
        assert "repo-review" in [w.name for w in c.workflows()]
        assert c.verify_ledger().ok and c.verify_ledger(run_id=wf_id).ok
        assert json.loads(c.export_bundle(wf_id))["run_id"] == wf_id
    with track(Client.from_env(token=None)) as anon:  # close() tracked by the with
        pass
    with track(Client(Client.from_env().settings.url, token=approver_token)) as a:
        assert a.approve(held.run_id, "read_repo_file", reason="ok").status == "granted"
        assert a.reject(held2.run_id, "read_repo_file", reason="no").run.status == "denied"
        assert a.wait(held.run_id, timeout=60).status == "completed"

    async def main():
        async with track(AsyncClient.from_env()) as ac:
            assert (await ac.call("search_docs", {"query": "a"}, wait=True)).status == "completed"
            rid = await ac.submit("search_docs", {"query": "b"})
            assert (await ac.wait(rid, timeout=60)).status == "completed"
            assert (await ac.run(rid)).run_id == rid
            assert rid in [r.run_id for r in await ac.runs()]
            assert len(await ac.call_many([{"tool": "search_docs", "args": {"query": "c"}}])) == 1
            wf = await ac.run_workflow("repo-review", {"query": "q", "path": "src/shipit/deploy.py"},
                                       wait=True)
            assert wf.status == "completed"
            async with AsyncClient(url, token=submitter_token) as asub:
                h = await asub.call("read_repo_file", {"path": "README.md"}, environment="prod")
                h2 = await asub.call("read_repo_file", {"path": "pyproject.toml"},
                                     environment="prod")
            s = await ac.call("sleepy", {"seconds": 3})
            assert (await ac.cancel(s.run_id)).status == "cancelled"
            assert (await ac.verify_ledger()).ok
            assert json.loads(await ac.export_bundle(rid))["run_id"] == rid
        async with track(AsyncClient(token=approver_token,
                                     url=Client.from_env().settings.url)) as aa:
            assert (await aa.approve(h.run_id, "read_repo_file")).status == "granted"
            assert (await aa.reject(h2.run_id, "read_repo_file", reason="no")).status == "rejected"
    asyncio.run(main())
    print(json.dumps(sorted(called)))
    """
)


def test_every_client_method_with_only_url_and_token(stack: Stack, tmp_path: Path) -> None:
    from control.client import AsyncClient, Client

    admin = stack.tenant()
    approver = issue(stack, admin, "py-approver", "approver")
    submitter = issue(stack, admin, "py-agent", "submitter")
    script = tmp_path / "caller.py"
    script.write_text(PYTHON_CALLER)
    done = subprocess.run(
        [sys.executable, str(script), approver, submitter],
        env=caller_env(stack, admin, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    called = set(json.loads(done.stdout.splitlines()[-1]))
    public = {
        f"{cls.__name__}.{name}"
        for cls in (Client, AsyncClient)
        for name in dir(cls)
        if not name.startswith(("_", "r_")) and callable(getattr(cls, name))
    } - {"Client.from_env", "AsyncClient.from_env"}
    assert public - called == set(), f"methods not exercised: {sorted(public - called)}"


def test_a_callers_own_policy_directory_changes_nothing(stack: Stack, tmp_path: Path) -> None:
    """A bundle of the caller's that permits everything has no effect: the control decides."""
    mine = tmp_path / "mybundle"
    shutil.copytree(REPO / "policy" / "bundles" / "default", mine)
    for cedar in mine.glob("*.cedar"):
        cedar.unlink()
    (mine / "all.cedar").write_text("permit (principal, action, resource);\n")
    env = caller_env(stack, stack.tenant(), tmp_path, TOOLPLANE_POLICY_DIR=str(mine))
    done = cli(env, tmp_path, "call", "read_repo_file", "--arg", "path=.env", "--json")
    assert done.returncode == 3, done.stderr
    assert "no-secret-files" in json.loads(done.stdout)["nodes"][0]["error"]["message"]


def test_operator_commands_are_not_for_callers(stack: Stack, tmp_path: Path) -> None:
    """Creating a tenant needs the control host's database; freezing every tenant needs an
    operator tenant's admin, never a flag."""
    env = caller_env(stack, stack.tenant(), tmp_path)
    created = cli(env, tmp_path, "tenant", "create", "mine", "--operator")
    assert created.returncode != 0
    assert "TOOLPLANE_DATABASE_URL" in created.stderr and "Traceback" not in created.stderr
    frozen = cli(env, tmp_path, "policy", "freeze", "--all", "--reason", "mine now")
    assert frozen.returncode == 1
    assert "needs an admin of an operator tenant" in frozen.stderr


def test_a_call_with_curl_alone(stack: Stack, tmp_path: Path) -> None:
    """Any language can use the API: submit and follow a call with curl and sed."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed") if os.environ.get("CI") else pytest.skip("no curl")
    script = REPO / "tests" / "integration" / "scripts" / "call_with_curl.sh"
    done = subprocess.run(
        ["bash", str(script)],
        env=caller_env(stack, stack.tenant(), tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    run = json.loads(lines[-1])
    assert run["status"] == "completed" and run["nodes"][0]["result_sha256"]
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    node_statuses = [e["status"] for e in events if e.get("node_id")]
    assert node_statuses[-2:] == ["queued", "completed"]
    assert events[-1] == {"run_id": run["run_id"], "status": "completed"}
