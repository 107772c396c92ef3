// Producer and Consumer against each other over tcp on 127.0.0.1.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import * as zmq from "zeromq";
import {
  Consumer,
  DeliveryError,
  EmptyError,
  EndOfStream,
  F64,
  FullError,
  Kind,
  NdArray,
  Packet,
  Producer,
  decodeFrame,
  encodeFrame,
  toTyped,
} from "../sagezmq.js";

async function collect(consumer, timeout = 30) {
  const out = [];
  for (;;) {
    const rec = await consumer.get({ timeout });
    if (rec instanceof EndOfStream && consumer.upstreamsEnded >= consumer.upstreams) return out;
    out.push(rec);
  }
}

test("records, credits and end of stream with a small window", async () => {
  const consumer = new Consumer({ maxsize: 10 });
  const endpoint = await consumer.bind();
  const producer = new Producer(endpoint, { maxsize: 10, batchSize: 4 });
  try {
    const sending = (async () => {
      for (let i = 0; i < 500; i++) await producer.put(i);
      await producer.end();
      await producer.close();
    })();
    const got = await collect(consumer);
    await sending;
    assert.deepEqual(got, Array.from({ length: 500 }, (_, i) => i));
    assert.ok(producer.stats.credits > 10, "credit must have been granted many times");
    assert.ok(producer.stats.creditWaits > 0, "a window of 10 must make the producer wait");
    assert.ok(await consumer.get({ timeout: 1 }) instanceof EndOfStream, "EOS stays reported");
  } finally {
    await consumer.close();
  }
});

test("two upstreams: end of stream only after both ended", async () => {
  const consumer = new Consumer({ maxsize: 50, upstreams: 2 });
  const endpoint = await consumer.bind();
  const a = new Producer(endpoint, { maxsize: 50, producerId: "a" });
  const b = new Producer(endpoint, { maxsize: 50, producerId: "b" });
  try {
    const sendingA = (async () => {
      for (let i = 0; i < 100; i++) await a.put(`a${i}`);
      await a.end();
      await a.close();
    })();
    const first = [];
    for (let i = 0; i < 100; i++) first.push(await consumer.get({ timeout: 30 }));
    await sendingA;
    // a has ended; with b still open the consumer must not report end of stream
    await assert.rejects(consumer.get({ timeout: 0.2 }), EmptyError);
    assert.equal(consumer.upstreamsEnded, 1);
    const sendingB = (async () => {
      for (let i = 0; i < 100; i++) await b.put(`b${i}`);
      await b.end();
      await b.close();
    })();
    const rest = await collect(consumer);
    await sendingB;
    assert.deepEqual(first, Array.from({ length: 100 }, (_, i) => `a${i}`));
    assert.deepEqual(rest, Array.from({ length: 100 }, (_, i) => `b${i}`));
  } finally {
    await consumer.close();
  }
});

test("typed records survive the trip", async () => {
  const consumer = new Consumer({ maxsize: 100, exactFloats: true });
  const endpoint = await consumer.bind();
  const producer = new Producer(endpoint, { maxsize: 100 });
  const records = [
    null, true, 7, -7, 2n ** 63n - 1n, new F64(3), 0.5, "s", new Uint8Array([1, 2]),
    [1, [2]], new Map([[1, "one"]]), { a: { b: [1.5] } },
    new Packet({ v: 1 }, { partitionKey: "k", headers: { h: 1 }, timestamp: 1700000000.5 }),
    new NdArray("<f8", [2], new Uint8Array(16)),
  ]; // (put(EndOfStream) means END, as in Python, so it is not a record here)
  try {
    for (const r of records) await producer.put(r);
    await producer.end();
    await producer.close();
    const got = await collect(consumer);
    const expected = records.map(toTyped);
    expected[10] = { map: [[{ str: "1" }, { str: "one" }]] }; // JS objects have string keys
    assert.deepEqual(got.map(toTyped), expected);
  } finally {
    await consumer.close();
  }
});

test("close without a consumer reports what was not delivered", async () => {
  const router = new zmq.Router();
  await router.bind("tcp://127.0.0.1:*");
  const endpoint = router.lastEndpoint;
  router.close(); // nobody answers on this port now
  const producer = new Producer(endpoint, { maxsize: 5 });
  for (let i = 0; i < 5; i++) await producer.put(i);
  await assert.rejects(producer.put(5, { timeout: 0.2 }), FullError);
  await assert.rejects(producer.close({ timeout: 0.3 }), (err) => {
    assert.ok(err instanceof DeliveryError);
    assert.equal(err.undelivered, 5);
    return true;
  });
});

/** A Consumer (maxsize 8) and a raw DEALER connected to it playing the producer. */
async function consumerWithRawProducer() {
  const consumer = new Consumer({ maxsize: 8 });
  const dealer = new zmq.Dealer();
  dealer.connect(await consumer.bind());
  const next = async () => decodeFrame((await dealer.receive())[0]);
  return { consumer, dealer, next };
}

