// Producer (DEALER) and Consumer (ROUTER) ends of a sage-zmq queue: PROTOCOL.md sections 1,
// 3, 4 and 9, mirroring sage_zmq/queues/_producer.py and _consumer.py.

import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import * as zmq from "zeromq";
import { Kind, decodeFrame, encodeData, encodeFrame } from "./codec.js";
import {
  DecodeError,
  DeliveryError,
  EmptyError,
  EncodeError,
  EndOfStream,
  FullError,
  QueueClosedError,
} from "./types.js";

const log = (msg) => process.stderr.write(`sagezmq: ${msg}\n`);

/** A producer id in the form sage-zmq uses: host:pid:random. */
export function newProducerId() {
  return `${hostname().slice(0, 40)}:${process.pid}:${randomBytes(4).toString("hex")}`;
}

/** Resolves waiters whenever something changes (credit arrives, a batch arrives). */
class Signal {
  constructor() {
    this.waiters = new Set();
  }
  wait(ms) {
    return new Promise((resolve) => {
      const done = (ok) => {
        clearTimeout(timer);
        this.waiters.delete(done);
        resolve(ok);
      };
      const timer = setTimeout(() => done(false), Math.max(0, ms));
      this.waiters.add(done);
    });
  }
  fire() {
    for (const done of [...this.waiters]) done(true);
  }
}

/** Serialises sends on one socket: zeromq.js allows one pending send at a time. */
class SendChain {
  constructor(sock, onError) {
    this.sock = sock;
    this.onError = onError;
    this.tail = Promise.resolve();
  }
  send(message) {
    this.tail = this.tail.then(() => this.sock.send(message)).catch(this.onError);
    return this.tail;
  }
}

/**
 * The producing end: connects a DEALER, says HELLO, sends DATA within credit, END, CLOSE.
 *
 * `maxsize` must be the queue's maxsize (both ends know it): it is the implicit first grant.
 * Times are in seconds, like the Python API.
 */
export class Producer {
  constructor(
    endpoint,
    {
      maxsize = 1000,
      queue = "",
      producerId = newProducerId(),
      batchSize = 100,
      timeout = 30,
      epoch = 0,
      nextSeq = 0,
      socketOptions = {},
    } = {},
  ) {
    if (!Number.isInteger(maxsize) || maxsize < 1) {
      throw new RangeError(`maxsize must be an integer >= 1 (the queue's maxsize), got ${maxsize}`);
    }
    this.endpoint = endpoint;
    this.queue = queue;
    this.epoch = epoch;
    this.producerId = producerId;
    this.maxsize = maxsize;
    this.batchSize = Math.max(1, batchSize);
    this.timeout = timeout;
    this.nextSeq = nextSeq;
    this.limit = nextSeq + maxsize; // implicit first grant (PROTOCOL.md section 4)
    this.received = nextSeq;
    this.acked = nextSeq;
    this.session = null;
    this.pending = [];
    this.errors = [];
    this.consumerErrors = [];
    this.closed = false;
    this._closing = false;
    this.stats = { sent: 0, batches: 0, bytes: 0, credits: 0, creditWaits: 0 };
    this._credit = new Signal();
    this._lostBySession = new Map(); // consumer session -> seqs it reported lost (CREDIT "lost")
    this._endSeqs = []; // seqs of the ENDs sent (resent with CLOSE while close waits)
    this._flushScheduled = false;
    this._socketOptions = socketOptions;
    this._sendError = null;
    this.refused = null; // why the consumer refuses us all (ERROR "wrong_queue"), if it does
    this._openSocket();
    this._sendHello();
  }

  /**
   * Seconds a plain producer waits for credit before it says HELLO again (section 4): the
   * consumer that owes it credit may have been replaced by one that never heard of it. The
   * reliable producer reintroduces itself by its own rules (null).
   */
  get rehelloAfter() {
    return 1;
  }

  _throwIfRefused(undelivered) {
    if (!this.refused) return;
    throw new DeliveryError(
      `refused by the consumer at ${this.endpoint}, which serves another queue (${this.refused}); ` +
        `is the endpoint stale?`,
      undelivered,
    );
  }

