"""The artifact store (a directory, content-addressed by SHA-256) and what the control and
the verifier do with it, on a real filesystem: paths made only from a hex digest, files
written once and read-only, bytes checked against the hash on every read."""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from control.errors import ArtifactInvalid
from control.orchestration.artifacts import Artifacts, externalize_result, node_result
from ledger.artifacts import (
    MEDIA_TYPE,
    ArtifactProblem,
    ArtifactRef,
    DirectoryArtifactStore,
    load_result,
    message_with_artifact,
)
from ledger.receipts import check_result_message
from sandbox_tasks.receipts import build_result, sign_result
from toolplane.canonical import canonical_json
from toolplane.keystore import KeyStore
from toolplane.signing import KeyRing

BIG = {"content": "x" * 5000, "lines": list(range(100))}


def signed_message(store: KeyStore, result: dict[str, Any]) -> dict[str, Any]:
    built = build_result(
        kind="result",
        tool="read_repo_file",
        worker="w@h",
        started_at=1,
        envelope=None,
        envelope_sha256=None,
        result=result,
        containment="fork-rlimits",
    )
    return sign_result(built, store.signer("tool.read_repo_file")).model_dump(mode="json")


@pytest.mark.parametrize(
    "crafted",
    [
        "../../../etc/passwd",
        "a" * 63,
        "A" * 64,  # upper case: not the one spelling of a digest
        "a" * 64 + "/..",
        "../" + "a" * 61,
        "a" * 62 + "/x",
        "",
        None,
    ],
)
def test_a_crafted_hash_never_becomes_a_path(tmp_path: Path, crafted: Any) -> None:
    store = DirectoryArtifactStore(tmp_path / "artifacts")
    with pytest.raises(ArtifactProblem, match="not a SHA-256 hex digest"):
        store.path_for(crafted)
    with pytest.raises(ArtifactProblem, match="not a SHA-256 hex digest"):
        store.get(crafted, limit=10)
    with pytest.raises(ArtifactProblem):
        ArtifactRef.of({**_ref("0" * 64).as_dict(), "sha256": crafted})


def _ref(sha256: str, size: int = 1) -> ArtifactRef:
    return ArtifactRef(sha256, size, MEDIA_TYPE, "read_repo_file", "r-1", "call")


def test_put_writes_once_read_only_under_its_hash(tmp_path: Path) -> None:
    store = DirectoryArtifactStore(tmp_path / "artifacts")
    data = canonical_json(BIG)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    path = tmp_path / "artifacts" / "sha256" / digest[:2] / digest[2:]
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert store.put(data) == digest  # again: nothing changes
    assert [p.name for p in path.parent.iterdir()] == [digest[2:]]  # no temporary left
    assert load_result(store, _ref(digest, len(data))) == BIG


def test_a_changed_or_missing_artifact_is_named_never_served(tmp_path: Path) -> None:
    store = DirectoryArtifactStore(tmp_path / "artifacts")
    data = canonical_json(BIG)
    ref = _ref(store.put(data), len(data))
    path = store.path_for(ref.sha256)
    os.chmod(path, 0o644)
    path.write_bytes(data[:-2] + b"y}")  # one byte changed, same size
    with pytest.raises(ArtifactProblem, match=f"sha256:{ref.sha256} .run r-1 node call.: bytes"):
        load_result(store, ref)
    path.write_bytes(data + b" ")  # longer: read only up to its size plus one
    with pytest.raises(ArtifactProblem, match="do not match the hash"):
        load_result(store, ref)
    assert store.put(data) == ref.sha256  # the control writing it again repairs it
    assert load_result(store, ref) == BIG
    path.unlink()
    with pytest.raises(ArtifactProblem, match="missing from the artifact store"):
        load_result(store, ref)
    path.symlink_to(tmp_path / "elsewhere")  # a symlink planted in the store is not followed
    (tmp_path / "elsewhere").write_bytes(data)
    with pytest.raises(ArtifactProblem, match="cannot be read"):
        load_result(store, ref)
    with pytest.raises(ArtifactProblem, match="no artifact store"):
        load_result(None, ref)


def test_large_results_go_out_small_ones_stay_inline(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    keys.ensure_all(["read_repo_file"], receipt_algorithm="ed25519")
    artifacts = Artifacts(DirectoryArtifactStore(tmp_path / "artifacts"), threshold=1024)
    node = SimpleNamespace(run_id="r-1", node_id="call", result=None, artifact=None)
    small = signed_message(keys, {"content": "hi"})
    assert externalize_result(artifacts, small, node) == (small, None)  # type: ignore[arg-type]
    assert externalize_result(None, signed_message(keys, BIG), node)[1] is None  # type: ignore[arg-type]

    message = signed_message(keys, BIG)
    kept, artifact = externalize_result(artifacts, message, node)  # type: ignore[arg-type]
    assert artifact is not None and "result" not in kept["result"]
    data = canonical_json(BIG)
    assert artifact == {
        "sha256": message["result"]["result_sha256"],  # what the receipt signs
        "size": len(data),
        "media_type": "application/json",
        "tool": "read_repo_file",
        "run_id": "r-1",
        "node_id": "call",
    }
    node.artifact, node.result_sha256 = artifact, message["result"]["result_sha256"]
    assert node_result(artifacts, node) == BIG  # type: ignore[arg-type]

    # A node pointed at another (valid) artifact than the result its receipt signs.
    other = {**artifact, "sha256": artifacts.store.put(canonical_json({"other": "bytes"}))}
    swapped = SimpleNamespace(**{**vars(node), "artifact": other})
    with pytest.raises(ArtifactInvalid, match="is not the result its receipt signs"):
        node_result(artifacts, swapped)  # type: ignore[arg-type]

    # The verifier puts the checked bytes back, then the receipt verifies over them.
    whole = message_with_artifact({"message": kept, "artifact": artifact}, artifacts.store)
    ring = KeyRing(keys.public_keys())
    check_result_message(whole, ring, received=datetime.now(UTC))
    path = artifacts.store.path_for(artifact["sha256"])
    os.chmod(path, 0o644)
    path.write_bytes(data.replace(b"x", b"z", 1))
    with pytest.raises(ArtifactInvalid, match=artifact["sha256"]) as caught:
        node_result(artifacts, node)  # type: ignore[arg-type]
    assert "run r-1 node call" in str(caught.value)
    with pytest.raises(ArtifactProblem, match="changed"):
        message_with_artifact({"message": kept, "artifact": artifact}, artifacts.store)
    other = {**artifact, "sha256": "0" * 64}  # metadata that is not the receipt's hash
    with pytest.raises(ArtifactProblem, match="not the result_sha256"):
        message_with_artifact({"message": kept, "artifact": other}, artifacts.store)
