"""RFC 6962 Merkle tree hashing, the append-only frontier, and proofs.

Each stored entry line is a leaf: ``leaf_hash(line) = SHA-256(0x00 || line)``; an inner
node is ``SHA-256(0x01 || left || right)``; a tree of ``n > 1`` leaves splits at the
largest power of two below ``n``; the empty tree's root is ``SHA-256(b"")`` (RFC 6962
section 2.1, RFC 9162 section 2.1).

:class:`MerkleFrontier` keeps only the roots of the perfect subtrees that make up the
tree so far (one per set bit of the size), so appending costs one leaf hash plus
amortised one node hash, and the root at any moment costs at most log2(n) node hashes:
a checkpoint never re-reads the log.

The proof functions take **leaf hashes** (32 bytes each, as returned by
:func:`leaf_hash`), not the entry lines, so a caller that already hashed the log does
not hash it again. Malformed proofs and out-of-range sizes raise
:class:`~ies_agent.evidence.errors.ProofError`; a well-formed proof that does not match
makes the ``verify_*`` functions return ``False``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from ies_agent.evidence.errors import ProofError

HASH_SIZE = 32
"""Bytes in a SHA-256 digest: every leaf, node and root."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""Root of the tree with no leaves."""

_sha256 = hashlib.sha256


def leaf_hash(line: bytes) -> bytes:
    """Return the RFC 6962 leaf hash of one entry line (without its newline)."""
    return _sha256(b"\x00" + line).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 hash of an inner node from its two children's hashes."""
    return _sha256(b"\x01" + left + right).digest()


