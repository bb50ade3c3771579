"""The chart page in headless Chromium against the real gateway: snapshot, live bars, reconnect."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from marketdata.cache.versions import versions_bump
from marketdata.models import FeedStatus, Symbol
from marketdata.services.bars_trades import BarIn, bars_upsert
from marketdata.timeframes import ANOMALY_HALT_ZERO_VOLUME, ANOMALY_VOLUME_SPIKE
from marketdata.wire import bar_json
from streaming.publish import Message, Publisher

from .conftest import ROOT, Gateway

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

P = 1_000_000_000  # Databento fixed-point scale
TICKER = "ACME"
STREAM = f"bars:1m:{TICKER}"
HISTORY = 150
PUBLISHED = 50
WAIT_S = 20
SCREENSHOT = ROOT / "var" / "screenshots" / "chart.png"


class Market:
    """Bars of one symbol written as the ingester writes them: upsert, commit, then publish."""

    def __init__(self, symbol: Symbol) -> None:
        self.symbol = symbol
        self.now = datetime.now(UTC).replace(second=0, microsecond=0)  # the minute forming now
        self.publisher = Publisher()
        self.rng = random.Random(7)
        self.price = 187.5
        self.last_seq = 0

    def make(self, ts: datetime, *, anomalies: int = 0) -> BarIn:
        """A plausible next 1m bar (a random walk with a little trend and noise)."""
        open_ = self.price
        close = max(1.0, open_ + self.rng.gauss(0.02, 0.35))
        high = max(open_, close) + abs(self.rng.gauss(0, 0.15))
        low = min(open_, close) - abs(self.rng.gauss(0, 0.15))
        self.price = close
        volume = int(self.rng.lognormvariate(9.5, 0.35))
        if anomalies & ANOMALY_VOLUME_SPIKE:
            volume *= 9
        if anomalies & ANOMALY_HALT_ZERO_VOLUME:
            volume, high, low, close = 0, open_, open_, open_
            self.price = open_

        def fixed(x: float) -> int:
            return round(x * 100) * P // 100  # on a cent grid

        prices = fixed(open_), fixed(high), fixed(low), fixed(close)
        return BarIn(self.symbol.id, "1m", ts, 1, *prices, volume, anomalies)

    def write(self, bars: list[BarIn]) -> None:
        bars_upsert(bars=bars)
        versions_bump(symbol_ids={self.symbol.id})

    def publish(self, bar: BarIn, *, final: bool = True) -> int:
        data = bar_json(bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.anomalies, final)
        self.last_seq = self.publisher.publish([Message(STREAM, "bar", data)])[STREAM]
        return self.last_seq

    def add(self, ts: datetime, **kwargs: Any) -> BarIn:
        """Write a final bar, then publish it (after its commit)."""
        bar = self.make(ts, **kwargs)
        self.write([bar])
        self.publish(bar)
        return bar


def price(value: int) -> float:
    return value / P


def chart_state(driver: Any) -> dict[str, Any]:
    return driver.execute_script("return window.chartState ? Object.assign({}, window.chartState) : null") or {}


def wait_for(driver: Any, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = WAIT_S) -> dict:
    """Wait until check(chartState) holds; fail with the last state seen."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: check(chart_state(d)))
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; chartState = {chart_state(driver)}")
    return chart_state(driver)


def js_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]


@pytest.fixture
def market(redis_client: Any) -> Iterator[Market]:
    """ACME with HISTORY minutes of stored 1m bars up to the current minute, two of them flagged."""
    symbol = Symbol.objects.create(ticker=TICKER, dataset="XNAS.ITCH", description="Acme Corporation")
    # A live feed wrote the dataset just now, so the gateway calls its streams live.
    FeedStatus.objects.create(dataset="XNAS.ITCH", schema="ohlcv-1m", source="live", last_batch_at=timezone.now())
    market = Market(symbol)
    now = market.now
    flags = {HISTORY - 40: ANOMALY_VOLUME_SPIKE, HISTORY - 90: ANOMALY_HALT_ZERO_VOLUME}
    bars = [market.make(now - timedelta(minutes=HISTORY - i), anomalies=flags.get(i, 0)) for i in range(HISTORY)]
    # The older bars only in the database (as if from before the replay buffer's reach),
    # the recent ones also published, as the ingester does.
    market.write(bars)
    for bar in bars[-PUBLISHED:]:
        market.publish(bar)
    yield market
    market.publisher.close()


