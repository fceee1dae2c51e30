"""RED TEAM ONLY: a stranger's DHT records, which must change nothing for the run's peers and aggregators.

A stranger holds no key of the run but may write on the open DHT under subkeys of keys it made up. It
stores, under AGGREGATORS_KEY, announcements of the run in another protocol version, of another run, of
the same run under its own key (the freshest of all), and of the same run claiming the real aggregator's
node; and under BANS_KEY a ban list, for the run's config hash, naming an honest peer. Each record is
signed properly by its stranger key, so only the trust decisions (peer/trust.py, peer/discovery.py,
protocol/ban_records.py) keep it out.

`python -m potluck.lab.attackers.dht_records --join ADDR --ban HEX`: joins the aggregator's DHT, stores
the records, prints a JSON `stored` event, and stores them again every few seconds until killed.
"""

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from potluck.lab.attackers.command import attacker_parser
from potluck.protocol import PROTOCOL_VERSION
from potluck.protocol.ban_records import BANS_KEY, BanList, sign_ban_list
from potluck.protocol.dht_schema import (
    AGGREGATORS_KEY,
    AggregatorAnnouncement,
    Ed25519RecordValidator,
    _record_owner,
    parse_announcements,
    sign_announcement,
)
from potluck.protocol.identity import Identity, fingerprint, generate_identity, public_key_from_hex
from potluck.protocol.node import Node, parse_join_address, peer_id_of, start_node

if TYPE_CHECKING:
    from hivemind.dht.validation import DHTRecord

RESTORE_EVERY_S = 5.0
TTL_S = 120.0


@dataclass(frozen=True, kw_only=True, slots=True)
class StrangerRecord:
    """One record a stranger stores: where, what, and which attack it is (for the events)."""

    key: str
    subkey: str
    value: bytes
    what: str


class ManyKeysValidator(Ed25519RecordValidator):
    """Signs each owner-marked record with whichever of its identities owns it: one node, many strangers."""

    def __init__(self, identities: Sequence[Identity]) -> None:
        super().__init__(identities[0])
        self._by_key = {i.public_key: i for i in identities}

    def sign_value(self, record: "DHTRecord") -> bytes:
        """The record signed by its owner, when that owner is one of this node's strangers."""
        owner = _record_owner(record)
        if owner:
            self._identity = self._by_key.get(owner, self._identity)
        return super().sign_value(record)


def stranger_records(
    strangers: Sequence[Identity], *, real: AggregatorAnnouncement, banned: Sequence[bytes], maddrs: Sequence[str]
) -> list[StrangerRecord]:
    """The records four strangers store against the run `real` announces (strangers[0] also signs the ban list)."""
    now = time.time() + 3600  # fresher than any real announcement: a newest-first choice picks them
    attacks: list[tuple[str, Identity, dict[str, Any]]] = [
        ("another protocol version", strangers[0], {"protocol_version": PROTOCOL_VERSION + 1}),
        ("another run", strangers[1], {"run_id": f"{real.run_id}-not"}),
        ("the same run under its own key", strangers[2], {}),
        ("the real aggregator's node", strangers[3], {"libp2p_peer_id": real.libp2p_peer_id}),
    ]
    records = []
    for what, stranger, changes in attacks:
        own_node = b"\x00\x24" + stranger.public_key + bytes(4)
        announcement = dataclasses.replace(
            real,
            **({"public_key": stranger.public_key, "libp2p_peer_id": own_node, "maddrs": tuple(maddrs)} | changes),
            timestamp_s=now,
        )
        subkey, value = sign_announcement(announcement, stranger)
        records.append(StrangerRecord(key=AGGREGATORS_KEY, subkey=subkey, value=value, what=what))
    bans = BanList(
        issuer=strangers[0].public_key,
        config_hash=real.config_hash,
        bans=tuple((key, "3 rejected updates") for key in banned),
        timestamp_s=time.time(),
    )
    subkey, value = sign_ban_list(bans, strangers[0])
    records.append(StrangerRecord(key=BANS_KEY, subkey=subkey, value=value, what="a ban list"))
    return records


async def store_records(node: Node, records: Sequence[StrangerRecord], *, ttl_s: float = TTL_S) -> list[str]:
    """Store `records` on the DHT; what was stored (a record the DHT refused is left out)."""
    from hivemind.utils import get_dht_time

    stored = []
    for r in records:
        if await node.dht.store(r.key, r.value, get_dht_time() + ttl_s, subkey=r.subkey):
            stored.append(r.what)
    return stored


async def _real_announcement(node: Node, peer_id: bytes) -> AggregatorAnnouncement:
    """The announcement of the aggregator at --join (the run to attack), once the DHT has it."""
    while True:
        found = parse_announcements(await node.dht.get(AGGREGATORS_KEY, latest=True))
        named = [a for a in found if a.libp2p_peer_id == peer_id]
        if named:
            return max(named, key=lambda a: a.timestamp_s)
        await asyncio.sleep(0.5)


async def attack(join: str, banned: Sequence[bytes]) -> None:
    """Store the stranger records against the run of the aggregator at `join`, again and again, until cancelled."""
    strangers = [generate_identity() for _ in range(4)]
    node = await start_node(initial_peers=[join])
    try:
        node.dht.protocol.record_validator = ManyKeysValidator(strangers)
        real = await _real_announcement(node, peer_id_of(parse_join_address(join)).to_bytes())
        maddrs = [str(m) for m in await node.p2p.get_visible_maddrs()]
        records = stranger_records(strangers, real=real, banned=banned, maddrs=maddrs)
        first = True
        while True:
            stored = await store_records(node, records)
            if first:
                keys = [fingerprint(s.public_key) for s in strangers]
                print(json.dumps({"event": "stored", "records": stored, "strangers": keys}), flush=True)
                first = False
            await asyncio.sleep(RESTORE_EVERY_S)
    finally:
        await node.shutdown()


def main() -> None:
    """`python -m potluck.lab.attackers.dht_records --join ADDR --ban HEX ...`."""
    parser = attacker_parser("potluck.lab.attackers.dht_records", __doc__)
    parser.add_argument("--ban", action="append", default=[], help="an honest peer's key (hex) to ban; repeatable")
    args = parser.parse_args()
    asyncio.run(attack(args.join, [public_key_from_hex(k) for k in args.ban]))


if __name__ == "__main__":
    main()
