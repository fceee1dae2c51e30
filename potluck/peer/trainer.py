"""The volunteer's local work for one round: inner AdamW steps from the master state, then the encoded delta.

The model and its AdamW state live across rounds (DiLoCo keeps each worker's inner optimizer); at
the start of a round the model is reset to the master parameters. The inner learning-rate schedule
follows the run's global step (round x local steps + step), so a late joiner picks up the schedule
where the run is. Each peer draws its own batches: the sampler's seed mixes the run seed with the
peer's public key, so two volunteers never train on the same sequence of windows.
"""

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from potluck.protocol.codecs import NonFiniteError, make_codec
from potluck.protocol.config import RunConfig
from potluck.training.data import BatchSampler, load_corpus
from potluck.training.diloco import inner_lr, inner_step, load_params, make_inner_optimizer, snapshot
from potluck.training.models import build_model, model_config


class TrainingDiverged(Exception):
    """Local training produced non-finite values: nothing sensible can be sent (one line, for the user)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundWork:
    """What one round of local training produced."""

    payload: bytes  # the encoded pseudo-gradient
    tokens: int
    inner_steps: int
    mean_loss: float  # mean training loss over the round's inner steps
    compute_s: float  # wall time of training and encoding


def sampler_seed(run_seed: int, public_key: bytes) -> int:
    """A per-peer data seed: the run's seed mixed with the peer's key (non-negative, 62 bits)."""
    mix = hashlib.sha256(run_seed.to_bytes(8, "big") + public_key).digest()
    return int.from_bytes(mix[:8], "big") >> 2


class LocalTrainer:
    """A peer's model, inner optimizer, data stream and error-feedback residual."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        public_key: bytes,
        device: torch.device,
        data_source: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        model_cfg = model_config(cfg.model.size, block_size=cfg.model.block_size)
        self.block_size = model_cfg.block_size
        self.batch_size = batch_size or cfg.inner.batch_size
        self.model = build_model(model_cfg, seed=cfg.seed, device=device)
        self.optimizer = make_inner_optimizer(
            self.model, lr=cfg.inner.lr, betas=(cfg.inner.beta1, cfg.inner.beta2), weight_decay=cfg.inner.weight_decay
        )
        corpus = load_corpus(
            data_source or cfg.data.source, val_fraction=cfg.data.val_fraction, max_bytes=cfg.data.max_bytes
        )
        self.sampler = BatchSampler(
            corpus.train,
            batch_size=self.batch_size,
            block_size=self.block_size,
            shard=0,
            num_shards=1,
            seed=sampler_seed(cfg.seed, public_key),
        )
        self.codec = make_codec(cfg.codec.name, cfg.codec.params)
        self.residual: dict[str, torch.Tensor] = {}

    def train_round(
        self,
        master: dict[str, torch.Tensor],
        *,
        round_index: int,
        time_budget_s: float,
        on_step: Callable[[int, int], None] | None = None,
    ) -> RoundWork:
        """Train up to the run's local steps from `master` (or fewer when `time_budget_s` runs out); encode."""
        started = time.perf_counter()
        cfg = self.cfg
        load_params(self.model, master)
        losses = []
        for local in range(cfg.local_steps):
            step = round_index * cfg.local_steps + local
            lr = inner_lr(
                min(step, cfg.rounds * cfg.local_steps - 1),
                total_steps=cfg.rounds * cfg.local_steps,
                peak_lr=cfg.inner.lr,
                warmup_steps=cfg.inner.warmup_steps,
                min_lr_ratio=cfg.inner.min_lr_ratio,
            )
            loss = inner_step(
                self.model,
                self.optimizer,
                self.sampler.next_batch(),
                lr=lr,
                grad_clip=cfg.inner.grad_clip,
                autocast=True,
            )
            losses.append(loss)
            if on_step is not None:
                on_step(local + 1, cfg.local_steps)
            if local + 1 < cfg.local_steps and time.perf_counter() - started > time_budget_s:
                break  # a slow peer sends what it has rather than miss the round
        current = snapshot(self.model, device="cpu")
        delta = {name: master[name] - current[name] for name in master}
        try:
            payload = self.codec.encode(delta, self.residual)
        except NonFiniteError:
            raise TrainingDiverged(
                f"local training diverged in round {round_index} (mean loss {math.fsum(losses) / len(losses):.4g}): "
                "the model's values are no longer finite; if the run's held-out loss blew up too, tell its operator"
            ) from None
        return RoundWork(
            payload=payload,
            tokens=len(losses) * self.batch_size * self.block_size,
            inner_steps=len(losses),
            mean_loss=math.fsum(losses) / len(losses),
            compute_s=time.perf_counter() - started,
        )

    def take_back(self, payload: bytes) -> None:
        """An update the aggregator refused: fold what it carried back into the residual, so it is sent later.

        The codec's error feedback already keeps what an update dropped; this keeps what it sent, which
        the run never received. A late update's direction is still a descent direction for the next round.
        """
        spec = {name: tuple(t.shape) for name, t in self.model.named_parameters()}
        sent = self.codec.decode(payload, spec)
        for name, tensor in sent.items():
            if name in self.residual:
                self.residual[name].add_(tensor)
            else:
                self.residual[name] = tensor.clone()