def test_chart_draws_the_snapshot_streams_bars_and_fills_a_gap_after_a_restart(
    gateway: Gateway, browser: Any, market: Market
) -> None:
    driver = browser
    driver.get(f"{gateway.url}/?symbol={TICKER}&tf=1m")

    # The snapshot: every stored bar, candles drawn, the two anomalies marked.
    state = wait_for(driver, "the snapshot", lambda s: s.get("snapshots", 0) >= 1 and s.get("bars") == HISTORY)
    assert state["stream"] == STREAM
    assert state["markers"] == 2
    assert state["status"] == "live"
    assert driver.find_element("id", "connection").text == "Live"
    assert driver.execute_script("return document.querySelectorAll('#chart canvas').length") > 0
    assert not js_errors(driver)

    # A new bar published after its commit appears; the forming bar then changes in place.
    t1 = market.now
    forming = market.make(t1)
    seq = market.publish(forming, final=False)
    wait_for(driver, "a new bar", lambda s: s.get("bars") == HISTORY + 1 and s.get("lastSeq") == seq)
    higher = forming.close + 25 * P // 100
    closed = forming._replace(close=higher, high=max(forming.high, higher))
    market.write([closed])
    seq = market.publish(closed)
    state = wait_for(driver, "the forming bar's update", lambda s: s.get("lastSeq") == seq)
    assert state["bars"] == HISTORY + 1  # replaced, not appended
    assert math.isclose(state["lastClose"], price(closed.close))

    # The gateway goes away; the page says so and retries.
    gateway.stop()
    wait_for(driver, "the reconnecting indicator", lambda s: s.get("status") == "reconnecting")
    assert driver.find_element("id", "connection").get_attribute("data-state") == "reconnecting"

    # Bars committed and published while it was down ...
    missed = [market.add(t1 + timedelta(minutes=i), anomalies=ANOMALY_VOLUME_SPIKE if i == 2 else 0) for i in (1, 2, 3)]

    # ... are on the chart once it is back: resumed from the last seq, no hole, no duplicate.
    gateway.start()
    state = wait_for(
        driver, "the resumed stream", lambda s: s.get("lastSeq") == market.last_seq and s.get("connection") == "open"
    )
    assert state["bars"] == HISTORY + 1 + len(missed)
    assert state["lastTs"] == missed[-1].ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert math.isclose(state["lastClose"], price(missed[-1].close))
    assert state["markers"] == 3
    assert state["reconnects"] >= 1
    assert state["snapshots"] == 1  # resumed from its seq, not reloaded
    assert state["status"] == "live"

    # And it keeps streaming afterwards.
    market.add(t1 + timedelta(minutes=4))
    wait_for(driver, "a bar after the restart", lambda s: s.get("bars") == HISTORY + 5)

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOT))


def test_symbol_picker_searches_and_switches_the_stream(gateway: Gateway, browser: Any, market: Market) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    other = Symbol.objects.create(ticker="BRK/B", dataset="XNYS.PILLAR", description="Berkshire Hathaway B")
    hourly = [market.make(market.now - timedelta(hours=24 - i)) for i in range(24)]
    market.write([b._replace(symbol_id=other.id, timeframe="1h") for b in hourly])
    driver = browser
    driver.get(f"{gateway.url}/?symbol={TICKER}&tf=1m")
    wait_for(driver, "the first snapshot", lambda s: s.get("bars") == HISTORY)

    picker = driver.find_element(By.ID, "symbol-input")
    picker.click()
    picker.send_keys("berkshire")  # matches the description, not the ticker

    def options(d: Any) -> list[str]:
        return [li.text.split("\n")[0] for li in d.find_elements(By.CSS_SELECTOR, "#symbol-list li[role=option]")]

    WebDriverWait(driver, WAIT_S).until(lambda d: options(d) == ["BRK/B"])
    picker.send_keys(Keys.ENTER)
    driver.find_element(By.CSS_SELECTOR, '#timeframes button[data-tf="1h"]').click()

    # A ticker with a slash streams like any other; the choice is kept in the URL.
    wait_for(driver, "the other stream", lambda s: s.get("stream") == "bars:1h:BRK/B" and s.get("bars") == 24)
    assert "symbol=BRK%2FB" in driver.current_url
    assert "tf=1h" in driver.current_url
    assert driver.find_element(By.CSS_SELECTOR, '#timeframes button[aria-pressed="true"]').text == "1h"
    # No feed writes its dataset: the indicator passes on the gateway's word.
    wait_for(driver, "the stale indicator", lambda s: s.get("status") == "stale")
    assert driver.find_element(By.ID, "connection").text == "Stale"


