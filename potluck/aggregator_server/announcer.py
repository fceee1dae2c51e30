"""What an aggregator tells the DHT: where it is and which round it is at, whose keys it banned, what it holds.

Peers find the run's aggregators by their signed announcements (dht_schema.py), re-published every
`every_s` with a TTL of ANNOUNCE_TTL_S so a dead one drops out. With them go the run-wide bans
(ban_records.py): each aggregator publishes the keys it banned and bans the keys the run's other
aggregators did. A standby also says which version of its shard it holds (holder_records.py), so
joiners may fetch chunks from it.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from potluck.aggregator_server.reputation import BanFileError, Reputation
from potluck.protocol.ban_records import BANS_KEY, BanList, BanRecordError, parse_ban_lists, sign_ban_list
from potluck.protocol.config import RunConfig
from potluck.protocol.dht_schema import AGGREGATORS_KEY, MAX_MADDRS, AggregatorAnnouncement, sign_announcement
from potluck.protocol.envelope import MAX_AGGREGATE_ENVELOPE_BYTES, SignedAggregate
from potluck.protocol.holder_records import HolderRecord, store_holder_record
from potluck.protocol.identity import Identity, fingerprint, public_key_from_hex
from potluck.protocol.messages import unpack_envelope
from potluck.protocol.node import Node

logger = logging.getLogger(__name__)

ANNOUNCE_TTL_S = 60.0
RUN_WIDE = "run-wide, "  # how a ban learned from another aggregator of the run reads (for people, not code)


class Announcer:
    """Publishes this aggregator's records on the DHT and learns the run's other aggregators' bans."""

    def __init__(
        self,
        cfg: RunConfig,
        identity: Identity,
        *,
        reputation: Reputation,
        ban: Callable[[bytes, str, bytes], Awaitable[None]],
        every_s: float,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.reputation = reputation
        self.ban = ban  # (key, reason, issuer): bans a key learned from another aggregator (lock, event, wake)
        self.every_s = every_s

    async def announce_forever(
        self, node: Node, *, peer_id: bytes, maddrs: Sequence[str], round: Callable[[], int]
    ) -> None:
        """Announce this aggregator (at the round `round()` says) and share bans every `every_s`, until cancelled."""
        from hivemind.utils import get_dht_time

        while True:
            announcement = AggregatorAnnouncement(
                run_id=self.cfg.run_name,
                config_hash=self.cfg.config_hash,
                public_key=self.identity.public_key,
                libp2p_peer_id=peer_id,
                maddrs=tuple(maddrs[:16]),
                round=round(),
                timestamp_s=time.time(),
            )
            subkey, value = sign_announcement(announcement, self.identity)
            try:
                await node.dht.store(AGGREGATORS_KEY, value, get_dht_time() + ANNOUNCE_TTL_S, subkey=subkey)
                await self.share_bans(node)
            except (BanFileError, BanRecordError) as e:
                logger.error("run-wide bans not shared: %s", e)
            except Exception as e:  # the DHT may be alone (no other node yet): log, try again later
                logger.debug("DHT announcement failed: %s", e)
            await asyncio.sleep(self.every_s)

    async def share_bans(self, node: Node) -> None:
        """Publish the keys this aggregator banned (ban_records.py); ban the keys the run's other aggregators did.

        A ban learned this way records its issuer, says so in its reason, is not published again, and comes
        back while its issuer still lists it: lift it on the aggregator that banned it.
        """
        from hivemind.utils import get_dht_time

        bans = list(self.reputation.bans.values())  # one copy: a round's close may strike meanwhile
        own = tuple((b.public_key, b.reason) for b in bans if b.issuer is None)
        if own:
            ban_list = BanList(
                issuer=self.identity.public_key, config_hash=self.cfg.config_hash, bans=own, timestamp_s=time.time()
            )
            subkey, value = sign_ban_list(ban_list, self.identity)
            await node.dht.store(BANS_KEY, value, get_dht_time() + ANNOUNCE_TTL_S, subkey=subkey)
        others = frozenset(public_key_from_hex(k) for k in self.cfg.aggregator_keys) - {self.identity.public_key}
        if not others:
            return
        found = await node.dht.get(BANS_KEY, latest=True)
        for ban_list in parse_ban_lists(found, config_hash=self.cfg.config_hash, trusted=others):
            for key, reason in ban_list.bans:
                if not self.reputation.is_banned(key):
                    learned = f"{RUN_WIDE}by aggregator {fingerprint(ban_list.issuer)}: {reason}"
                    await self.ban(key, learned, ban_list.issuer)

    async def announce_holding(
        self,
        node: Node,
        *,
        peer_id: bytes,
        maddrs: Sequence[str],
        shard: int,
        version: int,
        made_by: bytes | None,
    ) -> None:
        """Tell joiners this aggregator holds `version` of `shard` (a standby's copy): they may fetch chunks here.

        `made_by`: the aggregate (envelope and payload, checked by the standby) that made `version`, None
        for a downloaded state; the count of contributors it lists says where the record goes.
        """
        contributors = 0
        if made_by is not None:
            envelope, _ = unpack_envelope(made_by, max_envelope_bytes=MAX_AGGREGATE_ENVELOPE_BYTES)
            contributors = len(SignedAggregate.from_bytes(envelope).header.contributors)
        record = HolderRecord(
            holder=self.identity.public_key,
            libp2p_peer_id=peer_id,
            maddrs=tuple(maddrs[:MAX_MADDRS]),
            config_hash=self.cfg.config_hash,
            shards=((shard, version),),
            timestamp_s=time.time(),
        )
        await store_holder_record(
            node.dht,
            record,
            self.identity,
            ttl_s=2 * self.cfg.round_deadline_s + 60,
            contributors={shard: contributors},
        )
