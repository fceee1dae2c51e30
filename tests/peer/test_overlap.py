"""An overlapped peer trains from its guess of the next master state (the outer step on what it sent), at most
its overlap limit ahead of the base, and lowers the limit after a mostly stale update is dropped."""

import threading

import torch

from potluck.peer.overlap import RoundPacer, guess_next_state
from potluck.peer.records import Master, Shard
from potluck.peer.trainer import LocalTrainer
from potluck.protocol.config import RunConfig
from potluck.protocol.density import round_codecs
from potluck.training.diloco import OuterOptimizer, snapshot

CFG = RunConfig(local_steps=3, rounds=4, inner={"warmup_steps": 1, "batch_size": 4}, data={"max_bytes": 300_000})


def _master(params: dict[str, torch.Tensor], cuts: list[tuple[str, ...]]) -> Master:
    """A peer's copy of the master state, cut into shards that each have an outer optimizer with momentum."""
    shards = []
    for index, names in enumerate(cuts):
        outer = OuterOptimizer(kind="nesterov", lr=CFG.outer.lr, momentum=CFG.outer.momentum)
        outer.load_state_dict({name: torch.full_like(params[name], 1e-3) for name in names})
        shard = Shard(
            index=index,
            names=names,
            announcement=None,  # type: ignore[arg-type]  # the guess talks to no aggregator
            link=None,  # type: ignore[arg-type]
            version=0,
            outer=outer,
            density=1 / 64,
        )
        shards.append(shard)
    return Master(cfg=CFG, round=0, params=params, shards=shards)


def test_the_guess_is_each_shards_outer_step_on_the_update_as_sent_and_the_model_moves_onto_it() -> None:
    # Prepare: a trained round, encoded at 1/64 (most of the delta stays in the residual), in two shards
    trainer = LocalTrainer(CFG, public_key=b"\x07" * 32, device=torch.device("cpu"))
    params = snapshot(trainer.model, device="cpu")
    names = tuple(params)
    master = _master({n: t.clone() for n, t in params.items()}, [names[:3], names[3:]])
    trainer.start_round(master.params, round_index=0)
    trainer.train(max_steps=3)
    shot = trainer.take_snapshot()
    codecs = [round_codecs(CFG, s.density) for s in master.shards]
    shards = [(s.names, upload) for s, (upload, _) in zip(master.shards, codecs, strict=True)]
    works = trainer.encode_shards(shot, round_index=0, shards=shards)
    before = {n: t.clone() for n, t in master.params.items()}
    # Execute
    guess = guess_next_state(trainer, master, works, codecs, shot)
    # Assert: the outer step (momentum included) on the decoded payloads, not the snapshot; the master untouched
    for shard, work, (upload, _) in zip(master.shards, works, codecs, strict=True):
        part = {n: before[n] for n in shard.names}
        sent = upload.decode(work.payload, {n: tuple(t.shape) for n, t in part.items()})
        expected = shard.outer.preview(part, sent)
        for name in shard.names:
            torch.testing.assert_close(guess[name], expected[name])
    assert set(guess) == set(names)
    assert all(torch.equal(master.params[n], before[n]) for n in names)
    model = dict(trainer.model.named_parameters())
    for name in names:
        torch.testing.assert_close(model[name].detach(), guess[name])
    assert any(not torch.allclose(guess[n], shot.current[n]) for n in names)  # the residual is not in it


class _Arrival(threading.Event):
    """The base's arrival as the training thread sees it: a wait notes how far ahead it got, then the base comes."""

    def __init__(self, trainer: LocalTrainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.waited_at: list[int] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waited_at.append(self.trainer.round_steps)
        self.set()
        return True


def test_at_its_overlap_limit_a_peer_waits_for_the_rounds_base_then_trains_the_round_out() -> None:
    # Prepare: a peer whose overlapped steps may run half a round (of 4 steps) ahead of their base
    cfg = CFG.with_overrides({"local_steps": 4}, source="test")
    trainer = LocalTrainer(cfg, public_key=b"\x08" * 32, device=torch.device("cpu"))
    trainer.start_round(snapshot(trainer.model, device="cpu"), round_index=0)
    pacer = RoundPacer(trainer, cfg, overlap=True, overlap_limit=0.5)
    pacer.base_arrived = _Arrival(trainer)  # the base is in flight
    pacer.round_opened = None
    # Execute
    trainer.train(max_steps=cfg.local_steps, stop=pacer.time_box_full)
    # Assert: it stopped to wait once, two steps ahead, and took the other two after the base came
    assert pacer.base_arrived.waited_at == [2]
    assert trainer.round_steps == 4


def _overlapped_pacer(limit: float = 1.0, *, overlap: bool = True) -> RoundPacer:
    cfg = CFG.with_overrides({"local_steps": 30}, source="test")
    trainer = LocalTrainer(cfg, public_key=b"\x09" * 32, device=torch.device("cpu"))
    return RoundPacer(trainer, cfg, overlap=overlap, overlap_limit=limit)


def test_after_a_mostly_stale_update_is_dropped_the_peer_lets_at_most_half_a_round_run_ahead() -> None:
    pacer = _overlapped_pacer()
    assert pacer.stale_limit() == 30

    pacer.after_drop(4, stale_steps=16, inner_steps=30)

    assert pacer.stale_limit() == 15


def test_a_drop_of_a_mostly_fresh_update_or_without_overlap_leaves_the_limit_alone() -> None:
    fresh, tighter, plain = _overlapped_pacer(), _overlapped_pacer(0.3), _overlapped_pacer(overlap=False)

    fresh.after_drop(4, stale_steps=15, inner_steps=30)  # half stale: the check drops no honest update there
    tighter.after_drop(4, stale_steps=30, inner_steps=30)  # already below the safe limit: never raised
    plain.after_drop(4, stale_steps=30, inner_steps=30)

    assert (fresh.stale_limit(), tighter.stale_limit(), plain.stale_limit()) == (30, 9, 30)
