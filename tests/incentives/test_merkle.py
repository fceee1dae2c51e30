"""The Merkle tree over an aggregate's updates: roots, proofs, their wire form, and hostile proof bytes."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from potluck.incentives.merkle import (
    MAX_PROOF_DEPTH,
    MerkleProof,
    ProofStep,
    merkle_proof,
    merkle_root,
    proof_from_bytes,
    proof_to_bytes,
    verify_proof,
)

LEAF_SETS = st.sets(st.binary(min_size=32, max_size=32), min_size=1, max_size=40).map(sorted)


def _leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(f"update {i}".encode()).digest() for i in range(n)]


def _rfc6962_root(leaves: list[bytes]) -> bytes:
    """RFC 6962's Merkle Tree Hash, written independently: split at the largest power of two below n."""
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while 2 * k < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc6962_root(leaves[:k]) + _rfc6962_root(leaves[k:])).digest()


def _flip(data: bytes, bit: int = 0) -> bytes:
    return bytes([data[0] ^ (1 << bit)]) + data[1:]


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_small_trees_hash_as_written_by_hand() -> None:
    # Prepare
    a, b, c = sorted(_leaves(3))
    ha, hb, hc = (_sha(b"\x00" + x) for x in (a, b, c))
    # Execute / Assert: one leaf is its leaf hash, never the raw leaf; an odd last node is promoted unchanged
    assert merkle_root([a]) == ha != a
    assert merkle_root([a, b]) == _sha(b"\x01" + ha + hb)
    assert merkle_root([a, b, c]) == _sha(b"\x01" + _sha(b"\x01" + ha + hb) + hc)


@pytest.mark.parametrize("n", range(1, 10))
def test_root_is_rfc6962s_tree_hash_of_the_sorted_leaves(n: int) -> None:
    # Prepare
    leaves = _leaves(n)
    # Execute
    root = merkle_root(leaves)
    # Assert
    assert root == _rfc6962_root(sorted(leaves))
    assert len(root) == 32


@pytest.mark.parametrize("n", range(1, 10))
def test_every_leafs_proof_verifies_and_survives_the_wire(n: int) -> None:
    # Prepare
    leaves = _leaves(n)
    root = merkle_root(leaves)
    for leaf in leaves:
        # Execute
        proof = merkle_proof(leaves, leaf)
        decoded = proof_from_bytes(proof_to_bytes(proof))
        # Assert
        assert verify_proof(leaf, proof, root)
        assert decoded == proof
        assert (proof.leaf_index, proof.leaf_count) == (sorted(leaves).index(leaf), n)


def test_a_flipped_bit_in_the_leaf_a_sibling_or_the_root_fails() -> None:
    # Prepare
    leaves = _leaves(7)
    root, leaf = merkle_root(leaves), leaves[3]
    proof = merkle_proof(leaves, leaf)
    assert verify_proof(leaf, proof, root)
    for i, step in enumerate(proof.steps):
        steps = list(proof.steps)
        steps[i] = ProofStep(sibling=_flip(step.sibling, bit=7), sibling_is_left=step.sibling_is_left)
        tampered = MerkleProof(leaf_index=proof.leaf_index, leaf_count=proof.leaf_count, steps=tuple(steps))
        # Execute / Assert
        assert not verify_proof(leaf, tampered, root)
    assert not verify_proof(_flip(leaf), proof, root)
    assert not verify_proof(leaf, proof, _flip(root))


def test_a_proof_proves_only_its_own_leaf() -> None:
    # Prepare
    leaves = _leaves(8)
    root = merkle_root(leaves)
    # Execute
    proof = merkle_proof(leaves, leaves[0])
    # Assert
    assert not any(verify_proof(other, proof, root) for other in leaves[1:])


def test_the_root_does_not_depend_on_arrival_order() -> None:
    # Prepare
    leaves = _leaves(9)
    # Execute / Assert
    assert merkle_root(leaves) == merkle_root(leaves[::-1]) == merkle_root(sorted(leaves))
    assert merkle_proof(leaves, leaves[4]) == merkle_proof(leaves[::-1], leaves[4])


def test_different_leaf_sets_have_different_roots() -> None:
    # Prepare: Bitcoin's duplicate-last-node rule gives [a, b, c] and [a, b, c, c] one root; promotion does not
    a, b, c, d = _leaves(4)
    # Execute / Assert
    assert len({merkle_root([a, b, c]), merkle_root([a, b, c, d]), merkle_root([a, b]), merkle_root([a])}) == 4


@pytest.mark.parametrize(
    "leaves",
    [[], [b"\x00" * 31], [b"\x00" * 33], ["ab" * 16], [bytearray(32)], [b"\x01" * 32, b"\x01" * 32]],
    ids=["empty", "short", "long", "text", "bytearray", "duplicate"],
)
def test_bad_leaf_sets_are_refused(leaves: list) -> None:
    with pytest.raises(ValueError):
        merkle_root(leaves)
    with pytest.raises(ValueError):
        merkle_proof(leaves, b"\x01" * 32)


