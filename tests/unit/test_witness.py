"""The witness (C2SP tlog-witness add-checkpoint, tlog-cosignature/v1): it cosigns only
checkpoints consistent with the last one it cosigned, and refuses forks and rewinds."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ledger.checkpoint import Checkpoint
from ledger.cosignature import CosignatureVerifier
from ledger.merkle import consistency_proof, leaf_hash, root_from_leaves
from ledger.note import generate_signer, sign_note, split_note
from ledger.witness import Witness, load_witness
from tests.unit.test_merkle import MemoryNodes

ORIGIN = "acme.example/tenant/tn_1"


def tree(leaves: list[bytes]) -> tuple[MemoryNodes, list[bytes]]:
    hashes = [leaf_hash(x) for x in leaves]
    return MemoryNodes(hashes), hashes


def request(
    log: object, hashes: list[bytes], nodes: MemoryNodes, old: int, size: int, origin: str = ORIGIN
) -> tuple[bytes, str]:
    text = Checkpoint(origin, size, root_from_leaves(hashes[:size])).text()
    note = sign_note(text, [log]).encode()  # type: ignore[list-item]
    proof = consistency_proof(nodes, old, size) if 0 < old <= size else []
    lines = [f"old {old}", *(base64.b64encode(p).decode() for p in proof)]
    return ("\n".join(lines) + "\n\n").encode() + note, text


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Witness, object]:
    log = generate_signer("acme.example")
    (tmp_path / "logs").write_text(log.verifier.vkey + "\n")
    return load_witness(tmp_path, "witness.example"), log


def test_cosigns_a_growing_log_and_refuses_a_fork(setup: tuple[Witness, object]) -> None:
    witness, log = setup
    nodes, hashes = tree([bytes([i]) for i in range(12)])
    body, text = request(log, hashes, nodes, 0, 3)
    answer = witness.add_checkpoint(body, now=1_700_000_000)
    assert answer.status == 200, answer.body
    _, sigs = split_note(text.encode() + b"\n" + answer.body.encode())
    verifier = CosignatureVerifier.parse((witness.home / "witness.vkey").read_text())
    assert verifier.verify(text, sigs[0]) == 1_700_000_000
    body, _ = request(log, hashes, nodes, 3, 8)
    assert witness.add_checkpoint(body).status == 200
    assert witness.state(ORIGIN)[0] == 8
    # A fork: the same log key signs a tree whose 5th leaf was rewritten.
    forked_nodes, forked = tree([b"X" if i == 4 else bytes([i]) for i in range(12)])
    body, _ = request(log, forked, forked_nodes, 8, 10)
    answer = witness.add_checkpoint(body)
    assert answer.status == 422 and "not consistent with the checkpoint of size 8" in answer.body
    body, _ = request(log, hashes, nodes, 8, 6)  # rewound
    assert witness.add_checkpoint(body).status == 422
    body, _ = request(log, hashes, nodes, 3, 10)  # stale old size: 409 with the size held
    answer = witness.add_checkpoint(body)
    assert (answer.status, answer.body, answer.content_type) == (409, "8\n", "text/x.tlog.size")
    refusals = [json.loads(x) for x in (witness.home / "refusals.log").read_text().splitlines()]
    assert [r["origin"] for r in refusals] == [ORIGIN, ORIGIN]
    assert witness.state(ORIGIN)[0] == 8


def test_refuses_unknown_logs_and_foreign_origins(setup: tuple[Witness, object]) -> None:
    witness, log = setup
    nodes, hashes = tree([b"a", b"b"])
    stranger = generate_signer("acme.example")
    body, _ = request(stranger, hashes, nodes, 0, 2)
    assert witness.add_checkpoint(body).status == 403
    body, _ = request(log, hashes, nodes, 0, 2, origin="other.example/tenant/x")
    assert witness.add_checkpoint(body).status == 403
    assert witness.add_checkpoint(b"old x\n\nnothing").status == 400
