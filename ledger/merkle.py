"""RFC 9162 section 2.1 Merkle trees: hashes, inclusion and consistency proofs (pure).

A tree of ``n`` leaves is addressed by its complete subtrees: node ``(level, index)``
is the hash of leaves ``[index * 2**level, (index + 1) * 2**level)``. Every hash a
root or a proof needs is such a node or is combined from a few of them, so a store
that keeps the complete subtrees (``NodeSource``) answers a proof in O(log n) reads.

Proof generation follows RFC 9162 2.1.3.1 (PATH) and 2.1.4.1 (SUBPROOF); the
verifiers are the algorithms of 2.1.3.2 and 2.1.4.2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "MerkleError",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "needed_nodes",
    "node_hash",
    "range_hash",
    "root_from_leaves",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()

# node (level, index) -> its 32-byte hash; must only be asked for complete subtrees.
NodeSource = Callable[[int, int], bytes]


class MerkleError(ValueError):
    """A proof that does not verify, or a request outside the tree."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(nodes: NodeSource, start: int, end: int) -> bytes:
    """MTH of leaves ``[start, end)`` where ``start`` is a multiple of the subtree's
    width (always so for the subtrees RFC 9162's recursion visits)."""
    n = end - start
    if n <= 0:
        raise MerkleError(f"empty range [{start}, {end})")
    if n & (n - 1) == 0 and start % n == 0:
        level = n.bit_length() - 1
        return nodes(level, start >> level)
    k = _split(n)
    return node_hash(range_hash(nodes, start, start + k), range_hash(nodes, start + k, end))


def tree_root(nodes: NodeSource, size: int) -> bytes:
    return EMPTY_ROOT if size == 0 else range_hash(nodes, 0, size)


def inclusion_proof(nodes: NodeSource, index: int, size: int) -> list[bytes]:
    """PATH(index, D[size]) of RFC 9162 2.1.3.1, leaf-side first."""
    if not 0 <= index < size:
        raise MerkleError(f"leaf index {index} is outside a tree of size {size}")
    proof: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            proof.append(range_hash(nodes, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(nodes, start, start + k))
            start += k
    return list(reversed(proof))


def consistency_proof(nodes: NodeSource, old: int, new: int) -> list[bytes]:
    """PROOF(old, D[new]) of RFC 9162 2.1.4.1 (empty when old is 0 or equals new)."""
    if not 0 <= old <= new:
        raise MerkleError(f"no consistency proof from size {old} to size {new}")
    if old in (0, new):
        return []
    proof: list[bytes] = []
    # SUBPROOF(m, D[start:end], b), iteratively; hashes are collected root-side first.
    start, end, m, whole = 0, new, old, True
    while True:
        n = end - start
        if m == n:
            if not whole:
                proof.append(range_hash(nodes, start, end))
            break
        k = _split(n)
        if m <= k:
            proof.append(range_hash(nodes, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(nodes, start, start + k))
            start, m, whole = start + k, m - k, False
    return list(reversed(proof))


def needed_nodes(build: Callable[[NodeSource], object]) -> set[tuple[int, int]]:
    """The complete subtrees that ``build`` reads (its reads never depend on the values),
    so that a store can fetch them all in one query before building for real."""
    wanted: set[tuple[int, int]] = set()

    def record(level: int, index: int) -> bytes:
        wanted.add((level, index))
        return b"\x00" * 32

    build(record)
    return wanted


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes held in memory (for verifiers and tests)."""
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise MerkleError(f"{what} is not a 32-byte hash")


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 2.1.3.2: raise MerkleError unless ``proof`` takes the leaf hash ``leaf``
    at ``index`` to ``root`` of a tree of ``size`` leaves."""
    _check_hash(leaf, "the leaf hash")
    _check_hash(root, "the root")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof[{i}]")
    if not 0 <= index < size:
        raise MerkleError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise MerkleError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise MerkleError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise MerkleError("inclusion proof does not lead to the root")


def verify_consistency(
    old: int, new: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """RFC 9162 2.1.4.2: raise MerkleError unless ``proof`` shows that the tree of
    ``old`` leaves with ``old_root`` is a prefix of the tree of ``new`` with ``new_root``."""
    _check_hash(old_root, "the old root")
    _check_hash(new_root, "the new root")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof[{i}]")
    if not 0 <= old <= new:
        raise MerkleError(f"size {old} is not within size {new}")
    if old == new:
        if proof:
            raise MerkleError("proof between equal sizes must be empty")
        if old_root != new_root:
            raise MerkleError("roots of equal sizes differ")
        return
    if old == 0:
        if proof:
            raise MerkleError("proof from the empty tree must be empty")
        return
    if not proof:
        raise MerkleError("consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:  # old is a power of two: its root is the first node
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise MerkleError("consistency proof is longer than needed")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise MerkleError("consistency proof is shorter than needed")
    if fr != old_root:
        raise MerkleError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise MerkleError("consistency proof does not lead to the new root")
