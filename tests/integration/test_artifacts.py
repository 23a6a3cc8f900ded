"""Artifacts against the real stack: a result over the threshold (64 KiB by default) is
kept in the artifact store, not in PostgreSQL; the API returns it intact after checking
its hash; one byte changed in the store, or the file deleted, is named on read (a
problem, not a 500), by `ledger verify` and on export; a small result stays inline; an
offline bundle carries the artifact's bytes, and verify-bundle checks them; a workflow
node takes its arguments from an upstream artifact."""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from ledger.artifacts import DirectoryArtifactStore
from ledger.bundle_check import check_bundle
from ledger.models import EvidenceEvent, Node
from ledger.note import NoteVerifier
from tests.harness import Stack
from toolplane.canonical import canonical_json

pytestmark = pytest.mark.integration


def big_file(stack: Stack, size: int = 200_000) -> tuple[str, str]:
    """A text file of ``size`` bytes in the stack's repository: (its path, its text)."""
    name = f"big-{secrets.token_hex(4)}.txt"
    line = f"{name}: a line of a large file that the tool returns whole\n"
    text = (line * (size // len(line) + 1))[:size]
    path = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / name
    path.write_text(text)
    os.chmod(path, 0o644)
    return name, text


@pytest.fixture
def large(stack: Stack, token: str) -> Iterator[dict[str, Any]]:
    """A completed call whose result went to the store; the store's file is put back as it
    was after the test (other tests share the stack)."""
    name, text = big_file(stack)
    run = stack.http(token).call("read_repo_file", {"path": name}, wait=True)
    assert run.status == "completed", run
    node = run.nodes[0]
    store = DirectoryArtifactStore(stack.settings().artifacts_dir)
    path = store.path_for(node.result_sha256)
    original = path.read_bytes()
    try:
        yield {"run": run, "node": node, "text": text, "path": path, "bytes": original}
    finally:
        store.put(original)


def test_a_large_result_is_kept_outside_the_database(
    stack: Stack, token: str, large: dict[str, Any]
) -> None:
    run, node, text = large["run"], large["node"], large["text"]
    assert node.result["content"] == text  # returned intact, read from the store
    artifact = node.artifact
    assert artifact is not None
    assert artifact["sha256"] == node.result_sha256  # the hash the receipt signs
    assert artifact["size"] == len(large["bytes"]) > 65_536
    assert artifact["media_type"] == "application/json"
    assert (artifact["tool"], artifact["run_id"], artifact["node_id"]) == (
        "read_repo_file",
        run.run_id,
        node.node_id,
    )
    assert oct(large["path"].stat().st_mode & 0o777) == "0o400"
    client = stack.client(token)
    with client.plane.sessions() as session:
        row = session.get(Node, (run.run_id, node.node_id))
        assert row is not None and row.result is None and row.artifact == artifact
        payload = session.scalar(
            select(EvidenceEvent.payload).where(
                EvidenceEvent.run_id == run.run_id, EvidenceEvent.kind == "ToolCallCompleted"
            )
        )
    assert payload["artifact"] == artifact
    assert "result" not in payload["message"]["result"]  # not inline in the ledger
    assert len(json.dumps(payload)) < 10_000
    report = client.verify_ledger(run_id=run.run_id)
    assert report.ok and report.receipts >= 1, report.as_dict()
    shown = stack.cli("runs", "show", run.run_id, "--json", token=token)
    assert (
        shown.returncode == 0 and json.loads(shown.stdout)["nodes"][0]["result"]["content"] == text
    )


def test_a_small_result_stays_inline(stack: Stack, token: str) -> None:
    run = stack.http(token).call("read_repo_file", {"path": "README.md"}, wait=True)
    node = run.nodes[0]
    assert run.status == "completed" and node.artifact is None
    with stack.client(token).plane.sessions() as session:
        row = session.get(Node, (run.run_id, node.node_id))
        assert row is not None and row.artifact is None and row.result == node.result


def test_a_workflow_node_takes_its_arguments_from_an_artifact(stack: Stack, token: str) -> None:
    """repo-review's lint takes ``${nodes.read.result.content}``: read from the store."""
    name = f"big_{secrets.token_hex(4)}.py"
    text = "".join(f"value_{i} = {i}\n" for i in range(5000))  # 88 kB: over 64 KiB, under
    # the 100 000 characters that policy lets lint_python take
    path = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / name
    path.write_text(text)
    os.chmod(path, 0o644)
    view = stack.http(token).run_workflow(
        "repo-review", {"query": "ledger", "path": name}, wait=True, timeout=90
    )
    assert view.status == "completed", view
    _search, read, lint = view.nodes
    assert read.artifact is not None and read.artifact["size"] > 65_536
    assert read.result["content"] == text
    assert lint.args == {"code": text}
    assert stack.client(token).verify_ledger(run_id=view.run_id).ok


def test_a_changed_byte_is_named_on_read_and_by_verify(
    stack: Stack, token: str, large: dict[str, Any]
) -> None:
    run, node, path = large["run"], large["node"], large["path"]
    changed = bytearray(large["bytes"])
    at = changed.index(b"a line")
    changed[at] = ord("A")
    os.chmod(path, 0o644)
    path.write_bytes(bytes(changed))
    sha = node.result_sha256

    response = httpx.get(
        f"{stack.url}/v1/runs/{run.run_id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 409, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == "artifact_invalid"
    assert sha in problem["detail"] and run.run_id in problem["detail"]
    assert node.node_id in problem["detail"] and "changed" in problem["detail"]

    shown = stack.cli("runs", "show", run.run_id, token=token)
    assert shown.returncode == 1 and sha in shown.stdout + shown.stderr
    assert "Traceback" not in shown.stderr

    done = stack.cli("ledger", "verify", "--json", token=token)
    assert done.returncode == 1, done.stdout + done.stderr
    broken = json.loads(done.stdout)["broken"]
    named = [b for b in broken if sha in b["problem"]]
    assert len(named) == 1 and named[0]["kind"] == "ToolCallCompleted", broken
    assert "changed" in named[0]["problem"] and run.run_id in named[0]["problem"]
    assert len(broken) == 1, broken  # only the artifact: the chain itself is intact

    out = path.parent / "bundle.json"
    exported = stack.cli("ledger", "export", run.run_id, "--out", str(out), token=token)
    assert exported.returncode == 1 and sha in exported.stdout + exported.stderr


def test_a_deleted_artifact_is_named(stack: Stack, token: str, large: dict[str, Any]) -> None:
    run, node, path = large["run"], large["node"], large["path"]
    path.unlink()
    response = httpx.get(
        f"{stack.url}/v1/runs/{run.run_id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 409 and response.json()["code"] == "artifact_invalid"
    assert "missing" in response.json()["detail"]
    report = stack.client(token).verify_ledger()
    assert not report.ok
    assert [b.kind for b in report.broken] == ["ToolCallCompleted"]
    assert node.result_sha256 in report.broken[0].problem
    assert "missing" in report.broken[0].problem


def test_a_bundle_carries_the_artifact_and_checks_it(
    stack: Stack, token: str, large: dict[str, Any], tmp_path: Path
) -> None:
    run, node = large["run"], large["node"]
    done = stack.cli("ledger", "checkpoint", "--json")
    assert done.returncode in (0, 1), done.stderr  # other tests' chains may be refused
    out = tmp_path / "run.bundle.json"
    done = stack.cli("ledger", "export", run.run_id, "--out", str(out), token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    trust = tmp_path / "trust.json"
    assert stack.cli("ledger", "trust", "--out", str(trust)).returncode == 0
    verified = stack.cli("ledger", "verify-bundle", str(out), "--trust", str(trust), "--json")
    assert verified.returncode == 0, verified.stdout
    report = json.loads(verified.stdout)
    assert report["artifacts_verified"] == 1 and report["receipts_verified"] >= 1

    bundle = json.loads(out.read_bytes())
    [carried] = bundle["artifacts"]
    assert carried["sha256"] == node.result_sha256
    assert base64.b64decode(carried["data"]) == large["bytes"]
    data = bytearray(base64.b64decode(carried["data"]))
    data[data.index(b"a line")] = ord("A")
    carried["data"] = base64.b64encode(bytes(data)).decode()
    keys = [NoteVerifier.parse(k) for k in json.loads(trust.read_text())["checkpoint_keys"]]
    tampered = check_bundle(canonical_json(bundle), keys)
    assert not tampered.ok
    assert any(p.startswith("artifacts[0]") and "do not match" in p for p in tampered.problems)
    assert any(".artifact: " in p and "missing" in p for p in tampered.problems)