  /** A new DEALER (with its read loop and send chain) replaces the current one, if any. */
  _openSocket() {
    const sock = new zmq.Dealer({
      linger: 1000,
      sendHighWaterMark: 0,
      receiveHighWaterMark: 0,
      ...this._socketOptions,
    });
    this._configure(sock);
    sock.connect(this.endpoint);
    this._sock = sock;
    // A send failing on a socket that was since replaced is expected (it was closed).
    this._chain = new SendChain(sock, (err) => {
      if (sock === this._sock) this._sendError = err;
    });
    this._reader = this._readLoop(sock);
  }

  /** Called with a new socket before it connects (a monitor must see its first connect). */
  _configure(sock) {} // eslint-disable-line no-unused-vars

  _sendHello(acked = this.acked) {
    this._chain.send(
      encodeFrame(Kind.HELLO, {
        producer: this.producerId,
        epoch: this.epoch,
        queue: this.queue,
        next_seq: this.nextSeq,
        acked,
      }),
    );
  }

  /** A DATA or END frame for seqs [first, end) went out (the reliable producer keeps it). */
  _sent(first, end, frame) {} // eslint-disable-line no-unused-vars

  async _readLoop(sock) {
    try {
      for await (const [frame] of sock) {
        let msg;
        try {
          msg = decodeFrame(frame);
        } catch (err) {
          if (!(err instanceof DecodeError)) throw err;
          log(`bad frame from consumer: ${err.message}`);
          continue;
        }
        if (msg.kind === Kind.CREDIT) {
          this.refused = null; // a consumer of our queue answers (it took the endpoint)
          this._apply(msg.fields);
        } else if (msg.kind === Kind.ERROR) {
          this.consumerErrors.push(msg.fields);
          log(`consumer rejected a frame: ${msg.fields.message} (${msg.fields.code})`);
          if (msg.fields.code === "wrong_queue") {
            // Section 3: the consumer serves another queue and takes nothing from us.
            this.refused = String(msg.fields.message);
            this._credit.fire();
          }
        } else if (msg.kind !== Kind.RELEASE) {
          log(`unexpected ${msg.kindName} from consumer`);
        }
      }
    } catch (err) {
      if (!sock.closed) log(`producer receive loop stopped: ${err.message}`);
    }
  }

  _apply(credit) {
    // Cumulative and idempotent: keep the maximum of each (section 3).
    this.stats.credits += 1;
    this.session = credit.session;
    if (credit.lost !== undefined) {
      // Seqs this consumer session skipped for good (section 4): cumulative per session.
      const lost = Number(credit.lost);
      const before = this._lostBySession.get(credit.session) ?? 0;
      if (lost > before) {
        this._lostBySession.set(credit.session, lost);
        log(`the consumer never received ${lost - before} more records of this producer`);
      }
    }
    this.limit = Math.max(this.limit, Number(credit.limit));
    this.received = Math.max(this.received, Number(credit.received));
    this.acked = Math.max(this.acked, Number(credit.acked));
    this._credit.fire();
    if (this.pending.length) this._flushNow();
  }

  /** Records the consumer may still receive from this producer without new credit. */
  get room() {
    return this.limit - this.nextSeq - this.pending.length;
  }