test("the consumer answers HEARTBEAT and CLOSE with CREDIT and rejects bad frames", async () => {
  const { consumer, dealer, next } = await consumerWithRawProducer();
  try {
    const hello = { producer: "p", epoch: 0, queue: "q", next_seq: 0, acked: 0 };
    await dealer.send(encodeFrame(Kind.HELLO, hello));
    const first = await next();
    assert.equal(first.kind, Kind.CREDIT);
    assert.deepEqual(
      { received: first.fields.received, acked: first.fields.acked, limit: first.fields.limit },
      { received: 0, acked: 0, limit: 8 },
    );
    await dealer.send(encodeFrame(Kind.DATA, ["p", 0, [1, 2, 3]]));
    await dealer.send(encodeFrame(Kind.HEARTBEAT, ["p"]));
    const beat = await next();
    assert.equal(beat.kind, Kind.CREDIT);
    assert.equal(beat.fields.received, 3);
    assert.equal(beat.fields.session, first.fields.session);
    await dealer.send(Uint8Array.from([0x53, 0x5a, 2, 4, 0, 0, 0, 0, 0x92, 0xa1, 0x70, 1]));
    const error = await next();
    assert.equal(error.kind, Kind.ERROR);
    assert.equal(error.fields.code, "rejected");
    assert.match(error.fields.message, /version 2/);
    await dealer.send(encodeFrame(Kind.CLOSE, ["p", 3]));
    const receipt = await next();
    assert.equal(receipt.kind, Kind.CREDIT);
    assert.equal(receipt.fields.received, 3);
    assert.equal(consumer.stats.rejected, 1);
  } finally {
    dealer.close();
    await consumer.close();
  }
});

test("a record that cannot be encoded is reported; the rest of its batch still goes", async () => {
  const consumer = new Consumer({ maxsize: 100 });
  const endpoint = await consumer.bind();
  const producer = new Producer(endpoint, { maxsize: 100 });
  try {
    producer.put(1);
    producer.put(new Date(0)); // no wire form
    await producer.put(3);
    await assert.rejects(producer.flush(), (err) => {
      assert.equal(err.name, "EncodeError");
      assert.match(err.message, /Date/);
      return true;
    });
    await producer.end();
    await producer.close();
    assert.deepEqual(await collect(consumer), [1, 3]);
  } finally {
    await consumer.close();
  }
});

test("a consumer that knows its queue refuses another queue's producer", async () => {
  const consumer = new Consumer({ maxsize: 10, queue: "theirs" });
  const endpoint = await consumer.bind();
  const stray = new Producer(endpoint, { maxsize: 10, queue: "mine", timeout: 0.5 });
  const own = new Producer(endpoint, { maxsize: 10, queue: "theirs" });
  try {
    for (let i = 0; i < 3; i++) await stray.put(["mine", i]);
    await stray.flush();
    await own.put(["theirs", 0]);
    await own.end();
    await own.close();
    const got = await collect(consumer, 5);
    assert.deepEqual(got, [["theirs", 0]]); // nothing of the stray producer's
    assert.ok(consumer.stats.rejected >= 2, "its HELLO and its DATA are refused");
  } finally {
    await stray.close().catch(() => {});
    await consumer.close();
  }
});

test("what the receiver would refuse is refused at put, not with the rest of its frame", async () => {
  // An NdArray whose data does not fit its shape, a bad dtype or shape, a Packet with fields of
  // the wrong types, a Map keyed by an object: each is an EncodeError here, and the records
  // beside it still arrive (the receiver used to reject the whole frame).
  const consumer = new Consumer({ maxsize: 100 });
  const endpoint = await consumer.bind();
  const producer = new Producer(endpoint, { maxsize: 100 });
  const bad = [
    new NdArray("<f8", [3], new Uint8Array(8)),
    new NdArray("|O", [1], new Uint8Array(8)),
    new NdArray("<f8", [-1], new Uint8Array(0)),
    new Packet(1, { headers: 5 }),
    new Map([[{ a: 1 }, 1]]),
  ];
  try {
    for (const [i, record] of bad.entries()) {
      producer.put(i);
      producer.put(record);
    }
    await producer.put("last");
    await assert.rejects(producer.flush(), (err) => {
      assert.equal(err.name, "EncodeError");
      assert.match(err.message, /NdArray data is 8 bytes/);
      assert.equal(err.recordsDropped, bad.length);
      return true;
    });
    await producer.end();
    await producer.close();
    assert.deepEqual(await collect(consumer), [0, 1, 2, 3, 4, "last"]);
    assert.equal(consumer.stats.rejected, 0);
  } finally {
    await producer.close({ timeout: 1 }).catch(() => {}); // a failed check must not hang the run
    await consumer.close();
  }
});

