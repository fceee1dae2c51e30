"""The peer's trust root: the run's aggregator keys, known before anything on the DHT is believed.

Anyone can write an announcement on an open DHT, and a state is only checked against the config that
comes with it, so a peer that took its run from the newest announcement would train for any run that is
consistent with itself. The keys it trusts come, in this order, from:

1. `--aggregator-key HEX` (the run's operator publishes it): those keys and no others;
2. the --join node, asked for its signed state: its signer is trusted when its own announcement names
   the very node that was dialled (libp2p authenticates the node, the announcement's signature the key).
   A node that serves no state, or another key's state, is not an aggregator: no run is taken from it;
3. the keys pinned beside the peer's identity at its first join (`identity.trusted-aggregators.json`),
   when the --join node proves nothing (a restart through another peer, an aggregator that is down).

A --join aggregator of a pinned run whose key the pin does not list is refused: the pin is reset by
deleting that file (or by naming the key with --aggregator-key).
"""

import json
import logging
import os
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potluck.errors import PotluckError
from potluck.protocol.client import AggregatorLink, AggregatorRefused, AggregatorUnreachable
from potluck.protocol.dht_schema import AGGREGATORS_KEY, AggregatorAnnouncement, parse_announcements
from potluck.protocol.envelope import EnvelopeError, SignedState
from potluck.protocol.identity import fingerprint, public_key_from_hex, public_key_to_hex
from potluck.protocol.node import Node, dial, peer_id_of

if TYPE_CHECKING:
    from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

PIN_SUFFIX = ".trusted-aggregators.json"
MAX_PIN_BYTES = 1 << 20  # a pin lists one run's keys; anything larger is not one
NOT_PROVEN_HINT = "join the aggregator's own address, or pass the run's key with --aggregator-key HEX"


class TrustError(PotluckError):
    """A trust root that cannot be used: a malformed key or pin file, or a --join node the pin refutes (one line)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Root:
    """The aggregator keys a peer trusts, and where they came from (for its messages)."""

    keys: frozenset[bytes]
    source: str

    @property
    def hex_keys(self) -> frozenset[str]:
        """The keys as a config writes them (what discovery compares announcements with)."""
        return frozenset(public_key_to_hex(k) for k in self.keys)


def pin_file(identity_path: Path) -> Path:
    """Where the keys pinned at first join are kept: beside the identity key, so they move with it."""
    return identity_path.with_name(identity_path.stem + PIN_SUFFIX)


def read_pin(path: Path) -> tuple[str, frozenset[bytes]] | None:
    """The (run, aggregator keys) pinned in `path`; None when nothing is pinned; TrustError when it is unreadable."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PIN_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TrustError(f"{path}: cannot read the pinned aggregator keys ({e.strerror})") from e
    try:
        if len(raw) > MAX_PIN_BYTES:
            raise ValueError("too large")
        data = json.loads(raw)
        run, keys = data["run"], data["aggregator_keys"]
        if not (isinstance(run, str) and run and isinstance(keys, list) and keys):
            raise ValueError("empty")
        return run, frozenset(public_key_from_hex(k) for k in keys)
    except (ValueError, TypeError, KeyError) as e:
        raise TrustError(f"{path}: not a file of pinned aggregator keys ({e}); delete it to pin again") from None


def write_pin(path: Path, run: str, keys: Collection[str]) -> None:
    """Pin `run`'s aggregator keys (hex) in `path`, atomically; nothing is written when they are pinned already."""
    if read_pin(path) == (run, frozenset(public_key_from_hex(k) for k in keys)):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"run": run, "aggregator_keys": sorted(keys)}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("pinned run %r's %d aggregator key(s) in %s", run, len(keys), path)


def keep_pin(path: Path | None, run: str, keys: Collection[str]) -> None:
    """Pin the keys of the run a peer synced (write_pin), unless it pins nothing; a disk that refuses is logged."""
    if path is None:
        return
    try:
        write_pin(path, run, keys)
    except OSError as e:
        logger.warning("could not pin the run's aggregator keys in %s: %s", path, e)


