"""The root of a Merkle tree's first ``size`` leaves, fed one leaf hash at a time (pure).

Keeps only the complete subtrees on the right edge (O(log n) hashes), so a verifier
that walks a whole chain gets the root at a checkpoint's size as it passes."""

from __future__ import annotations

from ledger.merkle import EMPTY_ROOT, node_hash

__all__ = ["RootAt", "compact_root"]


def compact_root(edge: list[bytes]) -> bytes:
    """The root from the right edge's subtree hashes, largest first."""
    if not edge:
        return EMPTY_ROOT
    root = edge[-1]
    for h in reversed(edge[:-1]):
        root = node_hash(h, root)
    return root


class RootAt:
    """Feed leaf hashes in order; ``root`` is the root once ``size`` leaves were fed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.count = 0
        self.edge: list[tuple[int, bytes]] = []  # (level, hash), largest first
        self.root: bytes | None = EMPTY_ROOT if size == 0 else None

    def add(self, leaf: bytes) -> None:
        if self.count >= self.size:
            return
        level, h = 0, leaf
        while self.edge and self.edge[-1][0] == level:
            _, left = self.edge.pop()
            level, h = level + 1, node_hash(left, h)
        self.edge.append((level, h))
        self.count += 1
        if self.count == self.size:
            self.root = compact_root([x for _, x in self.edge])
