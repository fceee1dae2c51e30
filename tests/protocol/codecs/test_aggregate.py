"""The aggregator's side: weighted mean, and one compressed aggregate every replica applies alike."""

import pytest
import torch

from potluck.protocol.codecs import encode_aggregate, make_codec, spec_of
from potluck.training.combine import weighted_mean


def _updates(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(64, 40, generator=gen), "b": torch.randn(40, generator=gen)} for _ in range(count)]


def test_weighted_mean() -> None:
    # Prepare
    updates = _updates(3)
    # Execute
    mean = weighted_mean(updates, [1.0, 3.0, 0.0])
    # Assert: the zero-weight update does not count
    for k in mean:
        assert torch.allclose(mean[k], (updates[0][k] + 3 * updates[1][k]) / 4, atol=1e-6)
    assert list(mean) == ["w", "b"]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "one weight per update"),
        ([0.0, 0.0], "not all zero"),
        ([1.0, -1.0], "non-negative"),
        ([1.0, float("inf")], "finite"),
    ],
)
def test_weighted_mean_refuses_bad_weights(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_mean(_updates(2), weights)


def test_weighted_mean_refuses_mismatched_updates() -> None:
    a, b = _updates(2)
    with pytest.raises(ValueError, match="update 1"):
        weighted_mean([a, {"w": b["w"]}], [1.0, 1.0])
    with pytest.raises(ValueError, match="update 1"):
        weighted_mean([a, {"w": b["w"], "b": torch.zeros(41)}], [1.0, 1.0])


def test_the_aggregate_is_one_upload_in_size_whatever_the_number_of_peers() -> None:
    # Prepare
    codec = make_codec("dct-topk")
    sizes = {}
    for peers in (2, 16):
        uploads = [codec.encode(u, {}) for u in _updates(peers, seed=peers)]
        spec = spec_of(_updates(1)[0])
        mean = weighted_mean([codec.decode(p, spec) for p in uploads], [1.0] * peers)
        # Execute
        sizes[peers] = len(encode_aggregate(mean, codec=codec, state={}))
    # Assert: the streams are data-dependent by a few bytes only; never over the codec's bound
    assert abs(sizes[2] - sizes[16]) <= 16
    assert max(sizes.values()) <= codec.max_payload_bytes(spec)


def test_every_replica_applies_the_same_bits_and_the_aggregator_keeps_the_residual() -> None:
    # Prepare: an aggregator and two peers, each with its own codec object
    aggregator, peer_a, peer_b = (make_codec("dct-topk") for _ in range(3))
    spec, residual = spec_of(_updates(1)[0]), {}
    # Execute: three rounds
    for round_index in range(3):
        mean = weighted_mean(_updates(4, seed=round_index), [1.0, 2.0, 3.0, 4.0])
        payload = encode_aggregate(mean, codec=aggregator, state=residual)
        applied = [c.decode(payload, spec) for c in (aggregator, peer_a, peer_b)]
        # Assert
        for k in spec:
            assert torch.equal(applied[0][k], applied[1][k]) and torch.equal(applied[0][k], applied[2][k])
        assert set(residual) == set(spec) and float(residual["w"].norm()) > 0
