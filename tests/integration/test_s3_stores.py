"""The checkpoint and artifact stores as one contract, run against each backend: the
directory, and an S3-compatible bucket (moto's S3 server over HTTP, with conditional
writes and with HEAD-then-put). Written once, a second write of the same name refused
or a no-op, a changed object named on read, a missing one named, reads bounded by the
recorded size, checkpoints listed newest last, refusals kept as records of their own;
a missing bucket or a dead endpoint named by its setting."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ledger.artifacts import (
    MEDIA_TYPE,
    ArtifactProblem,
    ArtifactRef,
    DirectoryArtifactStore,
    checked_bytes,
)
from ledger.checkpoint import Checkpoint, origin_for
from ledger.checkpoints import DirectoryCheckpointStore, trusted_checkpoints
from ledger.errors import LedgerError, StoreUnavailable
from ledger.note import generate_signer, sign_note
from ledger.s3store import S3ArtifactStore, S3CheckpointStore
from ledger.stores import artifact_store, checkpoint_store
from tests.harness import free_port
from tests.s3server import moto_s3, new_bucket, s3_client, s3_env
from toolplane.s3url import S3Location
from toolplane.settings import Settings

pytestmark = pytest.mark.integration

KINDS = ["directory", "s3", "s3-head-then-put"]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3() as url:
        yield url


Tamper = Callable[[str, bytes], None]  # (object name, new bytes)


@pytest.fixture(params=KINDS)
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Any, Tamper, Callable]:
    """(store, replace an object's bytes, delete an object), by sha256."""
    if request.param == "directory":
        store = DirectoryArtifactStore(tmp_path / "artifacts")

        def tamper(sha: str, data: bytes) -> None:
            path = store.path_for(sha)
            os.chmod(path, 0o644)
            path.write_bytes(data)

        return store, tamper, lambda sha: store.path_for(sha).unlink()
    endpoint = request.getfixturevalue("endpoint")
    client = s3_client(endpoint)
    bucket = new_bucket(client)
    s3 = S3ArtifactStore(client, S3Location(bucket, "art/"), conditional=request.param == "s3")

    def replace(sha: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=s3.key_for(sha), Body=data)

    return s3, replace, lambda sha: client.delete_object(Bucket=bucket, Key=s3.key_for(sha))


def ref(data: bytes) -> ArtifactRef:
    sha = hashlib.sha256(data).hexdigest()
    return ArtifactRef(sha, len(data), MEDIA_TYPE, "read_repo_file", "run-1", "node-1")


def test_an_artifact_is_written_once_and_read_back(artifacts: tuple[Any, Tamper, Any]) -> None:
    store, _, _ = artifacts
    data = b'{"content":"' + b"x" * 5000 + b'"}'
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.put(data) == sha  # a redelivery: the same name, nothing replaced
    assert checked_bytes(store, ref(data)) == data


def test_a_second_write_never_replaces_an_object(
    artifacts: tuple[Any, Tamper, Any], caplog: pytest.LogCaptureFixture
) -> None:
    store, tamper, _ = artifacts
    data = b'{"n":1}'
    sha = store.put(data)
    tamper(sha, b'{"n":2}')
    store.put(data)
    if isinstance(store, S3ArtifactStore):  # write-once: the other bytes stay, and are named
        assert store.get(sha, limit=100) == b'{"n":2}'
        assert "artifact.conflict" in caplog.text
        with pytest.raises(ArtifactProblem, match="do not match the hash"):
            checked_bytes(store, ref(data))
    else:  # the directory puts the good bytes back in place
        assert checked_bytes(store, ref(data)) == data


def test_a_changed_object_is_named_on_read(artifacts: tuple[Any, Tamper, Any]) -> None:
    store, tamper, _ = artifacts
    data = b'{"content":"abc"}'
    sha = store.put(data)
    tamper(sha, b'{"content":"abd"}')
    with pytest.raises(ArtifactProblem, match="changed") as caught:
        checked_bytes(store, ref(data))
    assert sha in str(caught.value) and "run run-1 node node-1" in str(caught.value)


def test_a_missing_object_is_named(artifacts: tuple[Any, Tamper, Any]) -> None:
    store, _, delete = artifacts
    data = b'{"content":"gone"}'
    sha = store.put(data)
    delete(sha)
    with pytest.raises(ArtifactProblem, match="missing") as caught:
        checked_bytes(store, ref(data))
    assert sha in str(caught.value)


def test_a_read_is_bounded_by_the_recorded_size(artifacts: tuple[Any, Tamper, Any]) -> None:
    store, tamper, _ = artifacts
    data = b'{"a":1}'
    sha = store.put(data)
    tamper(sha, b"y" * 1_000_000)  # grown: only size + 1 bytes are read
    assert len(store.get(sha, limit=len(data))) == len(data) + 1
    with pytest.raises(ArtifactProblem, match="changed"):
        checked_bytes(store, ref(data))


def test_a_name_that_is_not_a_digest_is_refused(artifacts: tuple[Any, Tamper, Any]) -> None:
    store, _, _ = artifacts
    with pytest.raises(ArtifactProblem, match="not a SHA-256 hex digest"):
        store.get("../../etc/passwd", limit=10)


# -- checkpoints ---------------------------------------------------------------------


@pytest.fixture(params=KINDS)
def checkpoints(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "directory":
        return DirectoryCheckpointStore(tmp_path / "checkpoints")
    client = s3_client(request.getfixturevalue("endpoint"))
    return S3CheckpointStore(
        client, S3Location(new_bucket(client), "cp/"), conditional=request.param == "s3"
    )


def test_checkpoints_are_listed_and_the_newest_is_the_largest(checkpoints: Any) -> None:
    assert checkpoints.latest("tenant:t1") is None and list(checkpoints.chains()) == []
    for size in (3, 12, 7):
        checkpoints.write("tenant:t1", size, f"note {size}\n".encode())
    checkpoints.write("system", 1, b"system note\n")
    assert checkpoints.sizes("tenant:t1") == [3, 7, 12]
    assert checkpoints.latest("tenant:t1") == b"note 12\n"
    assert checkpoints.read("tenant:t1", 7) == b"note 7\n"
    assert list(checkpoints.chains()) == ["system", "tenant:t1"]
    assert checkpoints.sizes("tenant:t2") == []


def test_a_checkpoint_is_never_overwritten(checkpoints: Any) -> None:
    checkpoints.write("tenant:t1", 5, b"first\n")
    checkpoints.write("tenant:t1", 5, b"first\n")  # the same tree signed again: a no-op
    with pytest.raises(LedgerError, match="a different checkpoint of this size exists"):
        checkpoints.write("tenant:t1", 5, b"a fork\n")
    assert checkpoints.read("tenant:t1", 5) == b"first\n"
    assert checkpoints.sizes("tenant:t1") == [5]


def test_refusals_are_kept_beside_the_checkpoints(checkpoints: Any) -> None:
    signer = generate_signer("test.example")
    text = Checkpoint(origin_for("test.example", "tenant:t1"), 2, bytes(32)).text()
    checkpoints.write("tenant:t1", 2, sign_note(text, [signer]).encode())
    checkpoints.record_refusal("tenant:t1", 4, "witness-a", "not consistent")
    checkpoints.record_refusal("tenant:t1", 4, "witness-a", "not consistent")
    checkpoints.record_refusal("tenant:t1", 6, "witness-b", "forked")
    found = checkpoints.refusals("tenant:t1")
    assert [(r["size"], r["witness"]) for r in found] == [
        (4, "witness-a"),
        (4, "witness-a"),
        (6, "witness-b"),
    ]
    assert checkpoints.sizes("tenant:t1") == [2]  # refusals are not checkpoints
    assert checkpoints.refusals("system") == []
    found_cp, problems = trusted_checkpoints(checkpoints, ["tenant:t1"], [signer.verifier])
    assert found_cp["tenant:t1"].size == 2
    refused = [p for p in problems if "refused to cosign the checkpoint of size 6" in p]
    assert refused == [
        "tenant:t1: witness witness-b refused to cosign the checkpoint of size 6: forked"
    ]


def test_a_chain_id_that_names_no_chain_is_refused(checkpoints: Any) -> None:
    with pytest.raises(LedgerError, match="not a chain"):
        checkpoints.sizes("tenant:../../x")


# -- selection and errors ------------------------------------------------------------


def test_settings_choose_the_bucket(endpoint: str, tmp_path: Path) -> None:
    client = s3_client(endpoint)
    bucket = new_bucket(client)
    env = {k.removeprefix("TOOLPLANE_").lower(): v for k, v in s3_env(endpoint).items()}
    settings = Settings(
        home=tmp_path,
        checkpoint_store=f"s3://{bucket}/a/cp",
        artifact_store=f"s3://{bucket}/a/art/",
        **env,
    )
    store = artifact_store(settings)
    sha = store.put(b'{"k":"v"}')
    head = client.head_object(Bucket=bucket, Key=f"a/art/sha256/{sha[:2]}/{sha[2:]}")
    assert head["ContentLength"] == 9
    cps = checkpoint_store(settings)
    cps.write("system", 1, b"n\n")
    assert cps.location == f"s3://{bucket}/a/cp/"
    assert client.get_object(Bucket=bucket, Key=f"a/cp/system/{1:020d}.note")["Body"].read()
    default = Settings(home=tmp_path)
    assert isinstance(artifact_store(default), DirectoryArtifactStore)
    assert isinstance(checkpoint_store(default), DirectoryCheckpointStore)


@pytest.mark.parametrize(
    "value, rule",
    [
        ("http://bucket/x", "must be s3://"),
        ("s3://Bad_Bucket/x", "bucket"),
        ("s3://ok-bucket/../x", "prefix"),
    ],
)
def test_a_bad_store_url_names_the_rule(value: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        Settings(artifact_store=value)


def test_a_missing_bucket_is_named_with_its_setting(endpoint: str, tmp_path: Path) -> None:
    env = {k.removeprefix("TOOLPLANE_").lower(): v for k, v in s3_env(endpoint).items()}
    settings = Settings(
        home=tmp_path,
        checkpoint_store="s3://no-such-bucket-here/cp",
        artifact_store="s3://no-such-bucket-here/art",
        **env,
    )
    with pytest.raises(StoreUnavailable, match="TOOLPLANE_CHECKPOINT_STORE") as caught:
        checkpoint_store(settings).latest("system")
    assert "does not exist" in str(caught.value)
    with pytest.raises(StoreUnavailable, match="TOOLPLANE_ARTIFACT_STORE"):
        artifact_store(settings).put(b"{}")


def test_an_endpoint_that_is_down_is_named_with_its_setting(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    env = {k.removeprefix("TOOLPLANE_").lower(): v for k, v in s3_env(down).items()}
    settings = Settings(home=tmp_path, artifact_store="s3://some-bucket/art", **env)
    with pytest.raises(StoreUnavailable, match="TOOLPLANE_ARTIFACT_STORE") as caught:
        artifact_store(settings).get("0" * 64, limit=10)
    assert "EndpointConnectionError" in str(caught.value)
