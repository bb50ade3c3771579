/*
 * The WebSocket client of the chart page (protocol v1, SPEC section 5), without any DOM.
 *
 * It keeps one socket and one watched stream. Every message of a stream carries a seq
 * that rises by exactly one, so the client keeps the last seq it applied: a message at or
 * below it is a duplicate and is dropped; one further ahead means something was missed,
 * and the client asks the server to resume from the last seq (the server replays what was
 * missed, or answers with a fresh snapshot). After a dropped socket it reconnects with a
 * capped, jittered backoff and resumes the same way, so a network blip leaves no hole.
 *
 * Exposed as window.MarketFeed.StreamClient.
 */
(function () {
  "use strict";

  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 8000;
  const CONNECT_TIMEOUT_MS = 10000;
  const DEFAULT_HEARTBEAT_S = 20;
  // No message for this many heartbeats: the socket is dead even if TCP has not noticed.
  const DEAD_AFTER_HEARTBEATS = 2.5;
  // Resume answers that still leave the client behind before it falls back to a snapshot.
  const MAX_RESUME_RETRIES = 3;
  // Close codes after which reconnecting cannot help (SPEC: 4001 unauthenticated, 4003 refused).
  const FATAL_CLOSE_CODES = new Set([4001, 4003]);

  class StreamClient {
    /**
     * @param {object} options
     *   url: the WebSocket URL; snapshot: bars asked for on a fresh subscribe;
     *   onSnapshot(stream, bars, seq): replace the chart's data;
     *   onBar(stream, bar, seq): apply one bar (a later bar for the same ts replaces it);
     *   onState(state): socket state, one of connecting, syncing, open, reconnecting, offline
     *     (state.detail: a reason, state.code: the close code, state.retryAt: ms epoch);
     *   onStatus(stream, status, message): the feed's status (live, stale, replay);
     *   onError(error): an error message from the server ({code, message, stream}).
     */
    constructor(options) {
      this.url = options.url;
      this.snapshot = options.snapshot;
      this.maxSnapshot = options.snapshot; // lowered to the server's limit by welcome
      this.handlers = options;
      this.stream = null; // the watched stream
      this.lastSeq = null; // last seq applied on the watched stream; null until a snapshot
      this.pending = []; // bars that arrived before the snapshot answer
      this.syncing = false; // a subscribe or resume is unanswered
      this.resumeRetries = 0;
      this.ws = null;
      this.heartbeatS = DEFAULT_HEARTBEAT_S;
      this.lastMessageAt = 0;
      this.attempt = 0;
      this.reconnects = 0;
      this.nextId = 1;
      this.retryTimer = null;
      this.watchdog = null;
      this.stopped = false;
    }

    /** Open the socket (once); it reconnects by itself from then on. */
    start() {
      this.connect();
      this.watchdog = setInterval(() => this.checkAlive(), 1000);
      // Coming back online or to the tab: do not wait for the rest of a backoff.
      window.addEventListener("online", () => this.reconnectNow());
      document.addEventListener("visibilitychange", () => {
        if (document.visibilityState === "visible") this.reconnectNow();
      });
    }

    /** Watch another stream instead of the current one (its data starts from a new snapshot). */
    watch(stream) {
      if (stream === this.stream) return;
      const previous = this.stream;
      this.stream = stream;
      this.lastSeq = null;
      this.pending = [];
      this.resumeRetries = 0;
      if (!this.isOpen()) return;
      if (previous) this.send({ op: "unsubscribe", id: this.id(), streams: [previous] });
      this.subscribe();
    }

    // ---- socket lifecycle ----

    connect() {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.welcomed = false;
      this.emitState("connecting");
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (err) {
        this.scheduleReconnect(String(err));
        return;
      }
      this.ws = ws;
      this.lastMessageAt = Date.now();
      ws.onmessage = (event) => this.receive(event.data);
      ws.onclose = (event) => this.closed(event.code, event.reason);
      // An error is always followed by a close event, which does the work.
      ws.onerror = () => {};
    }

    isOpen() {
      return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.welcomed;
    }

    /** Forget the current socket without waiting for its close handshake, then reconnect. */
    drop(reason) {
      const ws = this.ws;
      if (ws) {
        ws.onmessage = ws.onclose = ws.onerror = null;
        try {
          ws.close(1000, reason.slice(0, 100));
        } catch (_err) {
          // already closed
        }
      }
      this.ws = null;
      this.scheduleReconnect(reason);
    }

    closed(code, reason) {
      this.ws = null;
      if (FATAL_CLOSE_CODES.has(code)) {
        this.emitState("offline", { code, detail: reason || (code === 4001 ? "unauthenticated" : "refused") });
        return;
      }
      this.scheduleReconnect(reason || `closed (${code})`, code);
    }

    scheduleReconnect(detail, code) {
      if (this.stopped || this.retryTimer) return;
      this.syncing = false;
      // Capped exponential backoff with jitter, so many pages do not return in lockstep.
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
      const delay = Math.round(cap / 2 + (Math.random() * cap) / 2);
      this.attempt += 1;
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        this.reconnects += 1;
        this.connect();
      }, delay);
      this.emitState("reconnecting", { detail, code, retryAt: Date.now() + delay });
    }

    reconnectNow() {
      if (!this.retryTimer) return;
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.reconnects += 1;
      this.connect();
    }

    checkAlive() {
      if (!this.ws) return;
      const silentMs = Date.now() - this.lastMessageAt;
      const limitMs = this.welcomed ? DEAD_AFTER_HEARTBEATS * this.heartbeatS * 1000 : CONNECT_TIMEOUT_MS;
      if (silentMs > limitMs) this.drop(`no message for ${Math.round(silentMs / 1000)} s`);
    }

    // ---- protocol ----

    id() {
      return this.nextId++;
    }

    send(message) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
    }

    /** Subscribe to the watched stream: resume after the last seq if there is one, else a snapshot. */
    subscribe() {
      if (!this.stream) return;
      const message = { op: "subscribe", id: this.id(), streams: [this.stream] };
      if (this.lastSeq === null) message.snapshot = Math.min(this.snapshot, this.maxSnapshot);
      else message.resume = { [this.stream]: this.lastSeq };
      this.syncing = true;
      this.emitState("syncing");
      this.send(message);
    }

    receive(text) {
      this.lastMessageAt = Date.now();
      let msg;
      try {
        msg = JSON.parse(text);
      } catch (_err) {
        return;
      }
      switch (msg.type) {
        case "welcome":
          this.welcomed = true;
          this.attempt = 0;
          if (msg.heartbeat_s > 0) this.heartbeatS = msg.heartbeat_s;
          if (msg.limits && msg.limits.max_snapshot >= 0) this.maxSnapshot = msg.limits.max_snapshot;
          this.emitState("open");
          this.subscribe();
          break;
        case "subscribed":
          if (msg.stream === this.stream) this.snapshotReceived(msg);
          break;
        case "resumed":
          if (msg.stream === this.stream) this.resumed(msg);
          break;
        case "bar":
        case "trade":
          if (msg.stream === this.stream) this.sequenced(msg);
          break;
        case "status":
          if (msg.stream === this.stream && this.handlers.onStatus) {
            this.handlers.onStatus(msg.stream, msg.status, msg.message || "");
          }
          break;
        case "error":
          if (msg.stream === this.stream && this.syncing) {
            this.syncing = false;
            this.emitState("open");
          }
          if (this.handlers.onError) this.handlers.onError(msg);
          break;
        default: // heartbeat, pong, unsubscribed: being alive is all they say
      }
    }

    snapshotReceived(msg) {
      this.lastSeq = msg.seq;
      this.syncing = false;
      this.resumeRetries = 0;
      this.handlers.onSnapshot(msg.stream, msg.snapshot || [], msg.seq);
      // The server joins the stream before it builds the snapshot, so bars may overtake it.
      const early = this.pending;
      this.pending = [];
      for (const frame of early) this.sequenced(frame);
      this.emitState("open");
    }

    resumed(msg) {
      if (!msg.recovered) {
        // The server's buffer no longer reaches back (or it found a gap it cannot fill):
        // start over from its snapshot, or ask for one.
        if (Array.isArray(msg.snapshot)) this.snapshotReceived(msg);
        else {
          this.lastSeq = null;
          this.subscribe();
        }
        return;
      }
      this.syncing = false;
      if (this.lastSeq !== null && this.lastSeq < msg.seq) {
        // Recovered, yet some replayed message never reached us: ask again, then give up
        // on resuming and take a snapshot.
        this.resumeRetries += 1;
        if (this.resumeRetries > MAX_RESUME_RETRIES) this.lastSeq = null;
        this.subscribe();
        return;
      }
      this.resumeRetries = 0;
      this.emitState("open");
    }

    sequenced(frame) {
      if (this.lastSeq === null) {
        this.pending.push(frame);
        return;
      }
      if (frame.seq <= this.lastSeq) return; // already applied (snapshot or replay)
      if (frame.seq > this.lastSeq + 1) {
        // A hole: resume from what we have; frames arriving meanwhile come again in the replay.
        if (!this.syncing) this.subscribe();
        return;
      }
      this.lastSeq = frame.seq;
      this.handlers.onBar(frame.stream, frame.data, frame.seq);
    }

    emitState(state, extra) {
      if (this.handlers.onState) this.handlers.onState(Object.assign({ state }, extra || {}));
    }
  }

  window.MarketFeed = { StreamClient };
})();
