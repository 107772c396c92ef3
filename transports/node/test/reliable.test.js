// Reliable mode (PROTOCOL.md section 5): each end against a scripted raw peer, and both ends
// together across a consumer restart. Loopback only.
import assert from "node:assert/strict";
import { test } from "node:test";
import * as zmq from "zeromq";
import {
  DeliveryError,
  EmptyError,
  EndOfStream,
  Kind,
  ReliableConsumer,
  ReliableProducer,
  decodeFrame,
  encodeFrame,
  reliabilitySettings,
} from "../sagezmq.js";

const FAST = { heartbeatInterval: 0.1, ackTimeout: 0.2, reconnectInitial: 0.02, reconnectMax: 0.2 };
const LONG = 20_000; // ms: bound on waits that normally take milliseconds

/** Receive with a deadline: the next message's frames, or a rejection naming what was awaited. */
async function within(promise, what, ms = LONG) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves once `cond()` holds (checked every few ms), or rejects after LONG. */
async function until(cond, what) {
  const deadline = Date.now() + LONG;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** A raw DEALER standing in for a producer. */
async function fakeProducer(endpoint) {
  const sock = new zmq.Dealer({ linger: 0 });
  sock.connect(endpoint);
  const send = (kind, body) => sock.send(encodeFrame(kind, body));
  const credit = async () => {
    const msg = decodeFrame((await within(sock.receive(), "a CREDIT"))[0]);
    assert.equal(msg.kind, Kind.CREDIT);
    return msg.fields;
  };
  return { sock, send, credit };
}

/** A raw ROUTER standing in for a consumer; `next(kinds)` skips frames of other kinds. */
async function fakeConsumer() {
  const sock = new zmq.Router({ linger: 0 });
  await sock.bind("tcp://127.0.0.1:*");
  let peer = null;
  const next = async (...kinds) => {
    for (;;) {
      const [id, frame] = await within(sock.receive(), `a frame of kind ${kinds}`);
      peer = id;
      const msg = decodeFrame(frame);
      if (!kinds.length || kinds.includes(msg.kind)) return msg;
    }
  };
  const credit = (session, received, acked, limit) =>
    sock.send([peer, encodeFrame(Kind.CREDIT, { session, received, acked, limit })]);
  return { sock, endpoint: sock.lastEndpoint, next, credit };
}

test("reliability settings are checked", () => {
  assert.equal(reliabilitySettings().heartbeatInterval, 1);
  assert.equal(reliabilitySettings(FAST).tick, 0.025);
  assert.throws(() => reliabilitySettings({ ackTimeout: 0 }), /ackTimeout must be/);
  assert.throws(() => reliabilitySettings({ liveness: 1.5 }), /liveness must be an integer/);
  assert.throws(() => reliabilitySettings({ reconnectMax: 0.5 }), /reconnectMax/);
});

test("consumer: who-are-you, in-sequence acceptance, acks as records are consumed", async () => {
  const consumer = new ReliableConsumer({ maxsize: 80, ...FAST });
  const p = await fakeProducer(await consumer.bind());
  try {
    // DATA before any HELLO: dropped, answered with limit 0.
    await p.send(Kind.DATA, ["p", 0, ["lost"]]);
    assert.deepEqual(
      (({ received, acked, limit }) => ({ received, acked, limit }))(await p.credit()),
      { received: 0, acked: 0, limit: 0 },
    );
    await p.send(Kind.HELLO, { producer: "p", epoch: 0, queue: "q", next_seq: 0, acked: 0 });
    const hello = await p.credit();
    assert.equal(hello.limit, 80);
    await p.send(Kind.DATA, ["p", 0, ["a", "b", "c"]]);
    await p.send(Kind.DATA, ["p", 5, ["f"]]); // after a gap: dropped
    await p.send(Kind.DATA, ["p", 2, ["c", "d", "e"]]); // overlap: trimmed to d, e
    await p.send(Kind.DATA, ["p", 0, ["a"]]); // duplicate
    await p.send(Kind.HEARTBEAT, ["p"]);
    const beat = await p.credit();
    assert.deepEqual([beat.received, beat.acked, beat.session], [5, 0, hello.session]);
    const got = [];
    for (let i = 0; i < 5; i++) got.push(await consumer.get({ timeout: 10 }));
    assert.deepEqual(got, ["a", "b", "c", "d", "e"]);
    await assert.rejects(consumer.get({ timeout: 0.05 }), EmptyError);
    // Consumed, so reported without being asked.
    for (;;) {
      const c = await p.credit();
      if (c.acked === 5) break;
    }
    assert.equal(consumer.stats.gaps, 1);
    assert.equal(consumer.stats.duplicates, 2);
    // END after a gap is dropped (but answered); END in sequence ends the stream.
    await p.send(Kind.END, ["p", 6]);
    assert.equal((await p.credit()).received, 5);
    await p.send(Kind.END, ["p", 5]);
    assert.equal((await p.credit()).received, 6);
    assert.ok((await consumer.get({ timeout: 10 })) instanceof EndOfStream);
    for (;;) {
      const c = await p.credit();
      if (c.acked === 6) break; // the end of stream is reported at once
    }
    // A HELLO whose acked is above `received` moves it (the seqs were given up).
    await p.send(Kind.HELLO, { producer: "p", epoch: 0, queue: "q", next_seq: 9, acked: 9 });
    assert.equal((await p.credit()).received, 9);
  } finally {
    p.sock.close();
    await consumer.close({ timeout: 0 }); // (no CLOSE will come for that END)
  }
});

test("producer: keeps frames until acked and retransmits on every trigger", async () => {
  const c = await fakeConsumer();
  const producer = new ReliableProducer(c.endpoint, { maxsize: 100, producerId: "p", ...FAST });
  try {
    assert.equal((await c.next(Kind.HELLO)).fields.acked, 0);
    await c.credit("s1", 0, 0, 100);
    for (const r of [1, 2, 3]) await producer.put(r);
    await producer.flush();
    assert.deepEqual((await c.next(Kind.DATA)).fields.records, [1, 2, 3]);
    await c.credit("s1", 3, 0, 100); // received, not consumed: kept
    await until(() => producer.received === 3, "the CREDIT");
    assert.equal(producer.kept.length, 1);
    await c.credit("s1", 3, 3, 103);
    await until(() => producer.kept.length === 0, "the acked frame to be dropped");
    await producer.put(4);
    await producer.flush();
    assert.equal((await c.next(Kind.DATA)).fields.seq, 3);
    // (b) "who are you?": HELLO first, then the kept frame.
    await c.credit("s1", 0, 0, 0);
    assert.equal((await c.next(Kind.HELLO, Kind.DATA)).kind, Kind.HELLO);
    assert.equal((await c.next(Kind.DATA)).fields.seq, 3);
    // (a) a new session: HELLO (acked 3) and the unacked frame again; its limit replaces.
    // (Nothing was heard since the last resend, so no ack-timeout resend can come between.)
    await c.credit("s2", 3, 3, 50);
    const hello = await c.next(Kind.HELLO);
    assert.deepEqual([hello.fields.acked, hello.fields.next_seq], [3, 4]);
    assert.deepEqual((await c.next(Kind.DATA)).fields.records, [4]);
    await until(() => producer.session === "s2", `session s2 (at ${producer.session})`);
    assert.equal(producer.limit, 50);
    // (e) ack timeout: answered heartbeats but no progress of `received`: sent once more.
    for (;;) {
      const msg = await c.next(Kind.HEARTBEAT, Kind.DATA, Kind.HELLO);
      if (msg.kind === Kind.DATA) {
        assert.equal(msg.fields.seq, 3);
        break;
      }
      if (msg.kind === Kind.HEARTBEAT) await c.credit("s2", 3, 3, 50);
    }
    assert.ok(producer.stats.retransmits >= 3);
    // Received but not acked: held, never resent for a timeout; close waits for the ack.
    await c.credit("s2", 4, 3, 50);
    const before = producer.stats.retransmits;
    const closing = producer.close({ timeout: 10 });
    assert.deepEqual((await c.next(Kind.CLOSE)).fields, { producer: "p", seq: 4 });
    for (let beats = 0; beats < 5; ) {
      const msg = await c.next();
      assert.notEqual(msg.kind, Kind.DATA, "a received frame was resent");
      if (msg.kind === Kind.HEARTBEAT) {
        beats += 1;
        await c.credit("s2", 4, 3, 50);
      }
    }
    assert.equal(producer.stats.retransmits, before);
    assert.equal(producer.closed, false, "close returned before the consumer acked");
    await c.credit("s2", 4, 4, 50);
    await within(closing, "close");
    assert.equal(producer.kept.length, 0);
  } finally {
    if (!producer.closed) await producer.close({ timeout: 0.1 }).catch(() => {});
    c.sock.close();
  }
});

test("producer: close reports records not consumed", async () => {
  const c = await fakeConsumer();
  const producer = new ReliableProducer(c.endpoint, { maxsize: 10, ...FAST });
  try {
    await c.next(Kind.HELLO);
    await c.credit("s", 0, 0, 10);
    for (let i = 0; i < 4; i++) await producer.put(i);
    await producer.end();
    await c.next(Kind.END);
    await c.credit("s", 5, 2, 12); // all received, two consumed
    await assert.rejects(producer.close({ timeout: 0.3 }), (err) => {
      assert.ok(err instanceof DeliveryError);
      assert.equal(err.undelivered, 3);
      assert.match(err.message, /consumed/);
      return true;
    });
  } finally {
    c.sock.close();
  }
});

test("a consumer restart mid-stream loses nothing (new session, same port)", async () => {
  const first = new ReliableConsumer({ maxsize: 50, ...FAST });
  const endpoint = await first.bind();
  const producer = new ReliableProducer(endpoint, { maxsize: 50, batchSize: 10, ...FAST });
  const n = 3000;
  const sending = (async () => {
    for (let i = 0; i < n; i++) await producer.put(i);
    await producer.end();
    await producer.close({ timeout: 20 });
  })();
  const got = [];
  for (let i = 0; i < 1000; i++) got.push(await first.get({ timeout: 10 }));
  await first.close({ timeout: 0 });
  const second = new ReliableConsumer({ maxsize: 50, ...FAST });
  try {
    const deadline = Date.now() + LONG;
    for (;;) {
      try {
        await second.bind(endpoint); // once libzmq has released the port
        break;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 10));
      }
    }
    const rest = [];
    for (;;) {
      const r = await second.get({ timeout: 10 });
      if (r instanceof EndOfStream) break;
      rest.push(r);
    }
    await within(sending, "the producer's close");
    assert.deepEqual(got, Array.from({ length: 1000 }, (_, i) => i));
    assert.ok(rest[0] <= 1000, `second life started at ${rest[0]}: records were skipped`);
    assert.deepEqual(rest, Array.from({ length: n - rest[0] }, (_, i) => rest[0] + i));
    assert.ok(producer.stats.resends >= 1);
  } finally {
    await second.close();
  }
});