def test_a_lost_message_is_noticed_by_its_seq_and_recovered_by_resume(
    gateway: Gateway, browser: Any, market: Market
) -> None:
    driver = browser
    driver.get(f"{gateway.url}/?symbol={TICKER}&tf=1m")
    wait_for(driver, "the snapshot", lambda s: s.get("bars") == HISTORY and s.get("connection") == "open")
    # The page loses the next bar message (as if a proxy dropped it) ...
    driver.execute_script(
        """
        const feed = window.chartFeed, receive = feed.receive.bind(feed);
        let lost = false;
        feed.receive = (text) => {
          if (!lost && JSON.parse(text).type === "bar") { lost = true; return; }
          receive(text);
        };
        """
    )
    market.add(market.now)
    second = market.add(market.now + timedelta(minutes=1))

    # ... and the next one's seq shows the hole: it resumes, and the lost bar is drawn.
    state = wait_for(driver, "the resumed bars", lambda s: s.get("lastSeq") == market.last_seq)
    assert state["bars"] == HISTORY + 2  # the lost bar too
    assert state["lastTs"] == second.ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert state["snapshots"] == 1  # resumed on the same socket, not reloaded
    assert driver.execute_script("return window.chartFeed.lastSeq") == market.last_seq


def test_a_silent_server_is_given_up_after_missed_heartbeats(gateway: Gateway, browser: Any, market: Market) -> None:
    gateway.stop()
    gateway.env["WS_HEARTBEAT_S"] = "1"
    gateway.start()
    driver = browser
    driver.get(f"{gateway.url}/?symbol={TICKER}&tf=1m")
    wait_for(driver, "the snapshot", lambda s: s.get("bars") == HISTORY and s.get("connection") == "open")

    # The server hangs with its sockets open: only the missing heartbeats tell.
    gateway.pause()
    try:
        wait_for(driver, "the page to give the socket up", lambda s: s.get("status") == "reconnecting", timeout=10)
        bar = market.add(market.now)
    finally:
        gateway.resume()

    state = wait_for(driver, "the resumed stream", lambda s: s.get("lastSeq") == market.last_seq, timeout=30)
    assert state["bars"] == HISTORY + 1
    assert state["lastTs"] == bar.ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert state["reconnects"] >= 1
    assert state["snapshots"] == 1


def test_where_anonymous_streaming_is_off_the_page_streams_after_logging_in(
    gateway: Gateway, browser: Any, market: Market
) -> None:
    from django.contrib.auth.models import User
    from selenium.webdriver.common.by import By

    from marketdata.models import Entitlement

    trader = User.objects.create_user("trader", password="pw-for-tests-only")  # a trader, not staff
    Entitlement.objects.create(user=trader, dataset="XNAS.ITCH")
    gateway.stop()
    gateway.env["STREAMING_ALLOW_ANONYMOUS"] = "false"
    gateway.start()
    driver = browser

    driver.get(f"{gateway.url}/")
    assert driver.current_url == f"{gateway.url}/login/?next=/"
    driver.find_element(By.ID, "id_username").send_keys("trader")
    driver.find_element(By.ID, "id_password").send_keys("pw-for-tests-only")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    # Back on the page: the first active symbol, streamed over a socket the session authenticates.
    state = wait_for(driver, "the snapshot", lambda s: s.get("bars") == HISTORY and s.get("connection") == "open")
    assert state["stream"] == STREAM
    seq = market.publish(market.make(market.now))
    wait_for(driver, "a live bar", lambda s: s.get("lastSeq") == seq and s.get("bars") == HISTORY + 1)


def test_an_unknown_symbol_is_reported_not_shown_as_live(gateway: Gateway, browser: Any, market: Market) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(f"{gateway.url}/?symbol=NOPE&tf=5m")

    state = wait_for(driver, "the refusal", lambda s: s.get("error") == "unknown_symbol")
    assert state["status"] == "unavailable"
    assert driver.find_element(By.ID, "connection").text == "Unavailable"
    assert "NOPE" in driver.find_element(By.ID, "notice").text
