"""Consistency tokens (wire.consistency): LSNs and per-shard read-your-writes tokens.

None of these tests needs PostgreSQL or a sidecar process.
"""

from __future__ import annotations

import pytest

from wire.consistency import format_token, int_to_lsn, lsn_to_int, merge_tokens, parse_token


@pytest.mark.parametrize(
    ("lsn", "number"),
    [
        ("0/0", 0),
        ("0/3024670", 0x3024670),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_lsn_round_trip(lsn: str, number: int) -> None:
    assert lsn_to_int(lsn) == number
    assert int_to_lsn(number) == lsn


def test_lsn_order_is_numeric_not_textual() -> None:
    # As text "9/0" > "10/0"; as WAL positions it is the other way round.
    assert lsn_to_int("9/FFFFFFFF") < lsn_to_int("10/0")
    assert lsn_to_int("16/b374d848") == lsn_to_int("16/B374D848")


@pytest.mark.parametrize("bad", ["", "3024670", "0/", "/10", "0/xyz", "g/1"])
def test_malformed_lsn(bad: str) -> None:
    with pytest.raises(ValueError):
        lsn_to_int(bad)


def test_parse_and_format_tokens() -> None:
    assert parse_token("0/10;s1@0/20") == {"": 0x10, "s1": 0x20}
    assert parse_token("") == {}
    # The same shard twice keeps its newest position.
    assert parse_token("s1@0/20;s1@0/10;s1@0/15") == {"s1": 0x20}
    assert format_token({"s2": 0x30, "": 0x10, "s1": 0x20}) == "0/10;s1@0/20;s2@0/30"
    token = "user_shard_0@16/B374D848;user_shard_2@0/3024670"
    assert format_token(parse_token(token)) == token


def test_merge_tokens_keeps_the_max_per_shard() -> None:
    merged = merge_tokens("s1@0/20;s2@1/0", "s1@0/10;s2@1/5;s3@0/1")
    assert merged == "s1@0/20;s2@1/5;s3@0/1"
    assert merge_tokens("0/5", "0/3") == "0/5"
    assert merge_tokens("0/3", "0/5") == "0/5"
    assert merge_tokens("0/10", "s1@0/1") == "0/10;s1@0/1"
    assert merge_tokens(None, "0/1") == "0/1"
    assert merge_tokens("0/1", None) == "0/1"
    assert merge_tokens("0/1", "") == "0/1"
    assert merge_tokens(None, None) is None


@pytest.mark.parametrize("bad", ["s1@", "s1@0", "s1@zz/1", "0/1;oops"])
def test_malformed_tokens(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_token(bad)
    with pytest.raises(ValueError):
        merge_tokens("0/1", bad)
