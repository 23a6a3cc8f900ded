"""RFC 9162 Merkle trees: published test vectors and properties over random sizes.

The vectors are the RFC 6962/9162 test data of transparency-dev/merkle
(testonly/constants.go: leaves, node and root hashes; proof/verify_test.go:
inclusion and consistency proofs), which Certificate Transparency's own tests use.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.chain import event_hash
from ledger.leaf import event_leaf
from ledger.merkle import (
    EMPTY_ROOT,
    MerkleError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    needed_nodes,
    node_hash,
    root_from_leaves,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from ledger.roots import RootAt

h = bytes.fromhex
LEAVES = [h(x) for x in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                         "606162636465666768696a6b6c6d6e6f"]]  # fmt: skip
ROOTS = [
    EMPTY_ROOT,
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]
# (leaf index from 1, tree size, proof)
INCLUSION = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
CONSISTENCY = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip


class MemoryNodes:
    """Complete subtrees of an in-memory tree, as the database's table keeps them."""

    def __init__(self, hashes: list[bytes]) -> None:
        self.levels = [list(hashes)]
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            self.levels.append(
                [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            )
        self.reads = 0

    def __call__(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self.levels[level][index]


def nodes_for(n: int) -> tuple[MemoryNodes, list[bytes]]:
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    return MemoryNodes(hashes), hashes


@pytest.mark.parametrize("size", range(len(ROOTS)))
def test_roots_of_the_vectors(size: int) -> None:
    hashes = [leaf_hash(x) for x in LEAVES[:size]]
    assert root_from_leaves(hashes) == ROOTS[size]
    assert tree_root(MemoryNodes(hashes), size) == ROOTS[size]


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_vectors(leaf: int, size: int, proof: list[str]) -> None:
    nodes = MemoryNodes([leaf_hash(x) for x in LEAVES])
    expected = [h(p) for p in proof]
    assert inclusion_proof(nodes, leaf - 1, size) == expected
    verify_inclusion(leaf_hash(LEAVES[leaf - 1]), leaf - 1, size, expected, ROOTS[size])
    for wrong in (
        (leaf_hash(b"WrongLeaf"), leaf - 1, size, expected, ROOTS[size]),
        (leaf_hash(LEAVES[leaf - 1]), leaf, size, expected, ROOTS[size]),
        (leaf_hash(LEAVES[leaf - 1]), leaf - 1, size * 2, expected, ROOTS[size]),
        (leaf_hash(LEAVES[leaf - 1]), leaf - 1, size, expected[:-1], ROOTS[size]),
        (leaf_hash(LEAVES[leaf - 1]), leaf - 1, size, [*expected, ROOTS[size]], ROOTS[size]),
        (leaf_hash(LEAVES[leaf - 1]), leaf - 1, size, expected, EMPTY_ROOT),
    ):
        with pytest.raises(MerkleError):
            verify_inclusion(*wrong)


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_vectors(old: int, new: int, proof: list[str]) -> None:
    nodes = MemoryNodes([leaf_hash(x) for x in LEAVES])
    expected = [h(p) for p in proof]
    assert consistency_proof(nodes, old, new) == expected
    verify_consistency(old, new, expected, ROOTS[old], ROOTS[new])
    for wrong in (
        (old, new, expected, ROOTS[new], ROOTS[old]),
        (old + 1, new, expected, ROOTS[old], ROOTS[new]),
        (old, new, [], ROOTS[old], ROOTS[new]),
        (old, new, expected[:-1], ROOTS[old], ROOTS[new]),
        (old, new, [*expected, ROOTS[old]], ROOTS[old], ROOTS[new]),
    ):
        with pytest.raises(MerkleError):
            verify_consistency(*wrong)


def test_trivial_consistency() -> None:
    verify_consistency(0, 5, [], ROOTS[0], ROOTS[5])
    verify_consistency(3, 3, [], ROOTS[3], ROOTS[3])
    with pytest.raises(MerkleError):
        verify_consistency(3, 3, [], ROOTS[3], ROOTS[4])
    with pytest.raises(MerkleError):
        verify_consistency(4, 3, [], ROOTS[4], ROOTS[3])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_inclusion_proofs_for_random_sizes(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 1200), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    nodes, hashes = nodes_for(size)
    root = root_from_leaves(hashes)
    assert tree_root(nodes, size) == root
    proof = inclusion_proof(nodes, index, size)
    verify_inclusion(hashes[index], index, size, proof, root)
    other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index), label="other")
    with pytest.raises(MerkleError):
        verify_inclusion(hashes[other], index, size, proof, root)
    if proof:
        bad = list(proof)
        bad[data.draw(st.integers(0, len(bad) - 1))] = EMPTY_ROOT
        with pytest.raises(MerkleError):
            verify_inclusion(hashes[index], index, size, bad, root)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_consistency_proofs_for_random_sizes(data: st.DataObject) -> None:
    new = data.draw(st.integers(1, 1200), label="new")
    old = data.draw(st.integers(1, new), label="old")
    nodes, hashes = nodes_for(new)
    old_root, new_root = root_from_leaves(hashes[:old]), root_from_leaves(hashes)
    proof = consistency_proof(nodes, old, new)
    verify_consistency(old, new, proof, old_root, new_root)
    if old < new:
        forked = root_from_leaves([*hashes[: old - 1], leaf_hash(b"forked")])
        with pytest.raises(MerkleError):
            verify_consistency(old, new, proof, forked, new_root)


def test_proofs_read_few_subtrees() -> None:
    """A proof of a million-leaf tree needs a few dozen stored subtrees, not the log."""
    size = 1_000_003
    wanted = needed_nodes(lambda n: (inclusion_proof(n, 777_777, size), tree_root(n, size)))
    assert len(wanted) < 64
    wanted = needed_nodes(lambda n: consistency_proof(n, 500_001, size))
    assert len(wanted) < 64


@settings(max_examples=60, deadline=None)
@given(
    payload=st.dictionaries(
        st.text(max_size=8), st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20)
    ),
    seq=st.integers(1, 2**40),
    run_id=st.none() | st.text(min_size=1, max_size=10),
)
def test_leaf_is_what_the_chain_hash_covers(
    payload: dict[str, object], seq: int, run_id: str | None
) -> None:
    fields = {
        "chain_id": "tenant:tn_1",
        "seq": seq,
        "prev_hash": "ab" * 32,
        "kind": "PolicyDecision",
        "tenant_id": "tn_1",
        "run_id": run_id,
        "created_at": datetime(2026, 12, 7, 18, 0, 0, 123456, tzinfo=UTC),
        "payload": payload,
    }
    assert hashlib.sha256(event_leaf(**fields)).hexdigest() == event_hash(**fields)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(size=st.integers(0, 700), extra=st.integers(0, 50))
def test_root_at_a_size_while_walking(size: int, extra: int) -> None:
    _, hashes = nodes_for(size + extra)
    walker = RootAt(size)
    for x in hashes:
        walker.add(x)
    assert walker.root == root_from_leaves(hashes[:size])
