"""`peer --join http://HOST:PORT`: the aggregator's multiaddrs, read from its status page instead of typed.

A multiaddr is long and easy to mistype, and in a compose file or a fresh container it is not known
until the aggregator has started. Its status page serves them at JOIN_PATH. The multiaddrs an
aggregator sees for itself carry the addresses of its own interfaces, which a peer behind a port
mapping or in another container cannot dial; the URL's host, which the volunteer just reached, can
be. So each TCP port the aggregator listens on is also offered at the URL's host, first.

The reply is untrusted network input: it is read up to MAX_REPLY_BYTES, and every address in it
must parse as a join multiaddr of the same peer id.
"""

import ipaddress
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from potluck.protocol.backoff import backoff_s
from potluck.protocol.node import JoinError, parse_join_address

__all__ = [
    "JOIN_PATH",
    "MAX_REPLY_BYTES",
    "addresses_from_reply",
    "fetch_join_addresses",
    "is_join_url",
    "join_endpoint",
    "resolve_joins",
]

logger = logging.getLogger(__name__)

JOIN_PATH = "/api/join"
MAX_REPLY_BYTES = 64 * 1024  # 16 multiaddrs and a run name fit in far less
MAX_ADDRESSES = 16
_RETRY_BASE_S = 0.5  # the first wait before asking a starting page again is at most this; later ones double it
_RETRY_CAP_S = 4.0  # the longest wait between two asks


def is_join_url(text: str) -> bool:
    """Whether a --join value is a status page URL rather than a multiaddr."""
    return text.strip().lower().startswith(("http://", "https://"))


def join_endpoint(url: str) -> str:
    """The JOIN_PATH URL for what a volunteer typed: a bare page (`http://host:8000`) or the endpoint itself."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JoinError(f"{url!r} is not an http(s) URL with a host; expected e.g. http://aggregator.example:8000")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError as e:
        raise JoinError(f"{url!r} has a bad port: {e}") from None
    path = parts.path.rstrip("/")
    if not path.endswith(JOIN_PATH):
        path += JOIN_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def addresses_from_reply(body: bytes, *, host: str) -> list[str]:
    """The multiaddrs to dial from a JOIN_PATH reply: each listening TCP port at `host` first, then the reply's own.

    JoinError (one line) when the reply is not the JSON object the status page serves, or its addresses
    do not parse or name different peers.
    """
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise JoinError(f"the join reply is not JSON: {e}") from None
    maddrs = reply.get("maddrs") if isinstance(reply, dict) else None
    if not isinstance(maddrs, list) or not maddrs or not all(isinstance(m, str) for m in maddrs):
        raise JoinError("the join reply has no list of multiaddrs; is this a potluck aggregator's status page?")
    parsed = [parse_join_address(m) for m in maddrs[:MAX_ADDRESSES]]
    peer_ids = {m.value_for_protocol("p2p") for m in parsed}
    if len(peer_ids) != 1:
        raise JoinError(f"the join reply names {len(peer_ids)} different peers; expected one aggregator")
    (peer_id,) = peer_ids
    host_part = _host_protocol(host)
    ports = [m.value_for_protocol("tcp") for m in parsed if "tcp" in {p.name for p in m.protocols()}]
    at_host = [f"{host_part}/tcp/{port}/p2p/{peer_id}" for port in dict.fromkeys(ports)]
    return list(dict.fromkeys([*at_host, *(str(m) for m in parsed)]))


def _host_protocol(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"/dns4/{host}"
    return f"/ip{address.version}/{address}"


def _fetch(url: str, *, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http(s) checked above
        body = response.read(MAX_REPLY_BYTES + 1)
    if len(body) > MAX_REPLY_BYTES:
        raise JoinError(f"the join reply from {url} is over {MAX_REPLY_BYTES} bytes; not a potluck status page")
    return body


def fetch_join_addresses(url: str, *, timeout_s: float) -> list[str]:
    """The multiaddrs behind a status page URL, asked until it answers (an aggregator starting up says 503).

    JoinError when it has not answered with addresses within `timeout_s`, or answers with something else.
    """
    endpoint = join_endpoint(url)
    host = urlsplit(endpoint).hostname or ""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        left_s = deadline - time.monotonic()
        try:
            return addresses_from_reply(_fetch(endpoint, timeout_s=max(left_s, 0.1)), host=host)
        except urllib.error.HTTPError as e:
            if e.code not in (502, 503, 504):  # 503: the aggregator is up but not ready; retry
                raise JoinError(f"{endpoint} answered HTTP {e.code}; is this a potluck aggregator's page?") from None
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        # jittered: peers started together against a starting aggregator must not ask in lock-step
        wait_s = backoff_s(attempt, base_s=_RETRY_BASE_S, cap_s=_RETRY_CAP_S)
        attempt += 1
        if time.monotonic() + wait_s > deadline:
            raise JoinError(f"no join addresses from {endpoint} within {timeout_s:g} s (last: {reason})")
        logger.info("asking %s for the aggregator's address: %s; retrying", endpoint, reason)
        time.sleep(wait_s)


def resolve_joins(values: Sequence[str], *, timeout_s: float) -> tuple[str, ...]:
    """Every --join value with each status page URL replaced by the multiaddrs it serves (the rest as given).

    Validating the multiaddrs is `potluck.peer.runner.join_addresses`'s job, after this.
    """
    resolved: list[str] = []
    for value in values:
        resolved += fetch_join_addresses(value, timeout_s=timeout_s) if is_join_url(value) else [value.strip()]
    return tuple(dict.fromkeys(resolved))