class MerkleFrontier:
    """The right edge of an append-only Merkle tree: enough to append and take roots.

    ``_subtrees`` holds, from left to right, the roots of the perfect subtrees whose
    sizes are the set bits of ``size`` from the highest down.
    """

    __slots__ = ("_size", "_subtrees")

    def __init__(self) -> None:
        self._size = 0
        self._subtrees: list[bytes] = []

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash (32 bytes, from :func:`leaf_hash`)."""
        if len(leaf) != HASH_SIZE:
            raise ProofError(f"a leaf hash has {HASH_SIZE} bytes, got {len(leaf)}")
        subtrees = self._subtrees
        node = leaf
        # Every trailing one bit of the old size is a perfect subtree of the same
        # height as the carry: merge them, like binary addition.
        size = self._size
        while size & 1:
            node = _sha256(b"\x01" + subtrees.pop() + node).digest()
            size >>= 1
        subtrees.append(node)
        self._size += 1

    def root(self) -> bytes:
        """Return the root of the tree of the leaves appended so far (O(log n))."""
        if not self._subtrees:
            return EMPTY_ROOT
        subtrees = self._subtrees
        root = subtrees[-1]
        for left in reversed(subtrees[:-1]):
            root = _sha256(b"\x01" + left + root).digest()
        return root

    def copy(self) -> MerkleFrontier:
        """Return an independent copy (appending to one does not change the other)."""
        other = MerkleFrontier()
        other._size = self._size
        other._subtrees = list(self._subtrees)
        return other

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict: ``{"size": n, "subtrees": [base64, ...]}``."""
        return {
            "size": self._size,
            "subtrees": [base64.b64encode(h).decode("ascii") for h in self._subtrees],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MerkleFrontier:
        """Rebuild a frontier saved by :meth:`to_json`.

        Raises ``ProofError`` when the size is not a non-negative integer or the number
        of subtree hashes does not equal the number of set bits of the size.
        """
        size = data.get("size")
        raw = data.get("subtrees")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProofError(f"frontier size must be an integer >= 0, got {size!r}")
        if not isinstance(raw, list) or len(raw) != size.bit_count():
            raise ProofError(
                f"a frontier of size {size} holds {size.bit_count()} subtree hashes"
            )
        frontier = cls()
        frontier._size = size
        frontier._subtrees = [_decode_hash(item, "frontier subtree") for item in raw]
        return frontier


def root_from_leaves(leaves: Sequence[bytes]) -> bytes:
    """Return the root of the tree over ``leaves`` (leaf hashes), O(n)."""
    frontier = MerkleFrontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """Return the audit path of leaf ``index`` in the tree of the first ``size`` leaves.

    ``leaves`` are leaf hashes; ``0 <= index < size <= len(leaves)`` or ``ProofError``.
    """
    if not 0 <= index < size <= len(leaves):
        raise ProofError(
            f"no inclusion proof for leaf {index} in a tree of {size} "
            f"(have {len(leaves)} leaves)"
        )
    proof: list[bytes] = []
    _path(leaves, index, 0, size, proof)
    return proof


def _largest_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def _subtree_root(leaves: Sequence[bytes], start: int, end: int) -> bytes:
    frontier = MerkleFrontier()
    for position in range(start, end):
        frontier.append(leaves[position])
    return frontier.root()


def _path(
    leaves: Sequence[bytes], index: int, start: int, end: int, proof: list[bytes]
) -> None:
    # RFC 6962 section 2.1.1 PATH(m, D[start:end]), appended leaf-side first.
    if end - start <= 1:
        return
    split = start + _largest_power_of_two_below(end - start)
    if index < split:
        _path(leaves, index, start, split, proof)
        proof.append(_subtree_root(leaves, split, end))
    else:
        _path(leaves, index, split, end, proof)
        proof.append(_subtree_root(leaves, start, split))


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Tell whether ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree of
    ``size`` leaves with root ``root`` (RFC 9162 section 2.1.3.2).

    Raises ``ProofError`` for an index outside the tree or hashes of the wrong length;
    returns ``False`` for a proof of the wrong length or one that leads elsewhere.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    for item in (leaf, root, *proof):
        if len(item) != HASH_SIZE:
            raise ProofError(f"a hash has {HASH_SIZE} bytes, got {len(item)}")
    fn, sn = index, size - 1
    node = leaf
    for sibling in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and node == root


def consistency_proof(
    leaves: Sequence[bytes], old_size: int, new_size: int
) -> list[bytes]:
    """Return the proof that the tree of ``old_size`` leaves is a prefix of the tree of
    ``new_size`` leaves (RFC 6962 section 2.1.2); ``leaves`` are leaf hashes.

    Raises ``ProofError`` unless ``0 <= old_size <= new_size <= len(leaves)``. The proof
    between equal sizes, or from the empty tree, is empty.
    """
    if not 0 <= old_size <= new_size <= len(leaves):
        raise ProofError(
            f"no consistency proof from {old_size} to {new_size} leaves "
            f"(have {len(leaves)} leaves)"
        )
    proof: list[bytes] = []
    if 0 < old_size < new_size:
        _subproof(leaves, old_size, 0, new_size, True, proof)
    return proof


def _subproof(
    leaves: Sequence[bytes],
    m: int,
    start: int,
    end: int,
    complete: bool,
    proof: list[bytes],
) -> None:
    # RFC 6962 section 2.1.2 SUBPROOF(m, D[start:end], b); m counts from ``start``.
    n = end - start
    if m == n:
        if not complete:
            proof.append(_subtree_root(leaves, start, end))
        return
    split = _largest_power_of_two_below(n)
    if m <= split:
        _subproof(leaves, m, start, start + split, complete, proof)
        proof.append(_subtree_root(leaves, start + split, end))
    else:
        _subproof(leaves, m - split, start + split, end, False, proof)
        proof.append(_subtree_root(leaves, start, start + split))


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Tell whether ``proof`` shows the tree (``old_size``, ``old_root``) is a prefix of
    the tree (``new_size``, ``new_root``) (RFC 9162 section 2.1.4.2).

    Raises ``ProofError`` for sizes out of order or hashes of the wrong length.
    """
    if not 0 <= old_size <= new_size:
        raise ProofError(f"sizes out of order: {old_size} then {new_size}")
    for item in (old_root, new_root, *proof):
        if len(item) != HASH_SIZE:
            raise ProofError(f"a hash has {HASH_SIZE} bytes, got {len(item)}")
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    path = list(proof)
    # When the old tree is a perfect subtree at the left edge, its root is the
    # implicit first element of the proof.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for sibling in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(sibling, fr)
            sr = node_hash(sibling, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


def _decode_hash(item: Any, what: str) -> bytes:
    if not isinstance(item, str):
        raise ProofError(f"{what} must be a base64 string, got {type(item).__name__}")
    try:
        value = base64.b64decode(item, validate=True)
    except ValueError:
        raise ProofError(f"{what} is not valid base64: {item!r}") from None
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} has {len(value)} bytes, a SHA-256 hash has 32")
    return value


def decode_hash(item: Any, what: str = "hash") -> bytes:
    """Decode one base64 SHA-256 hash from JSON input; ``ProofError`` if malformed.

    ``what`` names the field in the error message (e.g. ``"proof[2]"``).
    """
    return _decode_hash(item, what)