def joined_key(
    signed: SignedState, peer_id: bytes, announcements: Sequence[AggregatorAnnouncement], *, run: str | None
) -> bytes:
    """The aggregator key the dialled node `peer_id` proves it holds: the signer of the state it serves,
    when that key's own announcement names `peer_id`. AggregatorUnreachable (retried) says why not.
    """
    key = signed.header.aggregator_public_key
    try:
        signed.verify({key})
    except EnvelopeError as e:
        raise AggregatorUnreachable(f"the --join node serves a state that does not verify ({e})") from e
    if run is not None and signed.header.run_id != run:
        raise AggregatorUnreachable(f"the --join node serves run {signed.header.run_id!r}, not --run {run!r}")
    # any protocol version: the run's own key, once trusted, is what may tell this peer to upgrade
    own = [a for a in announcements if a.public_key == key and a.libp2p_peer_id == peer_id]
    if not own:
        raise AggregatorUnreachable(
            f"the --join node serves a state signed by {fingerprint(key)}, but no announcement of that key "
            "names the node (yet): it is not that aggregator"
        )
    return key


def choose_root(
    *,
    flag_keys: Collection[str],
    proven: tuple[bytes, str] | None,
    pinned: tuple[str, frozenset[bytes]] | None,
    run: str | None,
    pin_path: Path | None,
) -> Root | None:
    """The keys to trust: --aggregator-key's, else the --join node's (checked against a pin of its run), else the pin.

    `proven`: (key, run) the --join node proved (joined_key), or None; `pinned`: read_pin's answer. None
    when nothing is known yet (the caller retries: the --join aggregator may be starting).
    """
    if flag_keys:
        return Root(keys=frozenset(public_key_from_hex(k) for k in flag_keys), source="--aggregator-key")
    if proven is not None:
        key, proven_run = proven
        if pinned is not None and pinned[0] == proven_run and key not in pinned[1]:
            raise TrustError(
                f"the --join aggregator {fingerprint(key)} of run {proven_run!r} is not one of the keys pinned "
                f"for that run at this peer's first join ({pin_path}); if its operator changed keys, delete "
                "that file or pass --aggregator-key"
            )
        keys = pinned[1] if pinned is not None and pinned[0] == proven_run else frozenset({key})
        return Root(keys=keys, source=f"the --join aggregator {fingerprint(key)}")
    if pinned is not None and (run is None or run == pinned[0]):
        return Root(keys=pinned[1], source=f"the keys pinned in {pin_path}")
    return None


async def root_from_join(
    node: Node, join_addrs: Sequence["Multiaddr"], *, requester: bytes, client_mode: bool, run: str | None
) -> tuple[bytes, str]:
    """Ask each --join node for its signed state: the first one that proves an aggregator key gives (key, run).

    AggregatorUnreachable, with every node's reason, when none does (none is up yet, or none is an aggregator).
    """
    reasons = []
    by_peer: dict[Any, list[Multiaddr]] = {}
    for a in join_addrs:
        by_peer.setdefault(peer_id_of(a), []).append(a)
    for peer_id, maddrs in by_peer.items():
        await dial(node.p2p, peer_id, maddrs)
        try:
            signed, _, _ = await AggregatorLink(node.p2p, peer_id).fetch_manifest(
                requester, timeout_s=30, client_mode=client_mode
            )
            found = parse_announcements(await node.dht.get(AGGREGATORS_KEY, latest=True))
            return joined_key(signed, peer_id.to_bytes(), found, run=run), signed.header.run_id
        except (AggregatorUnreachable, AggregatorRefused) as e:
            reasons.append(str(e))
    raise AggregatorUnreachable(
        f"no --join node proved it is an aggregator ({'; '.join(reasons)[:300]}); {NOT_PROVEN_HINT}"
    )
