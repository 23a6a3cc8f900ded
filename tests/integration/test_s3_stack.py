"""The real stack with both stores in an S3-compatible bucket (moto's S3 server on
loopback, over HTTP; not AWS, not MinIO): the control writes a large result and the
signed checkpoints to the bucket, `ledger verify` checks the database against them, and
one byte changed in a bucket object is named. The S3 settings and credentials reach the
control's processes only, never a worker. A bucket that does not exist is named by its
setting: one line on the CLI, a 503 (not a 500) from the API."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import SecretStr

from tests.harness import Services, Stack, own_services, start_stack, stop_stack
from tests.s3server import SECRET, moto_s3, new_bucket, s3_client, s3_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3stack(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    own = own_services(services)
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        bucket = new_bucket(client)
        env = {
            **s3_env(endpoint),
            "TOOLPLANE_CHECKPOINT_STORE": f"s3://{bucket}/ledger/checkpoints",
            "TOOLPLANE_ARTIFACT_STORE": f"s3://{bucket}/ledger/artifacts",
        }
        stack = start_stack(
            own,
            Path(tmp_path_factory.mktemp("s3-stack")),
            workers={"read_repo_file": 1},
            extra_env=env,
        )
        try:
            yield {"stack": stack, "client": client, "bucket": bucket, "endpoint": endpoint}
        finally:
            stop_stack(stack)
            own.close()


@pytest.fixture(scope="module")
def large_run(s3stack: dict[str, Any]) -> dict[str, Any]:
    """A completed call whose result went to the bucket, and its tenant's token."""
    stack: Stack = s3stack["stack"]
    token = stack.tenant()
    name = f"big-{secrets.token_hex(4)}.txt"
    line = f"{name}: a line of a large file that the tool returns whole\n"
    text = (line * (200_000 // len(line) + 1))[:200_000]
    path = Path(stack.env["TOOLPLANE_REPO_ROOT"]) / name
    path.write_text(text)
    os.chmod(path, 0o644)
    run = stack.http(token).call("read_repo_file", {"path": name}, wait=True)
    assert run.status == "completed", run
    node = run.nodes[0]
    sha = node.result_sha256
    key = f"ledger/artifacts/sha256/{sha[:2]}/{sha[2:]}"
    return {"token": token, "run": run, "node": node, "text": text, "key": key}


def verify(stack: Stack, token: str) -> tuple[int, dict[str, Any]]:
    done = stack.cli("ledger", "verify", "--json", token=token)
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def checkpoint_keys(s3stack: dict[str, Any], tenant_prefix: str) -> list[str]:
    listed = s3stack["client"].list_objects_v2(Bucket=s3stack["bucket"], Prefix=tenant_prefix)
    return [o["Key"] for o in listed.get("Contents", ())]


def test_the_control_writes_artifacts_and_checkpoints_to_the_bucket(
    s3stack: dict[str, Any], large_run: dict[str, Any]
) -> None:
    stack: Stack = s3stack["stack"]
    client, bucket, token = s3stack["client"], s3stack["bucket"], large_run["token"]
    node = large_run["node"]
    assert node.result["content"] == large_run["text"]  # read back from the bucket, checked
    head = client.head_object(Bucket=bucket, Key=large_run["key"])
    assert head["ContentLength"] == node.artifact["size"] > 65_536
    assert not (stack.home / "artifacts").exists()  # not in the directory store

    done = stack.cli("ledger", "checkpoint", "--json")
    assert done.returncode in (0, 1), done.stderr
    signed = json.loads(done.stdout)
    assert signed["directory"] == f"s3://{bucket}/ledger/checkpoints/"
    assert signed["signed"], signed
    assert not (stack.home / "checkpoints").exists()
    notes = [k for k in checkpoint_keys(s3stack, "ledger/checkpoints/") if k.endswith(".note")]
    assert notes, "no checkpoint object in the bucket"

    code, report = verify(stack, token)
    assert code == 0 and report["ok"], report
    assert report["checkpoints"] and report["checkpoints"][0]["size"] >= 1


def test_a_byte_changed_in_a_bucket_artifact_is_named(
    s3stack: dict[str, Any], large_run: dict[str, Any]
) -> None:
    stack: Stack = s3stack["stack"]
    client, bucket, key = s3stack["client"], s3stack["bucket"], large_run["key"]
    token, run, sha = large_run["token"], large_run["run"], large_run["node"].result_sha256
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    changed = bytearray(original)
    changed[changed.index(b"a line")] = ord("A")
    client.put_object(Bucket=bucket, Key=key, Body=bytes(changed))
    try:
        response = httpx.get(
            f"{stack.url}/v1/runs/{run.run_id}", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 409 and response.json()["code"] == "artifact_invalid"
        assert sha in response.json()["detail"]
        code, report = verify(stack, token)
        assert code == 1
        named = [b for b in report["broken"] if sha in b["problem"]]
        assert len(named) == 1 and "changed" in named[0]["problem"], report["broken"]
    finally:
        client.put_object(Bucket=bucket, Key=key, Body=original)
    code, report = verify(stack, token)
    assert code == 0, report


def test_a_byte_changed_in_a_bucket_checkpoint_is_named(
    s3stack: dict[str, Any], large_run: dict[str, Any]
) -> None:
    stack: Stack = s3stack["stack"]
    client, bucket, token = s3stack["client"], s3stack["bucket"], large_run["token"]
    assert stack.cli("ledger", "checkpoint").returncode in (0, 1)
    _, report = verify(stack, token)
    chain = report["checkpoints"][0]["chain_id"].replace(":", "/")  # tenant/<id>
    notes = sorted(
        k for k in checkpoint_keys(s3stack, f"ledger/checkpoints/{chain}/") if k.endswith(".note")
    )
    assert notes
    newest = notes[-1]
    original = client.get_object(Bucket=bucket, Key=newest)["Body"].read()
    lines = original.split(b"\n")
    root = bytearray(lines[2])  # origin, size, root hash (base64), ...
    root[0] = ord("A") if root[0] != ord("A") else ord("B")
    lines[2] = bytes(root)
    client.put_object(Bucket=bucket, Key=newest, Body=b"\n".join(lines))
    try:
        code, report = verify(stack, token)
        assert code == 1
        problems = [b["problem"] for b in report["broken"]]
        assert any("checkpoint does not verify" in p for p in problems), problems
    finally:
        client.put_object(Bucket=bucket, Key=newest, Body=original)
    code, report = verify(stack, token)
    assert code == 0, report


def test_the_workers_hold_no_s3_setting_or_credential(s3stack: dict[str, Any]) -> None:
    stack: Stack = s3stack["stack"]
    control = psutil.Process(stack.pid("control")).environ()
    assert control["TOOLPLANE_S3_SECRET_ACCESS_KEY"] == SECRET
    assert control["TOOLPLANE_ARTIFACT_STORE"].startswith("s3://")
    worker = psutil.Process(stack.worker_pid("read_repo_file")).environ()
    leaked = [k for k in worker if k.startswith(("TOOLPLANE_S3_", "AWS_")) or "STORE" in k]
    assert leaked == [], leaked


def test_a_missing_bucket_is_named_by_its_setting(
    s3stack: dict[str, Any], large_run: dict[str, Any]
) -> None:
    stack: Stack = s3stack["stack"]
    token, run = large_run["token"], large_run["run"]
    gone = "s3://no-such-bucket-anywhere/cp"
    # an operator's command, in its own process (`ledger verify` with a token asks the API)
    done = stack.cli("ledger", "checkpoint", env={"TOOLPLANE_CHECKPOINT_STORE": gone})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "TOOLPLANE_CHECKPOINT_STORE" in done.stderr and "does not exist" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr

    from control.api.app import build_app
    from control.ops.runtime import ControlPlane

    settings = stack.settings().model_copy(
        update={
            "checkpoint_store": gone + "/",
            "artifact_store": "s3://no-such-bucket-anywhere/art/",
            "s3_endpoint_url": s3stack["endpoint"],
            "s3_region": "us-east-1",
            "s3_access_key_id": SecretStr("toolplane-test"),
            "s3_secret_access_key": SecretStr("toolplane-test-secret"),
        }
    )
    plane = ControlPlane(
        settings,
        broker_url=stack.env["TOOLPLANE_BROKER_URL"],
        database_url=stack.env["TOOLPLANE_DATABASE_URL"],
    )
    app = build_app(plane)

    async def ask(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get(path, headers={"Authorization": f"Bearer {token}"})

    for path in ("/v1/ledger/checkpoint", f"/v1/runs/{run.run_id}"):
        answer = asyncio.run(ask(path))
        assert answer.status_code == 503, answer.text
        detail = answer.json()["detail"]
        assert "TOOLPLANE_" in detail and "no-such-bucket" not in detail, detail
    plane.engine.dispose()
