/*
 * The chart page: candlesticks and volume (TradingView lightweight-charts v5), a symbol
 * picker over GET /v1/symbols, a timeframe picker, anomaly markers and a connection
 * indicator, fed by feed.js over the WebSocket stream.
 *
 * window.chartState mirrors what the page shows (bars, last seq, status, ...) for
 * automated checks and for whoever opens the console.
 *
 * Charts: TradingView Lightweight Charts(TM), Copyright (c) TradingView, Inc.,
 * https://www.tradingview.com/ (Apache License 2.0).
 */
(function () {
  "use strict";

  const LWC = window.LightweightCharts;
  const TIMEFRAMES = ["1s", "1m", "5m", "15m", "30m", "1h", "4h", "1d"];
  const DEFAULT_TF = "1m";
  const SNAPSHOT_BARS = 1000;
  const SEARCH_LIMIT = 20;
  const SEARCH_DEBOUNCE_MS = 150;
  const MAX_PRICE_DECIMALS = 8;
  const MIN_BARS_SHOWN = 60;
  const MAX_BARS_SHOWN = 150;
  const RIGHT_OFFSET_BARS = 8;
  const ANOMALY_MARKERS = {
    halt_zero_volume: { position: "belowBar", shape: "square", colorVar: "--muted", text: "halt" },
    volume_spike: { position: "aboveBar", shape: "arrowDown", colorVar: "--warn", text: "spike" },
  };

  const body = document.body;
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const $ = (id) => document.getElementById(id);

  const state = {
    symbol: null,
    tf: DEFAULT_TF,
    stream: null,
    bars: 0,
    markers: 0,
    lastSeq: null,
    lastTs: null,
    lastClose: null,
    status: "connecting", // what the indicator shows
    connection: "connecting", // the socket: connecting, syncing, open, reconnecting, offline
    feedStatus: null, // the server's status of the stream: live, stale, replay
    reconnects: 0,
    snapshots: 0,
    error: null,
  };
  window.chartState = state;

  // ---- chart ----

  const chart = LWC.createChart($("chart"), {
    autoSize: true,
    layout: {
      background: { type: LWC.ColorType.Solid, color: color("--bg") },
      textColor: color("--muted"),
      fontFamily: color("--font"),
      fontSize: 11,
      // The logo injects a <style> element, which the page's Content-Security-Policy
      // refuses; the toolbar carries the attribution link instead (chart.html).
      attributionLogo: false,
    },
    grid: {
      vertLines: { color: "rgba(42, 46, 57, 0.45)" },
      horzLines: { color: "rgba(42, 46, 57, 0.45)" },
    },
    crosshair: { mode: LWC.CrosshairMode.Normal },
    rightPriceScale: { borderColor: color("--border") },
    timeScale: {
      borderColor: color("--border"),
      timeVisible: true,
      secondsVisible: false,
      rightOffset: RIGHT_OFFSET_BARS,
    },
    localization: { dateFormat: "yyyy-MM-dd" },
  });

  const up = color("--up");
  const down = color("--down");
  const candles = chart.addSeries(LWC.CandlestickSeries, {
    upColor: up,
    downColor: down,
    borderVisible: false,
    wickUpColor: up,
    wickDownColor: down,
  });
  candles.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.26 } });

  // Volume on a price scale of its own, overlaid along the bottom fifth of the pane.
  const volume = chart.addSeries(LWC.HistogramSeries, {
    priceScaleId: "volume",
    priceFormat: { type: "volume" },
    lastValueVisible: false,
    priceLineVisible: false,
  });
  chart.priceScale("volume").applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });

  const markersApi = LWC.createSeriesMarkers(candles, []);

  // The chart's data: bars by time (seconds), and their times in ascending order.
  let byTime = new Map();
  let times = [];
  let markers = new Map();
  let priceDecimals = 2;

  const toTime = (ts) => Math.floor(Date.parse(ts) / 1000);
  const candleOf = (t, b) => ({ time: t, open: b.open, high: b.high, low: b.low, close: b.close });
  const volumeOf = (t, b) => ({
    time: t,
    value: b.volume,
    color: b.close >= b.open ? "rgba(38, 166, 154, 0.45)" : "rgba(239, 83, 80, 0.45)",
  });

  function decimalsOf(value) {
    const text = String(value);
    const dot = text.indexOf(".");
    return dot < 0 || text.includes("e") ? 0 : text.length - dot - 1;
  }

  /** Show as many decimals as the data has (at least 2), so 1.08345 is not shown as 1.08. */
  function fitPriceFormat(bars, fresh) {
    let decimals = fresh ? 2 : priceDecimals;
    for (const b of bars) {
      decimals = Math.max(decimals, decimalsOf(b.open), decimalsOf(b.high), decimalsOf(b.low), decimalsOf(b.close));
    }
    decimals = Math.min(decimals, MAX_PRICE_DECIMALS);
    if (decimals !== priceDecimals) {
      priceDecimals = decimals;
      candles.applyOptions({ priceFormat: { type: "price", precision: decimals, minMove: 10 ** -decimals } });
    }
  }

  function markerOf(t, bar) {
    const names = bar.anomalies || [];
    if (!names.length) return null;
    // One marker per bar: a spike wins over a halt; an unknown flag looks like a spike.
    const name = names.includes("volume_spike") ? "volume_spike" : names[0];
    const look = ANOMALY_MARKERS[name] || ANOMALY_MARKERS.volume_spike;
    return { time: t, position: look.position, shape: look.shape, color: color(look.colorVar), text: look.text };
  }

  function renderMarkers() {
    markersApi.setMarkers([...markers.values()].sort((a, b) => a.time - b.time));
    state.markers = markers.size;
  }

  function setMarker(t, bar) {
    const marker = markerOf(t, bar);
    const had = markers.has(t);
    if (marker) markers.set(t, marker);
    else markers.delete(t);
    return Boolean(marker) || had;
  }

  /** Replace all data with a snapshot (ascending by ts). */
  function loadSnapshot(bars) {
    setData(bars);
    // Show the latest bars across the width (zoom and scroll go from there): a short
    // history is not squeezed into a corner, a long one is not crushed into slivers.
    const n = times.length;
    const shown = Math.min(Math.max(n, MIN_BARS_SHOWN), MAX_BARS_SHOWN);
    if (n) chart.timeScale().setVisibleLogicalRange({ from: n - shown, to: n - 1 + RIGHT_OFFSET_BARS });
    state.snapshots += 1;
  }

  function setData(bars) {
    byTime = new Map();
    markers = new Map();
    for (const bar of bars) {
      const t = toTime(bar.ts);
      byTime.set(t, bar);
      setMarker(t, bar);
    }
    times = [...byTime.keys()].sort((a, b) => a - b);
    fitPriceFormat(bars, true);
    candles.setData(times.map((t) => candleOf(t, byTime.get(t))));
    volume.setData(times.map((t) => volumeOf(t, byTime.get(t))));
    renderMarkers();
    chart.timeScale().applyOptions({ secondsVisible: state.tf === "1s" });
    afterChange();
  }

  /** Apply one bar: a new time appends, a known time is replaced in place (the forming bar). */
  function applyBar(bar) {
    const t = toTime(bar.ts);
    const last = times.length ? times[times.length - 1] : null;
    const known = byTime.has(t);
    byTime.set(t, bar);
    fitPriceFormat([bar]);
    if (last === null || t >= last) {
      if (!known) times.push(t);
      candles.update(candleOf(t, bar));
      volume.update(volumeOf(t, bar));
    } else if (known) {
      candles.update(candleOf(t, bar), true);
      volume.update(volumeOf(t, bar), true);
    } else {
      // A late bar between known ones: rare enough to redraw the series.
      times.push(t);
      times.sort((a, b) => a - b);
      candles.setData(times.map((x) => candleOf(x, byTime.get(x))));
      volume.setData(times.map((x) => volumeOf(x, byTime.get(x))));
    }
    if (setMarker(t, bar)) renderMarkers();
    afterChange();
  }

  function afterChange() {
    state.bars = times.length;
    const last = times.length ? byTime.get(times[times.length - 1]) : null;
    state.lastTs = last ? last.ts : null;
    state.lastClose = last ? last.close : null;
    body.dataset.bars = String(state.bars);
    // While the pointer is over a bar the legend stays on it.
    showLegend((hoverTime !== null && byTime.get(hoverTime)) || last);
    document.title = last && state.symbol ? `${state.symbol} ${formatPrice(last.close)} · ${state.tf}` : "Market data";
    if (state.bars === 0 && !state.error) notice(`No bars yet for ${state.symbol} at ${state.tf}.`);
    else if (!state.error) notice(null);
  }

  // ---- legend ----

  const formatPrice = (value) => Number(value).toFixed(priceDecimals);
  function formatVolume(value) {
    if (value >= 1e9) return `${(value / 1e9).toFixed(2)}B`;
    if (value >= 1e6) return `${(value / 1e6).toFixed(2)}M`;
    if (value >= 1e4) return `${(value / 1e3).toFixed(1)}K`;
    return String(value);
  }

  function previousBar(t) {
    let lo = 0;
    let hi = times.length; // first index with times[i] >= t
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (times[mid] < t) lo = mid + 1;
      else hi = mid;
    }
    return lo > 0 ? byTime.get(times[lo - 1]) : null;
  }

  function legendItem(parent, label, text, cls) {
    parent.append(`${label} `);
    const value = document.createElement("b");
    value.textContent = text;
    if (cls) value.className = cls;
    parent.append(value, " ");
  }

  function showLegend(bar) {
    $("legend-symbol").textContent = state.symbol || "";
    $("legend-tf").textContent = state.tf;
    const values = $("legend-values");
    values.replaceChildren();
    if (!bar) return;
    // Change against the previous bar's close, as trading UIs show it (the open for the first bar).
    const previous = previousBar(toTime(bar.ts));
    const base = previous ? previous.close : bar.open;
    const direction = bar.close >= base ? "up" : "down";
    legendItem(values, "O", formatPrice(bar.open), direction);
    legendItem(values, "H", formatPrice(bar.high), direction);
    legendItem(values, "L", formatPrice(bar.low), direction);
    legendItem(values, "C", formatPrice(bar.close), direction);
    const change = base ? ((bar.close - base) / base) * 100 : 0;
    legendItem(values, "", `${change >= 0 ? "+" : ""}${change.toFixed(2)}%`, direction);
    legendItem(values, "Vol", formatVolume(bar.volume));
    if (bar.anomalies && bar.anomalies.length) legendItem(values, "", bar.anomalies.join(", "), "flag");
    if (bar.final === false) legendItem(values, "", "forming");
  }

  let hoverTime = null;
  chart.subscribeCrosshairMove((param) => {
    hoverTime = param.time !== undefined && byTime.has(param.time) ? param.time : null;
    showLegend(hoverTime !== null ? byTime.get(hoverTime) : times.length ? byTime.get(times[times.length - 1]) : null);
  });

  // ---- notice and connection indicator ----

  function notice(text, withLogin) {
    $("notice").hidden = !text;
    $("notice-text").textContent = text || "";
    $("notice-link").hidden = !withLogin;
  }

  const STATUS_LABELS = {
    connecting: "Connecting",
    syncing: "Syncing",
    live: "Live",
    replay: "Replay",
    stale: "Stale",
    reconnecting: "Reconnecting",
    offline: "Disconnected",
    unavailable: "Unavailable",
  };
  let retryAt = 0;

  function showStatus(detail) {
    const c = state.connection;
    // An open socket shows the stream's state: refused (unknown symbol, not entitled, ...),
    // else the server's status of its feed.
    if (c !== "open") state.status = c;
    else state.status = state.error ? "unavailable" : state.feedStatus || "live";
    const el = $("connection");
    el.dataset.state = state.status;
    let label = STATUS_LABELS[state.status] || state.status;
    if (state.status === "reconnecting" && retryAt > Date.now()) {
      label += ` in ${Math.ceil((retryAt - Date.now()) / 1000)}s`;
    }
    el.querySelector(".connection-label").textContent = label;
    if (detail !== undefined) el.title = detail;
  }
  // The countdown of a reconnect ticks down.
  setInterval(() => {
    if (state.status === "reconnecting") showStatus();
  }, 500);

  // ---- the stream ----

  const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${body.dataset.wsPath}`;
  const feed = new window.MarketFeed.StreamClient({
    url: wsUrl,
    snapshot: SNAPSHOT_BARS,
    onSnapshot: (stream, bars, seq) => {
      state.error = null;
      state.lastSeq = seq;
      loadSnapshot(bars);
    },
    onBar: (stream, bar, seq) => {
      state.lastSeq = seq;
      applyBar(bar);
    },
    onState: (s) => {
      state.connection = s.state;
      state.reconnects = feed.reconnects;
      retryAt = s.retryAt || 0;
      if (s.state === "reconnecting" || s.state === "connecting") state.feedStatus = null;
      if (s.state === "offline") {
        state.error = s.detail;
        notice(
          s.code === 4001 ? "Log in to see live data." : `The gateway refused the connection (${s.detail}).`,
          s.code === 4001,
        );
      }
      showStatus(s.detail || "");
    },
    onStatus: (stream, status, message) => {
      state.feedStatus = status;
      showStatus(message || `feed ${status}`);
    },
    onError: (err) => {
      if (!err.stream || err.stream !== state.stream) {
        console.warn("gateway:", err.code, err.message);
        return;
      }
      state.error = err.code;
      notice(err.message || err.code);
      showStatus(err.message || err.code);
    },
  });

  window.chartFeed = feed; // for the console

  // ---- pickers ----

  function selectTimeframe(tf) {
    for (const button of $("timeframes").querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset.tf === tf));
    }
  }

  /** Show symbol at tf: remember it in the URL and local storage, and watch its stream. */
  function show(symbol, tf) {
    if (!symbol || !TIMEFRAMES.includes(tf)) return;
    if (symbol === state.symbol && tf === state.tf) return;
    state.symbol = symbol;
    state.tf = tf;
    state.stream = `bars:${tf}:${symbol}`;
    state.lastSeq = null;
    state.error = null;
    state.feedStatus = null;
    $("symbol-input").value = symbol;
    selectTimeframe(tf);
    const url = new URL(location.href);
    url.searchParams.set("symbol", symbol);
    url.searchParams.set("tf", tf);
    history.replaceState(null, "", url);
    try {
      localStorage.setItem("chart.symbol", symbol);
      localStorage.setItem("chart.tf", tf);
    } catch (_err) {
      // storage may be off; the URL still holds the choice
    }
    setData([]); // nothing until the new snapshot arrives
    notice(null);
    feed.watch(state.stream);
    showStatus();
  }

  $("timeframes").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-tf]");
    if (button) show(state.symbol, button.dataset.tf);
  });

  async function searchSymbols(query, signal) {
    const url = new URL(body.dataset.symbolsUrl, location.href);
    if (query) url.searchParams.set("search", query);
    url.searchParams.set("limit", String(SEARCH_LIMIT));
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" }, signal });
    if (!response.ok) throw new Error(`symbols: HTTP ${response.status}`);
    return (await response.json()).results;
  }

  // Symbol search: a combobox over GET /v1/symbols?search=...
  const input = $("symbol-input");
  const list = $("symbol-list");
  let results = [];
  let highlighted = -1;
  let searchTimer = null;
  let searchAbort = null;

  function openList(open) {
    list.hidden = !open;
    input.setAttribute("aria-expanded", String(open));
  }

  function renderResults() {
    list.replaceChildren();
    if (!results.length) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "No matching symbols";
      list.append(empty);
    }
    results.forEach((item, i) => {
      const li = document.createElement("li");
      li.setAttribute("role", "option");
      li.setAttribute("aria-selected", String(i === highlighted));
      li.dataset.index = String(i);
      if (!item.active) li.classList.add("inactive");
      for (const [cls, text] of [["sym", item.symbol], ["desc", item.description || ""], ["ds", item.dataset]]) {
        const span = document.createElement("span");
        span.className = cls;
        span.textContent = text;
        li.append(span);
      }
      list.append(li);
    });
    openList(true);
  }

  function runSearch() {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(async () => {
      if (searchAbort) searchAbort.abort();
      searchAbort = new AbortController();
      try {
        results = await searchSymbols(input.value.trim(), searchAbort.signal);
        highlighted = results.length ? 0 : -1;
        renderResults();
      } catch (err) {
        if (err.name !== "AbortError") console.warn(err);
      }
    }, SEARCH_DEBOUNCE_MS);
  }

  function choose(index) {
    const item = results[index];
    openList(false);
    if (item) show(item.symbol, state.tf);
    else input.value = state.symbol || "";
    input.blur();
  }

  input.addEventListener("focus", () => {
    input.select();
    runSearch();
  });
  input.addEventListener("input", runSearch);
  input.addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      if (!results.length) return;
      highlighted = (highlighted + (event.key === "ArrowDown" ? 1 : -1) + results.length) % results.length;
      renderResults();
      list.children[highlighted].scrollIntoView({ block: "nearest" });
    } else if (event.key === "Enter") {
      event.preventDefault();
      choose(highlighted);
    } else if (event.key === "Escape") {
      input.value = state.symbol || "";
      openList(false);
      input.blur();
    }
  });
  input.addEventListener("blur", () => {
    openList(false);
    if (input.value.trim().toUpperCase() !== state.symbol) input.value = state.symbol || "";
  });
  // mousedown, not click: it comes before the input's blur closes the list.
  list.addEventListener("mousedown", (event) => {
    const li = event.target.closest("li[data-index]");
    event.preventDefault();
    if (li) choose(Number(li.dataset.index));
  });

  // ---- start ----

  function stored(key) {
    try {
      return localStorage.getItem(key);
    } catch (_err) {
      return null; // storage may be off
    }
  }

  async function initialSymbol(params) {
    const fromUrl = params.get("symbol");
    if (fromUrl) return fromUrl;
    if (stored("chart.symbol")) return stored("chart.symbol");
    const url = new URL(body.dataset.symbolsUrl, location.href);
    url.searchParams.set("active", "true");
    url.searchParams.set("limit", "1");
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    const first = response.ok ? (await response.json()).results[0] : null;
    return first ? first.symbol : null;
  }

  async function start() {
    const params = new URLSearchParams(location.search);
    const tf = params.get("tf") || stored("chart.tf") || DEFAULT_TF;
    selectTimeframe(TIMEFRAMES.includes(tf) ? tf : DEFAULT_TF);
    feed.start();
    let symbol = null;
    try {
      symbol = await initialSymbol(params);
    } catch (err) {
      console.warn(err);
    }
    if (symbol) show(symbol, TIMEFRAMES.includes(tf) ? tf : DEFAULT_TF);
    else notice("No symbols yet: load some data first (make run does).");
  }

  start();
})();
