"""Merkle roots over content hashes: what a `data-batch` record commits to (docs/data.md, docs/chain.md).

A binary SHA-256 tree over 32-byte leaves (the feedback examples' content hashes, in commit order):
- leaf node = sha256(0x00 || hash), inner node = sha256(0x01 || left || right). The two domains differ, so
  an inner node can never be passed off as a leaf (nor a leaf as an inner node): the second-preimage trick
  that proves a 64-byte "leaf" made of two child hashes does not work.
- A level with an odd count promotes its last node unchanged to the next level (no duplicate, so [a, b, c]
  and [a, b, c, c] have different roots).
- Order matters: the same hashes in another order give another root (a batch is a list, not a set).
- An empty list has no root: refused with ValueError, like a leaf that is not 32 bytes.

A proof is the list of siblings from the leaf up, each tagged with its side ("left": the sibling is the left
child, so the parent is H(0x01 || sibling || node); "right": the reverse). Levels where the node was
promoted contribute no step. verify_proof never raises on a malformed proof: it answers False.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_BYTES = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
LEFT, RIGHT = "left", "right"


def _leaf(content_hash: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + content_hash).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _leaf_level(leaves: Sequence[bytes]) -> list[bytes]:
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, (bytes, bytearray)) or len(leaf) != HASH_BYTES:
            raise ValueError(f"leaf {i} is not a {HASH_BYTES}-byte hash")
    return [_leaf(bytes(leaf)) for leaf in leaves]


def _parent_level(level: list[bytes]) -> list[bytes]:
    parents = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        parents.append(level[-1])
    return parents


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root of the tree over `leaves` (32-byte hashes, in order). ValueError: empty or a bad leaf."""
    level = _leaf_level(leaves)
    while len(level) > 1:
        level = _parent_level(level)
    return level[0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[tuple[str, bytes]]:
    """The siblings that lead from leaf `index` to the root, each with its side ("left" or "right")."""
    level = _leaf_level(leaves)
    if not isinstance(index, int) or not 0 <= index < len(level):
        raise ValueError(f"leaf index {index!r} is outside 0..{len(level) - 1}")
    proof: list[tuple[str, bytes]] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append((LEFT if sibling < index else RIGHT, level[sibling]))
        level = _parent_level(level)
        index //= 2
    return proof


def verify_proof(leaf: bytes, proof: Sequence[tuple[str, bytes]], root: bytes) -> bool:
    """Whether `proof` leads from the content hash `leaf` to `root`."""
    if not isinstance(leaf, (bytes, bytearray)) or len(leaf) != HASH_BYTES:
        return False
    node = _leaf(bytes(leaf))
    for step in proof:
        if not isinstance(step, (tuple, list)) or len(step) != 2:
            return False
        side, sibling = step
        if not isinstance(sibling, (bytes, bytearray)) or len(sibling) != HASH_BYTES:
            return False
        if side == LEFT:
            node = _node(bytes(sibling), node)
        elif side == RIGHT:
            node = _node(node, bytes(sibling))
        else:
            return False
    return node == root