def test_a_proof_for_a_leaf_outside_the_tree_is_refused() -> None:
    with pytest.raises(ValueError, match="not among the 3 leaves"):
        merkle_proof(_leaves(3), _leaves(4)[3])


def test_verify_answers_false_to_wrong_types_and_lengths() -> None:
    # Prepare
    leaves = _leaves(2)
    root, proof = merkle_root(leaves), merkle_proof(leaves, leaves[0])
    # Execute / Assert
    assert not verify_proof(leaves[0][:31], proof, root)
    assert not verify_proof(leaves[0], proof, root[:31])
    assert not verify_proof(leaves[0], proof_to_bytes(proof), root)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "index, count, sides",
    [
        (0, 1, [False]),
        (0, 2, []),
        (0, 2, [True]),
        (1, 2, [False]),
        (2, 3, [False]),
        (2, 3, []),
        (2, 2, []),
        (-1, 2, [False]),
    ],
)
def test_a_proof_whose_steps_do_not_fit_its_position_cannot_be_built(index: int, count: int, sides: list) -> None:
    steps = tuple(ProofStep(sibling=b"\x02" * 32, sibling_is_left=left) for left in sides)
    with pytest.raises(ValueError):
        MerkleProof(leaf_index=index, leaf_count=count, steps=steps)


def test_the_deepest_proof_has_64_steps_and_round_trips() -> None:
    # Prepare: leaf 0 of 2^64 - 1 leaves has a sibling at every one of its 64 levels
    steps = tuple(ProofStep(sibling=bytes([i]) * 32, sibling_is_left=False) for i in range(MAX_PROOF_DEPTH))
    proof = MerkleProof(leaf_index=0, leaf_count=2**64 - 1, steps=steps)
    # Execute
    data = proof_to_bytes(proof)
    # Assert
    assert len(data) == 17 + 64 * 32
    assert proof_from_bytes(data) == proof


def _wire(index: int, count: int, siblings: int, *, version: int = 1) -> bytes:
    return bytes([version]) + index.to_bytes(8, "big") + count.to_bytes(8, "big") + b"\x03" * 32 * siblings


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01" + b"\x00" * 15,
        _wire(0, 2, 1, version=2),
        _wire(0, 2, 1, version=0),
        _wire(0, 0, 0),
        _wire(2, 2, 1),
        _wire(0, 2, 0),
        _wire(0, 2, 2),
        _wire(0, 2, 1) + b"\x00",
        _wire(0, 1, 0) + b"\x00" * 31,
        _wire(0, 2**64 - 1, 65),
        _wire(0, 2**64 - 1, 64) + b"\x00" * 32,
    ],
    ids=[
        "empty",
        "truncated-prefix",
        "future-version",
        "version-0",
        "no-leaves",
        "index-past-end",
        "too-few-siblings",
        "too-many-siblings",
        "trailing-byte",
        "partial-sibling",
        "65-steps",
        "over-the-size-limit",
    ],
)
def test_malformed_proof_bytes_are_refused_in_one_line(data: bytes) -> None:
    with pytest.raises(ValueError) as caught:
        proof_from_bytes(data)
    assert "\n" not in str(caught.value)


def test_proof_bytes_must_be_bytes() -> None:
    with pytest.raises(ValueError, match="must be bytes"):
        proof_from_bytes("01" * 20)  # type: ignore[arg-type]


@given(leaves=LEAF_SETS, data=st.data())
def test_any_member_of_any_leaf_set_is_proven(leaves: list[bytes], data: st.DataObject) -> None:
    # Prepare
    leaf = data.draw(st.sampled_from(leaves))
    shuffled = data.draw(st.permutations(leaves))
    # Execute
    root = merkle_root(shuffled)
    proof = proof_from_bytes(proof_to_bytes(merkle_proof(shuffled, leaf)))
    # Assert
    assert root == merkle_root(leaves) == _rfc6962_root(leaves)
    assert verify_proof(leaf, proof, root)
    assert len(proof.steps) <= max(1, len(leaves) - 1).bit_length()


@st.composite
def _framed_proofs(draw: st.DrawFn) -> bytes:
    """Well-framed proof bytes with any position and about the right number of siblings, to get past the prefix."""
    count = draw(st.integers(0, 40) | st.integers(0, 2**64 - 1))
    index = draw(st.integers(0, max(count - 1, 0)) | st.integers(0, 2**64 - 1))
    siblings = max(0, (count - 1).bit_length() + draw(st.integers(-2, 1)))  # at most ceil(log2(count)) fit
    return _wire(index, count, min(siblings, 66)) + draw(st.sampled_from([b"", b"\x00"]))


HOSTILE_PROOFS = st.binary(max_size=2200) | _framed_proofs()


@given(data=HOSTILE_PROOFS)
def test_hostile_proof_bytes_raise_value_error_or_parse_canonically(data: bytes) -> None:
    try:
        proof = proof_from_bytes(data)
    except ValueError:
        return
    assert proof_to_bytes(proof) == data
