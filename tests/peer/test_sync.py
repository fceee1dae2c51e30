"""The peer leaves on the RUN_FINISHED code, not on words; strangers' announcements do not stop it joining."""

import asyncio
import warnings
from types import SimpleNamespace

import pytest

with warnings.catch_warnings():
    # `import hivemind` runs torch.jit.script, which recent torch deprecates with a warning of its own.
    warnings.simplefilter("ignore", DeprecationWarning)
    from hivemind.utils import ValueWithExpiration

from potluck.peer.options import PeerOptions, RunFinished
from potluck.peer.records import HeldOutScore, Tally
from potluck.peer.sync import Sync
from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.client import AggregatorRefused
from potluck.protocol.dht_schema import AGGREGATORS_KEY, AggregatorAnnouncement, sign_announcement
from potluck.protocol.identity import Identity, generate_identity, public_key_to_hex
from potluck.protocol.wire import RefusalCode
from tests.peer.test_discovery import announcement


def _retrying(refusal: AggregatorRefused) -> None:
    sync = Sync(
        None,  # type: ignore[arg-type]  # a refusal is judged before any node is asked
        generate_identity(),
        PeerOptions(join=(), reconnect_timeout_s=1.0),
        join_addrs=[],
        tally=Tally(),
        score=HeldOutScore(0),
        on_event=lambda _: None,
    )

    async def call() -> None:
        raise refusal

    asyncio.run(sync.retrying("submitting", call))


def test_run_finished_code_ends_the_peer_whatever_the_words() -> None:
    with pytest.raises(RunFinished):
        _retrying(AggregatorRefused("round 3 is still open", code=RefusalCode.RUN_FINISHED))


def test_words_alone_do_not_end_the_peer() -> None:
    with pytest.raises(AggregatorRefused):
        _retrying(AggregatorRefused("run 'x' has finished at round 3"))


class _DHT:
    """A DHT whose every lookup finds the same signed announcements."""

    def __init__(self, signed: list[tuple[AggregatorAnnouncement, Identity]]) -> None:
        entries = dict(sign_announcement(a, identity) for a, identity in signed)
        self.result = ValueWithExpiration({k: ValueWithExpiration(v, 2e9) for k, v in entries.items()}, 2e9)

    async def get(self, key: str, *, latest: bool) -> ValueWithExpiration:
        assert key == AGGREGATORS_KEY and latest
        return self.result


def test_a_joiner_picks_the_real_aggregator_among_strangers_of_another_version_and_run() -> None:
    # Prepare: two strangers announce after the real aggregator, one in a newer protocol, one another run
    real, newer, other_run = generate_identity(), generate_identity(), generate_identity()
    dht = _DHT(
        [
            (announcement(real), real),
            (announcement(newer, protocol_version=PROTOCOL_VERSION + 1, timestamp_s=1_700_000_100.0), newer),
            (announcement(other_run, run_id="other-run", timestamp_s=1_700_000_100.0), other_run),
        ]
    )
    sync = Sync(
        SimpleNamespace(dht=dht, p2p=None),  # type: ignore[arg-type]  # discovery asks only the DHT
        generate_identity(),
        PeerOptions(join=(), run="tiny-run", aggregator_keys=(public_key_to_hex(real.public_key),)),
        join_addrs=[],
        tally=Tally(),
        score=HeldOutScore(0),
        on_event=lambda _: None,
    )

    async def connect(chosen: AggregatorAnnouncement) -> bytes:
        return chosen.libp2p_peer_id

    sync.connect = connect  # type: ignore[method-assign,assignment]  # no libp2p here

    # Execute
    asyncio.run(sync.find_aggregator())

    # Assert
    assert sync.announcement is not None and sync.announcement.public_key == real.public_key