  /** Queue one record; waits for credit up to `timeout` seconds, then throws FullError. */
  async put(record, { timeout = this.timeout } = {}) {
    if (this.closed) throw new QueueClosedError("producer was closed");
    if (record instanceof EndOfStream) return this.end({ timeout });
    this._raiseErrors();
    if (this.room <= 0) {
      this.stats.creditWaits += 1;
      const deadline = Date.now() + timeout * 1000;
      const every = this.rehelloAfter;
      let rehelloAt = every === null ? Infinity : Date.now() + every * 1000;
      while (this.room <= 0) {
        this._flushNow();
        this._throwIfRefused(this.pending.length + Math.max(0, this.nextSeq - this.received));
        if (Date.now() >= rehelloAt) {
          // acked = next_seq: this producer keeps nothing to resend (section 4).
          rehelloAt += every * 1000;
          this._sendHello(this.nextSeq);
        }
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new FullError(
            `queue is full: the consumer has not taken the ${this.maxsize} records it has ` +
              `room for within ${timeout} s; is it reading?`,
          );
        }
        await this._credit.wait(Math.min(left, 500));
      }
    }
    this.pending.push(record);
    if (this.pending.length >= this.batchSize) this._flushNow();
    else this._scheduleFlush();
  }

  _scheduleFlush() {
    // Puts made in one turn of the event loop go out as one batch.
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    setImmediate(() => {
      this._flushScheduled = false;
      this._flushNow();
    });
  }

  _flushNow() {
    while (this.pending.length) {
      const allowed = this.limit - this.nextSeq;
      if (allowed <= 0) return;
      const n = Math.min(this.pending.length, allowed, this.batchSize);
      const batch = this.pending.splice(0, n);
      const { frame, sent, errors } = encodeData(this.producerId, this.nextSeq, batch);
      if (sent.length) {
        this._chain.send(frame);
        this._sent(this.nextSeq, this.nextSeq + sent.length, frame);
        this.nextSeq += sent.length;
        this.stats.sent += sent.length;
        this.stats.batches += 1;
        this.stats.bytes += frame.length;
      }
      this.errors.push(...errors);
    }
  }

  _raiseErrors() {
    if (this._sendError) throw this._sendError;
    if (!this.errors.length) return;
    const [first, ...more] = this.errors;
    this.errors = [];
    const err = new EncodeError(`record dropped: ${first}${more.length ? ` (and ${more.length} more)` : ""}`);
    err.recordsDropped = more.length + 1;
    throw err;
  }

  async _drain(timeout) {
    const deadline = Date.now() + timeout * 1000;
    for (;;) {
      this._flushNow();
      if (!this.pending.length) break;
      const left = deadline - Date.now();
      if (left <= 0) break;
      await this._credit.wait(Math.min(left, 500));
    }
    await this._chain.tail;
  }

  /** Send everything pending, waiting for credit up to `timeout` seconds. */
  async flush({ timeout = this.timeout } = {}) {
    await this._drain(timeout);
    this._raiseErrors();
  }

  /** This upstream's end of stream: flush, then END (it takes one seq and needs no credit). */
  async end({ timeout = this.timeout } = {}) {
    if (this.closed) throw new QueueClosedError("producer was closed");
    await this._drain(timeout);
    if (this.pending.length) {
      throw new FullError(
        `end of stream not sent: ${this.pending.length} records still wait for credit`,
      );
    }
    const frame = encodeFrame(Kind.END, [this.producerId, this.nextSeq]);
    this._endSeqs.push(this.nextSeq);
    this._chain.send(frame);
    this._sent(this.nextSeq, this.nextSeq + 1, frame);
    this.nextSeq += 1;
    this.limit += 1; // END takes a seq, not buffer space
    await this._chain.tail;
    this._raiseErrors();
  }

  /** Ask the consumer for a CREDIT (answered by any live consumer that knows this producer). */
  async heartbeat() {
    await this._chain.send(encodeFrame(Kind.HEARTBEAT, [this.producerId]));
  }

  /** Every seq below this is confirmed: received (here), consumed (reliable producer). */
  get confirmed() {
    return this.received;
  }

  get _confirmedAs() {
    return "received";
  }

  /**
   * A broken connection may have taken the END and CLOSE (section 4): send the unconfirmed END
   * and the CLOSE again; the consumer ignores an END it has and answers every CLOSE.
   */
  _resendTail(closeSeq) {
    for (const seq of this._endSeqs) {
      if (seq >= this.received) this._chain.send(encodeFrame(Kind.END, [this.producerId, seq]));
    }
    this._chain.send(encodeFrame(Kind.CLOSE, [this.producerId, closeSeq]));
  }

  _sendClose() {
    this._chain.send(encodeFrame(Kind.CLOSE, [this.producerId, this.nextSeq]));
  }

  /**
   * Ship everything, send CLOSE and wait for the receipt (a CREDIT with received >= seq).
   * Throws DeliveryError naming how many records were not confirmed within `timeout` s.
   */
  async close({ timeout = this.timeout } = {}) {
    if (this.closed) return;
    const deadline = Date.now() + timeout * 1000;
    await this._drain(timeout);
    const unsent = this.pending.length;
    const closeSeq = this.nextSeq;
    this._closing = true;
    this._sendClose();
    let resendAt = Date.now() + 1000;
    while (this.confirmed < closeSeq && !this.refused) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      if (Date.now() >= resendAt) {
        resendAt += 1000;
        this._resendTail(closeSeq);
      }
      await this._credit.wait(Math.min(left, 500, Math.max(0, resendAt - Date.now())));
    }
    this._stop();
    await this._chain.tail;
    this.closed = true;
    this._sock.close();
    await this._reader;
    const undelivered = unsent + Math.max(0, closeSeq - this.confirmed);
    if (undelivered) this._throwIfRefused(undelivered);
    if (undelivered) {
      throw new DeliveryError(
        `${undelivered} records put were not confirmed as ${this._confirmedAs} by the consumer within ` +
          `${timeout} s (is the consumer running and reading?)`,
        undelivered,
      );
    }
    let lost = 0;
    for (const n of this._lostBySession.values()) lost += n;
    if (lost) {
      throw new DeliveryError(
        `${lost} records put were lost in transit: the consumer never received them ` +
          "(it refused their frame, or ZeroMQ dropped it; its log names the seqs)",
        lost,
      );
    }
    this._raiseErrors();
  }

  /** Close is about to shut the socket: stop background work (the reliable producer's timer). */
  _stop() {}
}

