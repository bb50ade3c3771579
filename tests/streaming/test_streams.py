"""Stream names and their Channels group names: one group per stream, every group valid."""

from __future__ import annotations

import re

import pytest
from channels.layers import BaseChannelLayer
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from marketdata.models import Symbol
from marketdata.timeframes import SERVED_TIMEFRAMES
from streaming.streams import GROUP_MAX, GROUP_PREFIX, bars_stream, group_name, stream_parse, trades_stream
from tests.streaming.wsclient import Client, bar_data, publish

# Tickers made of a few pieces that escaping has to keep apart (":" is the stream's
# separator, "." and "_" the group's, "\x10" + "0" reads like the hex of "\u0100", "2e"
# like an escaped "."): so few that a list of names often holds two an escaping could
# confuse. Then names alike but for their ends past the cut, and any code point at all,
# lone surrogates included (a JSON "\ud800" parses to one).
PIECES = [":", ".", "_", "2e", "\x10", "0", "\u0100"]
pieced = st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map("".join)
confusable = pieced.map(trades_stream) | pieced.map(lambda ticker: bars_stream("1m", ticker))
long_alike = st.integers(80, 105).flatmap(lambda n: pieced.map(lambda end: trades_stream("X" * n + end)))
anything = st.text(st.characters(exclude_categories=()), min_size=1, max_size=111)
streams = confusable | long_alike | st.builds(bars_stream, st.sampled_from(SERVED_TIMEFRAMES), anything)
streams |= st.builds(trades_stream, anything)
LAYER = BaseChannelLayer()


def stream_of(group: str) -> str:
    """The stream a whole (not cut) group name was made from: the escaping read back."""
    assert group.startswith(GROUP_PREFIX)
    out, text, i = [], group[len(GROUP_PREFIX) :], 0
    while i < len(text):
        c = text[i]
        if c == ".":
            out.append(":")
        elif c != "_":
            out.append(c)
        else:
            width = {"u": 4, "U": 6}.get(text[i + 1], 2)
            start = i + 1 + (width != 2)
            digits = text[start : start + width]
            assert re.fullmatch(f"[0-9a-f]{{{width}}}", digits), group
            out.append(chr(int(digits, 16)))
            i = start + width - 1
        i += 1
    return "".join(out)


@hsettings(max_examples=300, deadline=None)
@given(st.lists(streams, min_size=2, max_size=8, unique=True))
@example(["bars:1m:BRK.B", "bars:1m:BRK:B"])
@example(["trades:A_2eB", "trades:A.B", "trades:A_B"])
@example(["trades:\u0100", "trades:\x100"])
@example(["trades:" + "X" * 112, "trades:" + "X" * 111 + "Y"])  # cut to the same first characters
def test_distinct_streams_have_distinct_groups(names):
    assert all(stream_parse(name).name == name for name in names)  # every one a valid stream
    assert len({group_name(name) for name in names}) == len(names)


@hsettings(max_examples=300, deadline=None)
@given(streams)
def test_every_group_is_valid_for_channels_and_whole_ones_read_back(name):
    group = group_name(name)
    assert LAYER.require_valid_group_name(group)
    assert len(group) <= GROUP_MAX
    assert re.fullmatch(r"[A-Za-z0-9\-_.]+", group)
    if "__" in group:  # cut, with the digest of the whole name (escaping never makes "__")
        assert len(group) == GROUP_MAX
        assert re.fullmatch(r"__[0-9a-f]{32}", group[-34:])
    else:
        assert stream_of(group) == name


def test_readable_tickers_stay_readable():
    assert group_name("bars:1m:AAPL") == "md.bars.1m.AAPL"
    assert group_name("trades:BRN FMJ0024!") == "md.trades.BRN_20FMJ0024_21"
    assert group_name("bars:1h:BRK/B") == "md.bars.1h.BRK_2fB"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_client")
async def test_a_ticker_with_a_colon_is_not_one_with_a_dot():
    # Once one group: leaving BRK:B took BRK.B's socket out of the group it shared.
    for ticker in ("BRK.B", "BRK:B"):
        await Symbol.objects.acreate(ticker=ticker, dataset="XNYS.PILLAR")
    dot, colon = bars_stream("1m", "BRK.B"), bars_stream("1m", "BRK:B")
    client = Client()
    await client.connect()
    await client.send({"op": "subscribe", "id": 1, "streams": [dot, colon]})
    await client.recv_type("subscribed")
    await client.recv_type("subscribed")
    await client.send({"op": "unsubscribe", "id": 2, "streams": [colon]})
    await client.recv_type("unsubscribed")
    publish(colon, [bar_data(0)])
    publish(dot, [bar_data(1)])
    assert (await client.recv_type("bar"))["stream"] == dot
    assert await client.nothing()
    await client.close()
