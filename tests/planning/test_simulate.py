"""The simulator's bookkeeping: equal tokens, byte accounting, arm parsing."""

import pytest
import torch

from potluck.planning.simulate import ddp_bytes_per_step, parse_arm, simulate
from potluck.protocol.config import MODEL_SIZES, RunConfig
from potluck.training.models import MODEL_SIZES as TRAINING_MODEL_SIZES


def _small_config(**overrides: object) -> RunConfig:
    base = {
        "rounds": 3,
        "local_steps": 2,
        "inner": {"warmup_steps": 1, "batch_size": 4},
        "model": {"size": "tiny", "block_size": 32},
        "data": {"max_bytes": 400_000},
    }
    return RunConfig.model_validate(base | overrides)


def test_one_peer_uncompressed_plain_averaging_is_exactly_ddp() -> None:
    # With one peer, codec none and the outer step "master -= delta", DiLoCo takes the same AdamW
    # steps on the same batches as DDP: any difference means the arms saw different tokens.
    cfg = _small_config(outer={"kind": "average"})
    result = simulate(cfg, peers=1, codecs=["none"], device=torch.device("cpu"), eval_batches=2)
    ddp, diloco = result.arms
    assert diloco.val_loss == pytest.approx(ddp.val_loss, rel=1e-5)
    assert diloco.val_loss_per_round == pytest.approx(ddp.val_loss_per_round, rel=1e-5)


def test_compressed_arms_report_their_real_wire_bytes() -> None:
    cfg = _small_config()
    result = simulate(cfg, peers=2, codecs=["none", "dct-topk"], device=torch.device("cpu"), eval_batches=2)
    ddp, none, sparse = result.arms
    # fp32 payload plus framing: a little over 4 bytes per parameter per round.
    per_round = none.upload_bytes_per_peer_per_step * cfg.local_steps
    assert 4 * result.num_params < per_round < 4 * result.num_params + 4096
    assert sparse.upload_bytes_per_peer_per_step < none.upload_bytes_per_peer_per_step / 50
    assert ddp.reduction_vs_ddp == 1.0
    assert sparse.reduction_vs_ddp == pytest.approx(
        ddp.upload_bytes_per_peer_per_step / sparse.upload_bytes_per_peer_per_step
    )
    assert result.tokens_per_arm == cfg.rounds * cfg.local_steps * 2 * cfg.inner.batch_size * 32


def test_download_only_params_change_only_the_download() -> None:
    cfg = _small_config(rounds=2)
    arms = ["dct-topk:down.density=0.015625", "dct-topk:down.density=0.25"]
    _, sparse, denser_down = simulate(cfg, peers=2, codecs=arms, device=torch.device("cpu"), eval_batches=1).arms
    assert denser_down.upload_bytes_per_peer_per_step == pytest.approx(sparse.upload_bytes_per_peer_per_step, rel=0.02)
    assert denser_down.download_bytes_per_param_per_round > 4 * sparse.download_bytes_per_param_per_round


def test_ring_allreduce_bytes() -> None:
    assert ddp_bytes_per_step(num_params=1000, peers=4) == 2 * 3 / 4 * 4 * 1000
    assert ddp_bytes_per_step(num_params=1000, peers=1) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", ("none", "none", {})),
        ("dct-topk:density=0.03:bits=4", ("dct-topk:density=0.03:bits=4", "dct-topk", {"density": 0.03, "bits": 4})),
        ("int8:scale_dtype=fp32", ("int8:scale_dtype=fp32", "int8", {"scale_dtype": "fp32"})),
        ("x:flag=true", ("x:flag=true", "x", {"flag": True})),
    ],
)
def test_parse_arm(text: str, expected: tuple) -> None:
    assert parse_arm(text) == expected


@pytest.mark.parametrize("text", ["dct-topk:density", ":density=1", "dct-topk:=3", "topk:bits="])
def test_parse_arm_refuses_junk(text: str) -> None:
    with pytest.raises(ValueError, match="codec arm"):
        parse_arm(text)


def test_config_and_training_agree_on_model_sizes() -> None:
    assert set(MODEL_SIZES) == set(TRAINING_MODEL_SIZES)