/** What the consumer knows of one producer. */
class Upstream {
  constructor(producer, peer, base) {
    this.producer = producer;
    this.peer = peer;
    this.received = base; // every seq below has arrived
    this.acked = base; // every seq below was consumed
    this.granted = 0; // the limit last granted
    this.closing = false;
    this.ended = false;
    this.endReceived = false;
    this.reported = base; // the acked last sent in a CREDIT
    this.reportedAt = 0;
    this.lost = 0; // seqs skipped for good (gaps), reported in CREDIT "lost"
  }
}

/**
 * The consuming end: binds a ROUTER, decodes frames, grants credit as records are consumed
 * (section 4), counts END per upstream (section 9), answers HELLO/CLOSE/HEARTBEAT with CREDIT.
 */
export class Consumer {
  constructor({
    maxsize = 1000,
    upstreams = 1,
    maxMessageSize = -1,
    exactFloats = false,
    queue = "",
  } = {}) {
    if (!Number.isInteger(maxsize) || maxsize < 1) {
      throw new RangeError(`maxsize must be an integer >= 1 (the queue's maxsize), got ${maxsize}`);
    }
    if (!Number.isInteger(upstreams) || upstreams < 1) {
      throw new RangeError(`upstreams must be an integer >= 1, got ${upstreams}`);
    }
    this.maxsize = maxsize;
    this.upstreams = upstreams;
    // The queue id ("" = not checked): a HELLO naming another queue is refused, and so is every
    // later frame of that connection (PROTOCOL.md section 3, ERROR "wrong_queue").
    this.queue = queue;
    this._foreign = new Map(); // peer (hex) -> the queue its HELLO named
    this.session = randomBytes(6).toString("hex");
    this.decodeOptions = {
      exactFloats,
      ...(maxMessageSize > 0 ? { maxFrameBytes: maxMessageSize, maxDecompressedBytes: maxMessageSize } : {}),
    };
    this.ups = new Map();
    this.batches = [];
    this.ended = 0;
    this.closed = false;
    this.stats = { received: 0, batches: 0, bytes: 0, duplicates: 0, gaps: 0, rejected: 0 };
    this._cur = null;
    this._curIdx = 0;
    this._curUp = null;
    this._curEnd = 0;
    this._arrival = new Signal();
    // sendTimeout 0: zeromq.js waits forever on a send to a vanished peer otherwise, instead
    // of failing with EHOSTUNREACH, and that would stall every later reply (Python uses NOBLOCK).
    this._sock = new zmq.Router({
      mandatory: true,
      sendTimeout: 0,
      linger: 0,
      sendHighWaterMark: 0,
      receiveHighWaterMark: 0,
      maxMessageSize,
    });
    // A reply to a producer that has gone fails with EHOSTUNREACH (ROUTER_MANDATORY); the
    // producer is gone, so there is nobody to tell.
    this._chain = new SendChain(this._sock, (err) => {
      if (err.code !== "EHOSTUNREACH") log(`reply not sent: ${err.code ?? ""} ${err.message}`);
    });
    this.endpoint = null;
    this._reader = null;
  }

  /** Bind (e.g. "tcp://127.0.0.1:*" for a free port); resolves to the bound endpoint. */
  async bind(endpoint = "tcp://127.0.0.1:*") {
    await this._sock.bind(endpoint);
    this.endpoint = this._sock.lastEndpoint;
    this._reader = this._readLoop();
    return this.endpoint;
  }