test("a producer refused as another queue's stops waiting at once and says why", async () => {
  const consumer = new Consumer({ maxsize: 10, queue: "theirs" });
  const endpoint = await consumer.bind();
  const stray = new Producer(endpoint, { maxsize: 10, queue: "mine", timeout: 20 });
  try {
    await stray.put(1);
    const started = Date.now();
    await assert.rejects(stray.close(), (err) => {
      assert.equal(err.name, "DeliveryError");
      assert.match(err.message, /serves another queue/);
      return true;
    });
    assert.ok(Date.now() - started < 5000, "close must not wait out its 20 s timeout");
  } finally {
    await stray.close({ timeout: 1 }).catch(() => {}); // closed already, unless a check failed
    await consumer.close();
  }
});

test("a plain producer waiting for credit says HELLO again and goes on with a new consumer", async () => {
  // The consumer that owed it credit went away; another took its endpoint and never heard of
  // this producer (PROTOCOL.md section 4): the repeated HELLO gets its credit.
  // ipc, not a tcp port: another process could take a port between the two binds.
  const dir = mkdtempSync(join(tmpdir(), "sz-rehello-"));
  const first = new Consumer({ maxsize: 4 });
  const endpoint = await first.bind(`ipc://${join(dir, "q.sock")}`);
  const producer = new Producer(endpoint, { maxsize: 4, timeout: 20 });
  let second;
  try {
    for (let i = 0; i < 4; i++) await producer.put(i);
    await producer.flush();
    await first.get({ timeout: 5 }); // it got them; it will never grant more
    await first.close();
    second = new Consumer({ maxsize: 4 });
    await second.bind(endpoint);
    for (let i = 4; i < 8; i++) await producer.put(i); // waits until the new one grants
    await producer.end();
    const got = await collect(second, 10);
    assert.deepEqual(got, [4, 5, 6, 7]);
  } finally {
    await producer.close({ timeout: 2 }).catch(() => {}); // the first consumer's 4 are its loss
    await first.close();
    if (second) await second.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("seqs that never arrive before an END or CLOSE are counted and reported as lost", { timeout: 20000 }, async () => {
  const { consumer, dealer, next } = await consumerWithRawProducer();
  try {
    await dealer.send(encodeFrame(Kind.HELLO, { producer: "p", epoch: 0, next_seq: 0, acked: 0 }));
    assert.equal((await next()).kind, Kind.CREDIT);
    await dealer.send(encodeFrame(Kind.DATA, ["p", 0, [1, 2]]));
    await dealer.send(encodeFrame(Kind.END, ["p", 5])); // seqs 2..4 never came
    await dealer.send(encodeFrame(Kind.CLOSE, ["p", 8])); // nor 6..7
    let receipt;
    do receipt = await next();
    while (receipt.kind !== Kind.CREDIT || receipt.fields.received < 8);
    assert.equal(receipt.fields.lost, 5);
    assert.equal(consumer.stats.gaps, 5);
    assert.deepEqual(await collect(consumer, 5), [1, 2]);
  } finally {
    dealer.close();
    await consumer.close();
  }
});

test("a producer whose consumer reports records lost says so at close", { timeout: 20000 }, async () => {
  const router = new zmq.Router();
  await router.bind("tcp://127.0.0.1:*");
  const producer = new Producer(router.lastEndpoint, { maxsize: 100, timeout: 10 });
  const serve = (async () => {
    for await (const [peer, frame] of router) {
      const msg = decodeFrame(frame);
      if (msg.kind === Kind.CLOSE) {
        const seq = Number(msg.fields.seq);
        const body = { session: "raw", received: seq, acked: seq, limit: 1000, lost: 2 };
        await router.send([peer, encodeFrame(Kind.CREDIT, body)]);
        return;
      }
    }
  })();
  try {
    for (let i = 0; i < 5; i++) await producer.put(i);
    await assert.rejects(producer.close(), (err) => {
      assert.ok(err instanceof DeliveryError);
      assert.match(err.message, /2 records put were lost in transit/);
      return true;
    });
    await serve;
  } finally {
    router.close();
  }
});

test("a producer sends a lost END and CLOSE again while close waits", { timeout: 20000 }, async () => {
  const router = new zmq.Router();
  await router.bind("tcp://127.0.0.1:*");
  const producer = new Producer(router.lastEndpoint, { maxsize: 100, timeout: 10 });
  const seen = [];
  const serve = (async () => {
    for await (const [peer, frame] of router) {
      const msg = decodeFrame(frame);
      seen.push(msg.kind);
      if (msg.kind === Kind.CLOSE && seen.filter((k) => k === Kind.CLOSE).length === 2) {
        const seq = Number(msg.fields.seq); // the first END and CLOSE were "lost"
        await router.send([peer, encodeFrame(Kind.CREDIT, { session: "raw", received: seq, acked: seq, limit: 1000 })]);
        return;
      }
    }
  })();
  try {
    await producer.put(1);
    await producer.end();
    await producer.close();
    await serve;
    assert.ok(seen.filter((k) => k === Kind.END).length >= 2);
  } finally {
    router.close();
  }
});
