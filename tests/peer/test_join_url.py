"""`peer --join http://HOST:PORT`: the status page URL turned into multiaddrs, against a real local HTTP server."""

import json
import time

import pytest

from potluck.peer.join_url import MAX_REPLY_BYTES, addresses_from_reply, join_endpoint, resolve_joins
from potluck.protocol.node import JoinError
from tests.local_http import local_page

PEER_ID = "12D3KooWQFg4b9NM1qpzNirUdP9zjSgvbLJNwE9K8bWUuiw3HmGg"
OTHER_ID = "12D3KooW9pP4Seg3kZYhySpuVjn1RPdQBsUFZKiFxGMGQN5MeL6A"
REPLY = {
    "run": "tiny",
    "fingerprint": "pl-aaaa-bbbb-cccc-dddd",
    "maddrs": [f"/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}", f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"],
}


@pytest.mark.parametrize(
    ("typed", "endpoint"),
    [
        ("http://aggregator:8000", "http://aggregator:8000/api/join"),
        ("http://aggregator:8000/", "http://aggregator:8000/api/join"),
        ("https://run.example.org/api/join", "https://run.example.org/api/join"),
        ("  http://10.0.0.5:8000/potluck/  ", "http://10.0.0.5:8000/potluck/api/join"),
    ],
)
def test_a_typed_page_url_becomes_its_join_endpoint(typed: str, endpoint: str) -> None:
    assert join_endpoint(typed) == endpoint


@pytest.mark.parametrize("bad", ["http://", "ftp://host/x", "http://host:99999"])
def test_a_bad_url_is_refused_in_one_line(bad: str) -> None:
    with pytest.raises(JoinError) as caught:
        join_endpoint(bad)
    assert "\n" not in str(caught.value)


def test_the_urls_host_comes_first_at_each_listening_port_then_the_aggregators_own_addresses() -> None:
    body = json.dumps(REPLY).encode()

    assert addresses_from_reply(body, host="aggregator") == [
        f"/dns4/aggregator/tcp/31337/p2p/{PEER_ID}",
        *REPLY["maddrs"],
    ]
    assert addresses_from_reply(body, host="127.0.0.1")[0] == f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"
    assert addresses_from_reply(body, host="::1")[0] == f"/ip6/::1/tcp/31337/p2p/{PEER_ID}"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>hello</html>", "not JSON"),
        (b'{"maddrs": []}', "no list of multiaddrs"),
        (b'{"maddrs": [3]}', "no list of multiaddrs"),
        (b"[1, 2]", "no list of multiaddrs"),
        (b'{"maddrs": ["/ip4/1.2.3.4/tcp/1"]}', "/p2p/"),
        (
            json.dumps(
                {"maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_ID}", f"/ip4/1.2.3.4/tcp/1/p2p/{OTHER_ID}"]}
            ).encode(),
            "2 different peers",
        ),
    ],
)
def test_a_reply_that_is_not_a_join_reply_is_refused(body: bytes, says: str) -> None:
    with pytest.raises(JoinError, match=says):
        addresses_from_reply(body, host="aggregator")


@pytest.mark.timeout(30)
def test_a_page_that_is_still_starting_is_asked_again_until_it_answers() -> None:
    def answer(path: str, n: int) -> tuple[int, bytes]:
        return (503, b'{"detail": "starting"}') if n < 2 else (200, json.dumps(REPLY).encode())

    with local_page(answer) as url:
        addresses = resolve_joins([url, f"/ip4/10.1.1.1/tcp/4/p2p/{PEER_ID}"], timeout_s=20)

    assert addresses == (
        f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}",
        f"/ip4/172.18.0.2/tcp/31337/p2p/{PEER_ID}",
        f"/ip4/10.1.1.1/tcp/4/p2p/{PEER_ID}",
    )


@pytest.mark.timeout(30)
def test_a_page_that_never_gets_ready_fails_within_the_timeout() -> None:
    with local_page(lambda path, n: (503, b"{}")) as url:
        started = time.monotonic()
        with pytest.raises(JoinError, match=r"within 2 s \(last: HTTP 503\)"):
            resolve_joins([url], timeout_s=2)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_a_page_that_is_not_an_aggregators_fails_at_once() -> None:
    with local_page(lambda path, n: (404, b"{}")) as url, pytest.raises(JoinError, match="HTTP 404"):
        resolve_joins([url], timeout_s=20)


@pytest.mark.timeout(30)
def test_an_oversize_reply_is_refused_before_it_is_parsed() -> None:
    with (
        local_page(lambda path, n: (200, b" " * (MAX_REPLY_BYTES + 10))) as url,
        pytest.raises(JoinError, match="over"),
    ):
        resolve_joins([url], timeout_s=20)


@pytest.mark.timeout(30)
def test_nobody_listening_fails_within_the_timeout_naming_the_reason() -> None:
    with local_page(lambda path, n: (200, b"")) as url:
        pass  # the server is gone: its port refuses connections now
    with pytest.raises(JoinError, match="refused"):
        resolve_joins([url], timeout_s=1.5)