  async _readLoop() {
    try {
      for await (const parts of this._sock) {
        const peer = parts[0];
        if (parts.length !== 2) {
          this._reject(peer, `expected one frame per message, got ${parts.length - 1}`);
          continue;
        }
        let msg;
        try {
          msg = decodeFrame(parts[1], this.decodeOptions);
        } catch (err) {
          if (!(err instanceof DecodeError)) throw err;
          this._reject(peer, err.message);
          continue;
        }
        this._onMessage(peer, msg);
        this._arrival.fire();
      }
    } catch (err) {
      if (!this._sock.closed) log(`consumer receive loop stopped: ${err.message}`);
    }
  }

  _reject(peer, why, code = "rejected") {
    this.stats.rejected += 1;
    log(`rejected a frame from peer ${Buffer.from(peer).toString("hex")}: ${why}`);
    this._send(peer, encodeFrame(Kind.ERROR, { code, message: why.slice(0, 200) }));
  }

  /** True if the frame must be refused: its connection belongs to another queue. */
  _wrongQueue(peer, msg) {
    if (!this.queue) return false;
    const key = Buffer.from(peer).toString("hex");
    if (msg.kind === Kind.HELLO) {
      const named = msg.fields.queue;
      if (!named || named === this.queue) {
        this._foreign.delete(key);
        return false;
      }
      if (this._foreign.size >= 4096) this._foreign.delete(this._foreign.keys().next().value);
      this._foreign.set(key, named);
      this._reject(peer, `HELLO names queue '${named}'; this is '${this.queue}'`, "wrong_queue");
      return true;
    }
    const named = this._foreign.get(key);
    if (named === undefined) return false;
    this._reject(
      peer,
      `this connection's HELLO named queue '${named}'; this is '${this.queue}'`,
      "wrong_queue",
    );
    return true;
  }

  _send(peer, frame) {
    this._chain.send([peer, frame]);
  }

  _upstream(producer, peer, base) {
    let up = this.ups.get(producer);
    if (!up) {
      up = new Upstream(producer, peer, base);
      this.ups.set(producer, up);
    } else {
      up.peer = peer;
    }
    return up;
  }

  _share() {
    let active = 0;
    for (const up of this.ups.values()) if (!up.closing) active += 1;
    return Math.max(1, Math.floor(this.maxsize / (active || 1)));
  }

  _grant(up) {
    const limit = Math.max(up.granted, up.acked + this._share());
    up.granted = limit;
    up.reported = up.acked;
    up.reportedAt = performance.now();
    const body = { session: this.session, received: up.received, acked: up.acked, limit };
    if (up.lost) body.lost = up.lost;
    this._send(up.peer, encodeFrame(Kind.CREDIT, body));
  }

  /** Seqs up.received .. seq - 1 will never arrive (a refused or dropped frame): section 4. */
  _skipped(up, seq) {
    this.stats.gaps += seq - up.received;
    up.lost += seq - up.received;
    log(`producer ${up.producer} skipped seq ${up.received}..${seq - 1} (records lost in transit)`);
  }

