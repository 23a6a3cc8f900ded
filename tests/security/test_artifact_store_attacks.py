"""An attacker against the artifact store itself (ledger/artifacts.py), on a real
filesystem: what a read does with a store file replaced by a FIFO, a symlinked
directory or a huge file, with metadata whose size is absurd (a rewritten ledger row),
and who else on the host may read a tenant's artifact. Every case is named as an
ArtifactProblem (the API's 409, `ledger verify`'s named event), never another
exception, a hang or an unbounded read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.artifacts import (
    MEDIA_TYPE,
    ArtifactProblem,
    ArtifactRef,
    DirectoryArtifactStore,
    checked_bytes,
    load_result,
)
from ledger.note import generate_signer
from toolplane.canonical import canonical_json

pytestmark = pytest.mark.timeout(30)

DATA = canonical_json({"content": "secret of tenant A " * 400})


def _ref(sha256: str, size: int) -> ArtifactRef:
    return ArtifactRef(sha256, size, MEDIA_TYPE, "read_repo_file", "r-1", "call")


@pytest.fixture
def stored(tmp_path: Path) -> tuple[DirectoryArtifactStore, str]:
    store = DirectoryArtifactStore(tmp_path / "artifacts")
    return store, store.put(DATA)


@pytest.mark.parametrize("size", [2**40, 2**63, 2**70])
def test_an_absurd_recorded_size_is_named_not_allocated(
    stored: tuple[DirectoryArtifactStore, str], size: int
) -> None:
    """Metadata rewritten in the database (the node's column is not evidence) must not make
    a read allocate its size: the read is bounded by the file, and the mismatch named."""
    store, sha = stored
    with pytest.raises(ArtifactProblem, match="do not match the hash"):
        checked_bytes(store, _ref(sha, size))


def test_a_fifo_in_place_of_an_artifact_is_named_without_blocking(
    stored: tuple[DirectoryArtifactStore, str],
) -> None:
    store, sha = stored
    path = store.path_for(sha)
    path.unlink()
    os.mkfifo(path)  # no writer: a blocking open or read would hang the reader
    with pytest.raises(ArtifactProblem, match="not a regular file"):
        checked_bytes(store, _ref(sha, len(DATA)))


def test_a_huge_file_in_place_of_an_artifact_is_read_only_up_to_its_size(
    stored: tuple[DirectoryArtifactStore, str],
) -> None:
    store, sha = stored
    path = store.path_for(sha)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.truncate(64 << 30)  # 64 GiB (sparse): reading it whole would exhaust memory
    with pytest.raises(ArtifactProblem, match="do not match the hash"):
        checked_bytes(store, _ref(sha, len(DATA)))


def test_a_symlinked_directory_serves_only_bytes_that_match_the_hash(
    stored: tuple[DirectoryArtifactStore, str], tmp_path: Path
) -> None:
    """``sha256/ab`` swapped for a link to a directory the attacker filled: the file there
    is read, but served only if its bytes are the hash's, so nothing else is served."""
    store, sha = stored
    folder = store.path_for(sha).parent
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / sha[2:]).write_bytes(canonical_json({"content": "forged"}))
    os.chmod(folder / sha[2:], 0o600)
    (folder / sha[2:]).unlink()
    folder.rmdir()
    folder.symlink_to(planted)
    with pytest.raises(ArtifactProblem, match="do not match the hash"):
        load_result(store, _ref(sha, len(DATA)))


def test_only_the_owner_may_read_the_store(
    stored: tuple[DirectoryArtifactStore, str], tmp_path: Path
) -> None:
    """Another tenant's result must not be readable by any other user of the control's
    host: the store's directories and files give no group or other permission."""
    store, sha = stored
    path = store.path_for(sha)
    for node in (tmp_path / "artifacts", tmp_path / "artifacts" / "sha256", path.parent, path):
        mode = stat.S_IMODE(node.stat().st_mode)
        assert mode & 0o077 == 0, f"{node} is {oct(mode)}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o400  # and read-only for the owner


def test_verify_bundle_reads_an_oversized_file_no_further_than_its_limit(tmp_path: Path) -> None:
    """An auditor handed a huge "bundle" (artifacts make real ones large): verify-bundle
    reads at most its limit plus one byte, then names the size; it never reads the whole
    file into memory first. The process gets 1.5 GiB of address space; the file is 3 GiB
    (sparse)."""
    huge = tmp_path / "huge.bundle.json"
    with open(huge, "wb") as f:
        f.truncate(3 << 30)
    vkey = generate_signer("auditor.example").verifier.vkey
    done = subprocess.run(  # noqa: S603 (our own CLI, our own arguments)
        [
            sys.executable,
            "-c",
            "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29)); "
            "from control.cli.app import main; sys.argv[0] = 'toolplane'; main()",
            "ledger",
            "verify-bundle",
            str(huge),
            "--key",
            vkey,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
    assert "bundle: larger than" in done.stdout
