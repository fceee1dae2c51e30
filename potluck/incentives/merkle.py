"""A Merkle tree over the updates an aggregate combines, so that one root commits to exactly that set.

Leaves are 32-byte hashes (each update's `UpdateHeader.digest()`). A peer holding a proof can show
that its update is in the aggregate whose root the aggregator signed, without the full list.

Choices, all fixed: changing one changes every root.

- Leaves are sorted (bytewise) inside `merkle_root` and `merkle_proof`, so the root does not depend
  on the order updates arrived in; callers pass leaves in any order. Duplicates are refused: an
  update combined twice is a bug upstream, and a duplicate would make a leaf's position ambiguous.
- Hashing is domain-separated as in RFC 6962 (Certificate Transparency): a leaf is
  sha256(0x00 || leaf), an inner node sha256(0x01 || left || right). A leaf hash can never pass for
  an inner node, so no second preimage can claim that an inner node is a leaf.
- A level with an odd number of nodes promotes its last node unchanged to the next level (rather
  than pairing it with itself as Bitcoin does, which lets [a, b, c] and [a, b, c, c] share a root).
  The resulting tree has the same shape as RFC 6962's, so the root of sorted leaves equals RFC 6962's
  Merkle Tree Hash of them.
- A proof names its leaf's position and the tree's size; these fix which side each sibling is on
  and at which levels there is no sibling, so every (leaf, tree) pair has exactly one valid proof.
"""

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

LEAF_BYTES = 32
MAX_PROOF_DEPTH = 64  # a tree of fewer than 2^64 leaves is at most 64 levels deep
_MAX_LEAF_COUNT = 2**64 - 1  # leaf_index and leaf_count travel as uint64
_PROOF_VERSION = 1
_PROOF_PREFIX_BYTES = 1 + 8 + 8  # version, leaf_index, leaf_count
_MAX_PROOF_BYTES = _PROOF_PREFIX_BYTES + MAX_PROOF_DEPTH * LEAF_BYTES


@dataclass(frozen=True, kw_only=True, slots=True)
class ProofStep:
    """One level of a proof: the sibling to hash with, and on which side it sits."""

    sibling: bytes  # the sibling node's 32-byte hash
    sibling_is_left: bool  # True: parent = node(sibling, current); False: node(current, sibling)

    def __post_init__(self) -> None:
        if not (isinstance(self.sibling, bytes) and len(self.sibling) == LEAF_BYTES):
            raise ValueError(f"a proof step's sibling is a {LEAF_BYTES}-byte hash, got {self.sibling!r:.80}")
        if type(self.sibling_is_left) is not bool:
            raise ValueError(f"sibling_is_left must be True or False, got {self.sibling_is_left!r:.40}")


