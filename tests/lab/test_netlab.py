"""The network lab's arguments: link rates as users write them, and clear errors for the rest."""

import pytest

from potluck.lab.netlab import Link, parse_link, parse_rate


@pytest.mark.parametrize(
    ("text", "bits_per_s"),
    [("10mbit", 10**7), ("100Mbit", 10**8), ("1gbit", 10**9), ("500kbit", 5 * 10**5), ("2.5mbit", 2_500_000)],
)
def test_rates_read_as_tc_writes_them(text: str, bits_per_s: int) -> None:
    assert parse_rate(text) == bits_per_s


def test_a_link_is_up_then_down_and_prints_back_the_same_way() -> None:
    link = parse_link("10mbit/100mbit")

    assert link == Link(up_bits_per_s=10**7, down_bits_per_s=10**8)
    assert str(link) == "10mbit/100mbit"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10mbit", "write UP/DOWN"),
        ("10mbit/100mbit/1gbit", "write UP/DOWN"),
        ("fast/slow", "cannot read 'fast' as a link rate"),
        ("10MB/100mbit", "cannot read '10MB'"),
        ("1bit/1gbit", "outside 8kbit..100gbit"),
    ],
)
def test_a_bad_link_is_one_line_with_the_form(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_link(text)
