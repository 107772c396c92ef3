// Reliable ends (`sage` queues): PROTOCOL.md section 5, mirroring sage_zmq/flow/reliable.py.
//
// ReliableProducer keeps every DATA/END frame until a CREDIT's `acked` passes it and
// retransmits (HELLO first, then the kept frames oldest first) on a new consumer session, on a
// `limit 0` CREDIT, on a reconnect, after declaring the consumer dead, and on ack timeout.
// ReliableConsumer accepts records strictly in sequence per producer, reports `acked` as the
// application consumes, and answers frames of producers it has no HELLO from with `limit 0`.

import { Kind, encodeFrame } from "./codec.js";
import { Consumer, Producer } from "./peers.js";

const log = (msg) => process.stderr.write(`sagezmq: ${msg}\n`);
const now = () => performance.now() / 1000; // monotonic seconds

/** Section 5 defaults, in seconds (sage-zmq's reliability.* settings). */
export const RELIABILITY_DEFAULTS = Object.freeze({
  heartbeatInterval: 1,
  liveness: 3,
  ackTimeout: 1,
  reconnectInitial: 1,
  reconnectMax: 32,
});

/** The reliability settings out of an options object, checked; RangeError names a bad one. */
export function reliabilitySettings(options = {}) {
  const t = {};
  for (const [name, fallback] of Object.entries(RELIABILITY_DEFAULTS)) {
    const value = options[name] ?? fallback;
    const ok = name === "liveness" ? Number.isInteger(value) && value >= 1 : value > 0;
    if (typeof value !== "number" || !ok) {
      const want = name === "liveness" ? "an integer >= 1" : "a number of seconds > 0";
      throw new RangeError(`${name} must be ${want}, got ${value}`);
    }
    t[name] = value;
  }
  if (t.reconnectMax < t.reconnectInitial) {
    throw new RangeError(
      `reconnectMax (${t.reconnectMax}) must be >= reconnectInitial (${t.reconnectInitial})`,
    );
  }
  // How often the timer looks at an end: as sage_zmq's ReliabilitySettings.tick.
  t.tick = Math.min(0.25, Math.max(0.005, Math.min(t.heartbeatInterval, t.ackTimeout) / 4));
  return t;
}

const ms = (seconds) => Math.max(1, Math.round(seconds * 1000));

/**
 * Paranoid Pirate bookkeeping (sage_zmq/flow/liveness.py): heartbeat when nothing was heard
 * and none was sent for an interval, dead after interval x liveness of silence, then
 * reconnect after doubling delays; hearing the peer revives it.
 */
class Liveness {
  constructor(t) {
    this.interval = t.heartbeatInterval;
    this.timeout = t.heartbeatInterval * t.liveness;
    this.initial = t.reconnectInitial;
    this.max = t.reconnectMax;
    this.delay = this.initial;
    this.lastHeard = now(); // a new peer gets a full grace period
    this.lastPing = this.lastHeard;
    this.alive = true;
    this.reconnectAt = 0;
  }
  heard() {
    this.lastHeard = now();
    if (!this.alive) {
      this.alive = true;
      this.delay = this.initial;
      log("consumer is alive again");
    }
  }
  /** {dead, reconnect, heartbeat}: what is due at time `t`. */
  check(t) {
    const due = { dead: false, reconnect: false, heartbeat: false };
    if (this.alive) {
      if (t - this.lastHeard >= this.timeout) {
        this.alive = false;
        due.dead = true;
        this.reconnectAt = t + this._backoff();
      }
    } else if (t >= this.reconnectAt) {
      this.reconnectAt = t + this._backoff();
      due.reconnect = true;
    }
    if (t - Math.max(this.lastHeard, this.lastPing) >= this.interval) {
      this.lastPing = t;
      due.heartbeat = true;
    }
    return due;
  }
  _backoff() {
    const delay = this.delay;
    this.delay = Math.min(this.delay * 2, this.max);
    return delay;
  }
}

/**
 * A producer for `sage` queues (or `tcp` queues with `ack`): as Producer, plus the options
 * heartbeatInterval, liveness, ackTimeout, reconnectInitial, reconnectMax (seconds). `close`
 * waits until the consumer *consumed* (acked) everything, not only received it.
 */
export class ReliableProducer extends Producer {
  constructor(endpoint, options = {}) {
    const t = reliabilitySettings(options);
    super(endpoint, {
      ...options,
      socketOptions: {
        // Section 5: ZMTP heartbeats and reconnect intervals from the same settings.
        heartbeatInterval: ms(t.heartbeatInterval),
        heartbeatTimeout: ms(t.heartbeatInterval * t.liveness),
        heartbeatTimeToLive: ms(t.heartbeatInterval * t.liveness),
        reconnectInterval: ms(t.reconnectInitial),
        reconnectMaxInterval: ms(t.reconnectMax),
        ...options.socketOptions,
      },
    });
    this.reliability = t;
    this.kept = []; // {first, end, frame}: sent, not yet acked, oldest first
    this.stats.retransmits = 0; // frames sent again
    this.stats.resends = 0; // retransmission rounds (each starts with HELLO)
    this.stats.reconnects = 0;
    this._live = new Liveness(t);
    this._progressAt = now(); // when `received` last moved (or the ack clock started)
    // Section 5 (e): an ack-timeout resend needs the consumer heard since the last one;
    // hearing nothing since the start is liveness's case, not a resend's.
    this._resentAt = this._live.lastHeard;
    this._promptAt = -Infinity;
    this._promptSession = null;
    this._reconnected = false;
    this._timer = setInterval(() => this._maintain(), ms(t.tick));
    this._timer.unref(); // an abandoned producer must not keep the process alive
  }