@dataclass(frozen=True, kw_only=True, slots=True)
class MerkleProof:
    """The path from one leaf to the root; its steps must have the shape that leaf_index and leaf_count fix."""

    leaf_index: int  # the leaf's position among the sorted leaves
    leaf_count: int  # how many leaves the tree has
    steps: tuple[ProofStep, ...]  # from the leaf's level up; promoted levels have no step

    def __post_init__(self) -> None:
        for name in ("leaf_index", "leaf_count"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= _MAX_LEAF_COUNT:
                raise ValueError(f"{name} must be an integer in [0, 2^64), got {value!r:.40}")
        if not self.leaf_index < self.leaf_count:
            raise ValueError(f"leaf_index {self.leaf_index} is outside a tree of {self.leaf_count} leaves")
        object.__setattr__(self, "steps", tuple(self.steps))
        if len(self.steps) > MAX_PROOF_DEPTH or not all(isinstance(s, ProofStep) for s in self.steps):
            raise ValueError(f"a proof has at most {MAX_PROOF_DEPTH} ProofSteps, got {len(self.steps)} steps")
        if [s.sibling_is_left for s in self.steps] != _directions(self.leaf_index, self.leaf_count):
            raise ValueError(
                f"the proof's steps do not have the shape of leaf {self.leaf_index} in a tree of {self.leaf_count}"
            )


def _leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _directions(index: int, count: int) -> list[bool]:
    """For each level with a sibling, whether the sibling is on the left, for leaf `index` of `count`."""
    directions = []
    while count > 1:
        promoted = index == count - 1 and count % 2 == 1
        if not promoted:
            directions.append(index % 2 == 1)
        index //= 2
        count = (count + 1) // 2
    return directions


def _sorted_leaves(leaves: Sequence[bytes]) -> list[bytes]:
    """The leaves in canonical (sorted) order; ValueError unless a non-empty set of 32-byte values."""
    if len(leaves) == 0:
        raise ValueError("a Merkle tree needs at least one leaf")
    for leaf in leaves:
        if not (isinstance(leaf, bytes) and len(leaf) == LEAF_BYTES):
            raise ValueError(f"a Merkle leaf is a {LEAF_BYTES}-byte hash, got {leaf!r:.80}")
    ordered = sorted(leaves)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a == b:
            raise ValueError(f"Merkle leaves must be unique; {a.hex()} appears more than once")
    return ordered


def _parent_level(level: list[bytes]) -> list[bytes]:
    parents = [_node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2 == 1:
        parents.append(level[-1])  # odd count: promote the last node unchanged
    return parents


class MerkleTree:
    """A tree built once over a fixed set of leaves: its root, and each leaf's proof in O(log n) hashes.

    An aggregator answers every contributor's receipt request from one closed round; building the tree
    once per round, not once per proof, keeps n receipts at O(n log n) instead of O(n^2).
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        ordered = _sorted_leaves(leaves)
        self._index = {leaf: i for i, leaf in enumerate(ordered)}
        self._levels = [[_leaf_hash(leaf) for leaf in ordered]]
        while len(self._levels[-1]) > 1:
            self._levels.append(_parent_level(self._levels[-1]))

    @property
    def root(self) -> bytes:
        """The 32-byte root (see the module docstring)."""
        return self._levels[-1][0]

    def proof(self, leaf: bytes) -> MerkleProof:
        """The proof that `leaf` is one of the tree's leaves; ValueError if it is not."""
        index = self._index.get(leaf)
        if index is None:
            raise ValueError(f"leaf {leaf!r:.80} is not among the {len(self._levels[0])} leaves")
        position, steps = index, []
        for level in self._levels[:-1]:
            sibling = position ^ 1
            if sibling < len(level):
                steps.append(ProofStep(sibling=level[sibling], sibling_is_left=sibling < position))
            position //= 2
        return MerkleProof(leaf_index=index, leaf_count=len(self._levels[0]), steps=tuple(steps))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The 32-byte root over `leaves` in any order (sorted inside); ValueError on empty, duplicate or bad leaves."""
    return MerkleTree(leaves).root


def merkle_proof(leaves: Sequence[bytes], leaf: bytes) -> MerkleProof:
    """The proof that `leaf` is one of `leaves` (in any order, sorted inside); ValueError if it is not."""
    return MerkleTree(leaves).proof(leaf)


def verify_proof(leaf: bytes, proof: MerkleProof, root: bytes) -> bool:
    """True if `proof` leads from `leaf` to `root`; False on anything else, including wrong types or lengths."""
    if not (isinstance(leaf, bytes) and isinstance(root, bytes) and isinstance(proof, MerkleProof)):
        return False
    if len(leaf) != LEAF_BYTES or len(root) != LEAF_BYTES:
        return False
    node = _leaf_hash(leaf)
    for step in proof.steps:
        node = _node_hash(step.sibling, node) if step.sibling_is_left else _node_hash(node, step.sibling)
    return hmac.compare_digest(node, root)


def proof_to_bytes(proof: MerkleProof) -> bytes:
    """Compact wire form: version (1 byte), leaf_index and leaf_count (uint64 big-endian), then the siblings.

    The sides are not sent: leaf_index and leaf_count fix them. At most 17 + 64 * 32 = 2065 bytes.
    """
    prefix = bytes([_PROOF_VERSION]) + proof.leaf_index.to_bytes(8, "big") + proof.leaf_count.to_bytes(8, "big")
    return prefix + b"".join(step.sibling for step in proof.steps)


def proof_from_bytes(data: bytes) -> MerkleProof:
    """Parse an untrusted proof (see proof_to_bytes); any problem is a one-line ValueError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"a Merkle proof must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not _PROOF_PREFIX_BYTES <= len(data) <= _MAX_PROOF_BYTES:
        raise ValueError(f"a Merkle proof is {_PROOF_PREFIX_BYTES} to {_MAX_PROOF_BYTES} bytes, got {len(data)}")
    if data[0] != _PROOF_VERSION:
        raise ValueError(f"Merkle proof version {data[0]} is not the supported version {_PROOF_VERSION}")
    index = int.from_bytes(data[1:9], "big")
    count = int.from_bytes(data[9:17], "big")
    body = data[_PROOF_PREFIX_BYTES:]
    if len(body) % LEAF_BYTES:
        raise ValueError(f"a Merkle proof's siblings are {LEAF_BYTES} bytes each; {len(body)} bytes is not a multiple")
    if not index < count:
        raise ValueError(f"Merkle proof names leaf {index} of a tree of {count} leaves")
    sides = _directions(index, count)
    siblings = [body[i : i + LEAF_BYTES] for i in range(0, len(body), LEAF_BYTES)]
    if len(siblings) != len(sides):
        raise ValueError(
            f"a Merkle proof for leaf {index} of {count} has {len(sides)} siblings, this one has {len(siblings)}"
        )
    steps = tuple(ProofStep(sibling=s, sibling_is_left=left) for s, left in zip(siblings, sides, strict=True))
    return MerkleProof(leaf_index=index, leaf_count=count, steps=steps)