  _onMessage(peer, msg) {
    if (this._wrongQueue(peer, msg)) return;
    const f = msg.fields;
    switch (msg.kind) {
      case Kind.DATA: {
        if (f.records.some((r) => r instanceof EndOfStream)) {
          // It would come out of get() like the real end (PROTOCOL.md section 9).
          this._reject(peer, "a DATA record is an EndOfStream: an upstream ends with an END frame");
          return;
        }
        const seq = Number(f.seq);
        const up = this._upstream(f.producer, peer, seq);
        let records = f.records;
        const end = seq + records.length;
        if (end <= up.received) {
          this.stats.duplicates += records.length;
          return;
        }
        if (seq > up.received) {
          this._skipped(up, seq);
        } else if (seq < up.received) {
          const skip = up.received - seq;
          this.stats.duplicates += skip;
          records = records.slice(skip);
        }
        up.received = end;
        this.batches.push({ up, end, records });
        this.stats.received += records.length;
        this.stats.batches += 1;
        this.stats.bytes += msg.nbytes;
        return;
      }
      case Kind.END: {
        const seq = Number(f.seq);
        const up = this._upstream(f.producer, peer, seq);
        if (seq < up.received) return; // a retransmitted END we already have
        if (seq > up.received) this._skipped(up, seq); // the frames before it were lost
        up.received = seq + 1;
        up.endReceived = true;
        this.batches.push({ up, end: seq + 1, records: null });
        return;
      }
      case Kind.HELLO: {
        const known = this.ups.has(f.producer);
        const up = this._upstream(f.producer, peer, Number(f.acked ?? f.next_seq));
        up.closing = false;
        if (!known) this._grant(up);
        return;
      }
      case Kind.CLOSE: {
        const seq = Number(f.seq);
        const up = this._upstream(f.producer, peer, seq);
        up.closing = true;
        if (seq > up.received) {
          this._skipped(up, seq); // frames before the CLOSE were lost: say so in the receipt
          up.received = seq;
        }
        this._grant(up); // the receipt the closing producer waits for
        return;
      }
      case Kind.HEARTBEAT: {
        const up = this.ups.get(f.producer);
        if (up) {
          up.peer = peer;
          this._grant(up);
        }
        return;
      }
      default:
        this._reject(peer, `${msg.kindName} is not sent to a consumer`);
    }
  }

  _retire() {
    const up = this._curUp;
    if (!up) return;
    this._curUp = null;
    this._cur = null;
    up.acked = this._curEnd;
    if (up.granted - up.acked <= Math.floor(this._share() / 2)) this._grant(up);
  }

  /** An END marker was consumed (the reliable consumer reports it at once). */
  _endConsumed(up) {} // eslint-disable-line no-unused-vars

  /** Upstreams that have ended so far. */
  get upstreamsEnded() {
    return this.ended;
  }

  /**
   * The next record, or an EndOfStream once every upstream has ended (and from then on).
   * Throws EmptyError when nothing arrives within `timeout` seconds (default: wait forever).
   */
  async get({ timeout = null } = {}) {
    const next = await this.next({ timeout });
    return next.done ? new EndOfStream() : next.value;
  }

  /** Records until every upstream has ended. */
  async *[Symbol.asyncIterator]() {
    for (;;) {
      const next = await this.next();
      if (next.done) return;
      yield next.value;
    }
  }

  /** {done: true} at end of stream, else {done: false, value}; EmptyError after `timeout` s. */
  async next({ timeout = null } = {}) {
    const deadline = timeout === null ? Infinity : Date.now() + timeout * 1000;
    for (;;) {
      if (this.closed) throw new QueueClosedError("consumer was closed");
      if (this._cur && this._curIdx < this._cur.length) {
        return { done: false, value: this._cur[this._curIdx++] };
      }
      this._retire();
      while (this.batches.length) {
        const { up, end, records } = this.batches.shift();
        if (records === null) {
          up.acked = end;
          up.ended = true;
          this.ended += 1;
          this._endConsumed(up);
          continue;
        }
        this._cur = records;
        this._curIdx = 0;
        this._curUp = up;
        this._curEnd = end;
        if (records.length) return { done: false, value: records[this._curIdx++] };
        this._retire(); // an empty batch still moves acked
      }
      if (this.ended >= this.upstreams) return { done: true };
      const left = deadline - Date.now();
      if (left <= 0) throw new EmptyError(`nothing arrived within ${timeout} s`);
      await this._arrival.wait(Math.min(left, 1000));
    }
  }

  /**
   * Stop consuming. A producer sends CLOSE right after its END and waits for the receipt, so
   * close() first waits (up to `timeout` s) for the CLOSE of every upstream whose END arrived,
   * and lingers so the receipts go out; a consumer that exits at end of stream would
   * otherwise leave those producers waiting for a receipt that never comes.
   */
  async close({ timeout = 2 } = {}) {
    if (this.closed) return;
    const deadline = Date.now() + timeout * 1000;
    const waiting = () => [...this.ups.values()].some((up) => up.endReceived && !up.closing);
    while (this._reader && waiting() && Date.now() < deadline) {
      await this._arrival.wait(Math.min(100, deadline - Date.now()));
    }
    this.closed = true;
    this._arrival.fire();
    await this._chain.tail;
    this._sock.linger = 1000;
    this._sock.close();
    if (this._reader) await this._reader;
  }
}