  get rehelloAfter() {
    return null; // it says HELLO again by section 5's rules (retransmission rounds)
  }

  get confirmed() {
    return this.acked;
  }

  get _confirmedAs() {
    return "consumed";
  }

  /** Records sent and still held for retransmission. */
  get keptRecords() {
    return this.kept.length ? this.kept[this.kept.length - 1].end - this.kept[0].first : 0;
  }

  _configure(sock) {
    // Counting connects: every one after the first is a reconnect after a lost connection,
    // and frames the old connection had in flight are gone.
    let connects = 0;
    sock.events.on("connect", () => {
      connects += 1;
      if (connects > 1 && sock === this._sock) this._reconnected = true;
    });
  }

  _sent(first, end, frame) {
    if (first <= this.received) this._progressAt = now(); // nothing older outstanding
    this.kept.push({ first, end, frame });
  }

  _apply(credit) {
    this.stats.credits += 1;
    this._live.heard();
    const limit = Number(credit.limit);
    const received = Number(credit.received);
    const acked = Number(credit.acked);
    if (limit === 0) {
      this._onPrompt(credit.session);
    } else if (credit.session !== this.session) {
      const old = this.session;
      this.session = credit.session;
      // A session's limit replaces the previous one (and the implicit grant, at the first
      // CREDIT), since it counts from what *that* consumer has acked (section 5).
      this.limit = limit;
      this.received = received;
      this.acked = Math.max(this.acked, acked);
      if (old !== null && this._promptSession !== credit.session) {
        this._resend(this.acked, `consumer restarted (session ${old} -> ${credit.session})`);
      }
    } else {
      this.limit = Math.max(this.limit, limit);
      if (received > this.received) {
        this.received = received;
        this._progressAt = now();
      }
      this.acked = Math.max(this.acked, acked);
    }
    while (this.kept.length && this.kept[0].end <= this.acked) this.kept.shift();
    this._credit.fire();
    if (this.pending.length) this._flushNow();
  }

  _onPrompt(session) {
    // "Who are you?": the consumer has no HELLO from us in its session (it restarted, or
    // our HELLO was lost). At most once per min(ackTimeout, 250 ms) per session.
    const t = now();
    const quiet = Math.min(this.reliability.ackTimeout, 0.25);
    if (session === this._promptSession && t - this._promptAt < quiet) return;
    this._promptSession = session;
    this._promptAt = t;
    this.received = this.acked;
    this._resend(this.acked, "consumer does not know this producer");
  }

  /** HELLO, then every kept frame not entirely below `start`, oldest first (no credit needed). */
  _resend(start, why) {
    this._sendHello();
    let n = 0;
    for (const k of this.kept) {
      if (k.end > start) {
        this._chain.send(k.frame);
        n += 1;
      }
    }
    if (this._closing) this._sendClose();
    this.stats.retransmits += n;
    this.stats.resends += 1;
    this._progressAt = this._resentAt = now();
    if (n && process.env.SAGEZMQ_DEBUG) log(`retransmitted ${n} frames (${why})`);
  }

  _maintain() {
    if (this.closed) return;
    const t = now();
    if (this._reconnected) {
      this._reconnected = false;
      this._resend(this.acked, "reconnected");
    }
    const due = this._live.check(t);
    if (due.dead) {
      log(`consumer declared dead (nothing heard for ${+this._live.timeout.toPrecision(3)} s)`);
    }
    if (due.reconnect) this._reconnect();
    if (due.heartbeat) this._chain.send(encodeFrame(Kind.HEARTBEAT, [this.producerId]));
    const last = this.kept[this.kept.length - 1];
    if (
      last &&
      last.end > this.received &&
      t - this._progressAt >= this.reliability.ackTimeout &&
      this._live.lastHeard > this._resentAt // else copies would only pile up unsent
    ) {
      this._resend(this.received, "ack timeout");
    }
  }

  _reconnect() {
    this.stats.reconnects += 1;
    const old = this._sock;
    old.linger = 0; // what it still queues is retransmitted anyway
    old.close();
    this._openSocket();
    this._resend(this.acked, "reconnect");
  }

  _stop() {
    clearInterval(this._timer);
  }

  /** Kept frames (END among them) and CLOSE are resent by the retransmission timer. */
  _resendTail() {}
}

/**
 * A consumer for `sage` queues: as Consumer, plus ackTimeout (seconds; acks not otherwise
 * reported go out within ackTimeout / 4) and receiptFrames (a CREDIT after that many DATA
 * frames of one producer, so a Python producer's in-flight window, sage-zmq's
 * reliability.max_in_flight = 8 frames, never waits for the application). Records count as
 * consumed when `get`/`next` returned them.
 */
