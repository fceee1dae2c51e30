"""Realistic aggregator and peer events for the web tests, as the nodes emit them."""

from typing import Any

from potluck.events import (
    AcceptedUpdate,
    AggregatorReady,
    Banned,
    Credit,
    Event,
    LedgerHead,
    PeerRound,
    PeerSynced,
    ReceiptReceived,
    RoundClosed,
    RoundOpened,
    Standing,
    UpdateReceived,
    UpdateRejected,
)

AGGREGATOR = "pl-aggr-aaaa-bbbb-cccc"
ALICE = "pl-alic-e222-3333-4444"
BOB = "pl-bobb-5555-6666-7777"
MALLORY = "pl-mall-ory2-3456-7abc"
KEYS = {ALICE: "a1" * 32, BOB: "b2" * 32, MALLORY: "c3" * 32}
MADDR = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWExample"
T0_S = 1_700_000_000.0  # the unix time the run's first round opens


def head(round_index: int) -> LedgerHead:
    """A ledger chain head after `round_index` closed."""
    return LedgerHead(
        round=round_index,
        last_row_id=2 * (round_index + 1),
        head_hash=f"{round_index:02d}" * 32,
        row_count=2 * (round_index + 1),
        timestamp_s=T0_S + 60 * (round_index + 1),
        aggregator_public_key="ee" * 32,
        signature="ff" * 64,
    )


def ready(**overrides: Any) -> AggregatorReady:
    """The aggregator's first event: a fresh run, ALICE already on the leaderboard from an earlier run."""
    fields: dict[str, Any] = {
        "maddrs": (MADDR, "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWExample"),
        "fingerprint": AGGREGATOR,
        "run": "tiny-stdlib",
        "config_hash": "c0" * 32,
        "round": 0,
        "resumed": False,
        "spooled_updates": 0,
        "val_loss": 5.5,
        "num_params": 1_234_567,
        "shard": 0,
        "shards": 1,
        "state_sha256": "5a" * 32,
        "rounds_total": 100,
        "round_deadline_s": 60.0,
        "model": "gpt-tiny",
        "codec": "topk-int8",
        "aggregate_codec": "int8",
        "density": 0.01,
        "leaderboard": (Standing(fingerprint=ALICE, public_key=KEYS[ALICE], points=10.0, accepted=2),),
        "ledger_head": None,
        "standby_of": None,
    }
    return AggregatorReady(**(fields | overrides))


def round_open(round_index: int, *, deadline_s: float = 60.0) -> RoundOpened:
    """Round `round_index` opens a minute after the previous one."""
    return RoundOpened(round=round_index, deadline_s=deadline_s, time_s=T0_S + 60 * round_index)


def received(who: str, round_index: int, *, accepted: bool = True, check: str | None = None) -> UpdateReceived:
    """An upload from `who`, judged on arrival."""
    return UpdateReceived(
        fingerprint=who,
        round=round_index,
        tokens=4096,
        bytes=50_000,
        accepted=accepted,
        check=check,
        time_s=T0_S + 60 * round_index + 10,
    )


def rejected(
    who: str, round_index: int, *, check: str = "norm", reason: str = "update norm 1e9 over 10x the median"
) -> UpdateRejected:
    """A rejection of `who`'s update by `check`."""
    return UpdateRejected(fingerprint=who, round=round_index, check=check, reason=reason, update="ab" * 8)


def closed(
    round_index: int, *, accepted: list[str], val_loss: float, rejected_count: int = 0, round_s: float = 40.0
) -> RoundClosed:
    """A round-close event crediting 1 point per 1024 tokens to each accepted peer."""
    return RoundClosed(
        round=round_index,
        closed_by="all-reported",
        val_loss=val_loss,
        accepted=tuple(
            AcceptedUpdate(fingerprint=who, tokens=4096, bytes=50_000, update="cd" * 8, credit=4.0) for who in accepted
        ),
        rejected=rejected_count,
        density=0.01,
        next_density=0.01,
        round_s=round_s,
        aggregation_s=0.5,
        aggregate_bytes=80_000,
        state_sha256=f"{round_index:02d}" * 32,
        tokens=4096 * len(accepted),
        time_s=T0_S + 60 * round_index + round_s,
        bytes_in=100_000 * (round_index + 1),
        bytes_out=300_000 * (round_index + 1),
        ledger_head=head(round_index),
        credits=tuple(Credit(fingerprint=who, public_key=KEYS[who], credit=4.0) for who in accepted),
    )


def two_rounds() -> list[Event]:
    """Round 0: ALICE and BOB accepted; round 1: ALICE accepted, MALLORY rejected then banned; round 2 opens."""
    return [
        ready(),
        round_open(0),
        received(ALICE, 0),
        received(BOB, 0),
        closed(0, accepted=[ALICE, BOB], val_loss=5.0),
        round_open(1),
        received(ALICE, 1),
        received(MALLORY, 1, accepted=False, check="norm"),
        rejected(MALLORY, 1),
        Banned(fingerprint=MALLORY, round=1, reason="3 strikes (norm)"),
        closed(1, accepted=[ALICE], val_loss=4.5, rejected_count=1, round_s=50.0),
        round_open(2),
    ]


def synced() -> PeerSynced:
    """ALICE joins at round 3."""
    return PeerSynced(
        run="tiny-stdlib",
        round=3,
        aggregator=AGGREGATOR,
        fingerprint=ALICE,
        state_bytes=9_000_000,
        state_sources={AGGREGATOR: 9_000_000},
        shards=1,
        val_loss=None,
    )


def peer_round(round_index: int, *, loss: float = 4.2, accepted: bool = True, reason: str = "") -> PeerRound:
    """One of ALICE's rounds; state_bytes_served is a running total (chunks given to a joiner in round 3)."""
    return PeerRound(
        round=round_index,
        loss=loss,
        val_loss=None,
        tokens=4096,
        inner_steps=8,
        stale_steps=0,
        tokens_per_s=800.0,
        accepted=accepted,
        reason=reason,
        update=("aa" if accepted else "bb") * 8,
        bytes_up=50_000,
        state_bytes_served=3_000_000,
        bytes_down=80_000,
        compute_s=5.0,
        encode_s=0.1,
        upload_s=1.0,
        wait_s=20.0,
        download_s=2.0,
        points=None,
        receipt_s=0.0,
        overlap=False,
        overlap_limit=1.0,
        shards=1,
    )


def peer_events() -> list[Event]:
    """A peer that joins at round 3, has round 3 accepted and round 4 rejected, and earns one receipt."""
    return [
        synced(),
        peer_round(3),
        ReceiptReceived(round=3, accepted=True, tokens_credited=4096, score=4.0, reason="", update="aa" * 8, shard=0),
        peer_round(4, loss=4.0, accepted=False, reason="stale: built on round 2"),
    ]