export class ReliableConsumer extends Consumer {
  constructor(options = {}) {
    const t = reliabilitySettings(options);
    const { receiptFrames = 4 } = options;
    if (!Number.isInteger(receiptFrames) || receiptFrames < 1) {
      throw new RangeError(`receiptFrames must be an integer >= 1, got ${receiptFrames}`);
    }
    super(options);
    this.reliability = t;
    this.receiptFrames = receiptFrames;
    this._ackStep = Math.max(1, Math.floor(this.maxsize / 8));
    this._prompted = new Map(); // producer -> when it was last asked "who are you?"
    this.stats.prompts = 0;
    this._timer = null;
  }

  async bind(endpoint) {
    const bound = await super.bind(endpoint);
    this._timer = setInterval(() => this._tick(), ms(this.reliability.tick));
    this._timer.unref();
    return bound;
  }

  _grant(up) {
    up.frames = 0;
    super._grant(up);
  }

  _prompt(peer, producer) {
    const t = now();
    if (t - (this._prompted.get(producer) ?? -Infinity) < 0.02) return;
    if (this._prompted.size > 4096) this._prompted.clear();
    this._prompted.set(producer, t);
    this.stats.prompts += 1;
    this._send(
      peer,
      encodeFrame(Kind.CREDIT, { session: this.session, received: 0, acked: 0, limit: 0 }),
    );
  }

  _onMessage(peer, msg) {
    const f = msg.fields;
    if (msg.kind === Kind.HELLO) {
      this._onHello(peer, f);
      return;
    }
    if (![Kind.DATA, Kind.END, Kind.CLOSE, Kind.HEARTBEAT].includes(msg.kind)) {
      super._onMessage(peer, msg); // rejects kinds a consumer is not sent
      return;
    }
    const up = this.ups.get(f.producer);
    if (!up) {
      this._prompt(peer, f.producer);
      return;
    }
    up.peer = peer; // a reconnected producer speaks from a new routing id
    switch (msg.kind) {
      case Kind.DATA:
        this._onData(up, Number(f.seq), f.records, msg.nbytes);
        up.frames = (up.frames ?? 0) + 1;
        if (up.frames >= this.receiptFrames) this._grant(up);
        return;
      case Kind.END:
        this._onEnd(up, Number(f.seq));
        break;
      case Kind.CLOSE:
        up.closing = true;
        break;
      default: // HEARTBEAT
    }
    this._grant(up); // the END's or CLOSE's receipt, or the heartbeat's answer
  }

  _onHello(peer, f) {
    const acked = Number(f.acked ?? f.next_seq);
    let up = this.ups.get(f.producer);
    if (!up) {
      up = this._upstream(f.producer, peer, acked);
    } else {
      up.peer = peer;
      if (acked > up.received) up.received = acked; // the producer gave those seqs up
    }
    up.closing = false;
    this._prompted.delete(f.producer);
    this._grant(up);
  }

  _onData(up, seq, records, nbytes) {
    const end = seq + records.length;
    if (end <= up.received) {
      this.stats.duplicates += records.length;
      return;
    }
    if (seq > up.received) {
      this.stats.gaps += 1; // a frame before this one was lost: wait for the retransmission
      return;
    }
    if (seq < up.received) {
      this.stats.duplicates += up.received - seq;
      records = records.slice(up.received - seq);
    }
    up.received = end;
    this.batches.push({ up, end, records });
    this.stats.received += records.length;
    this.stats.batches += 1;
    this.stats.bytes += nbytes;
  }

  _onEnd(up, seq) {
    if (seq > up.received) {
      this.stats.gaps += 1;
      return;
    }
    if (seq < up.received) return; // a duplicate
    up.received = seq + 1;
    up.endReceived = true;
    this.batches.push({ up, end: seq + 1, records: null });
  }

  _retire() {
    const up = this._curUp;
    super._retire();
    if (
      up &&
      up.acked > up.reported &&
      (up.acked - up.reported >= this._ackStep || !this.batches.length)
    ) {
      this._grant(up);
    }
  }

  _endConsumed(up) {
    if (up.acked > up.reported) this._grant(up);
  }

  /** Count what the application took of the batch it is reading. */
  _ackPartial() {
    const up = this._curUp;
    if (!up || !this._cur) return;
    const done = this._curEnd - (this._cur.length - this._curIdx);
    if (done > up.acked) up.acked = done;
  }

  _tick() {
    if (this.closed) return;
    this._ackPartial();
    const t = performance.now();
    const after = (this.reliability.ackTimeout / 4) * 1000;
    for (const up of this.ups.values()) {
      if (up.acked > up.reported && t - up.reportedAt >= after) this._grant(up);
    }
  }

  async close(options = {}) {
    if (this.closed) return;
    clearInterval(this._timer);
    this._ackPartial();
    for (const up of this.ups.values()) {
      if (up.acked > up.reported) this._grant(up); // closing producers wait for this
    }
    await super.close(options);
  }
}
