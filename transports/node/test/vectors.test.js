// Every golden frame in ../vectors/frames.json, both ways.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import {
  DecodeError,
  Kind,
  decodeFrame,
  encodeData,
  encodeFrame,
  fromTyped,
  toTyped,
} from "../sagezmq.js";

const url = new URL("../../vectors/frames.json", import.meta.url);
const { valid, invalid } = JSON.parse(readFileSync(url, "utf8"));
const hex = (b) => Buffer.from(b).toString("hex");
const bytes = (h) => new Uint8Array(Buffer.from(h, "hex"));

// JS objects keep neither key order for integer-like keys nor non-string key types, so maps
// compare as sets of (stringified key, value) when decoding; encoding is checked byte-exact.
function loose(t) {
  const [[tag, v]] = Object.entries(t);
  if (tag === "array") return { array: v.map(loose) };
  if (tag === "map") {
    const pairs = v.map(([k, x]) => {
      const [[kt, kv]] = Object.entries(k);
      return [kt === "str" ? kv : String(kv), loose(x)];
    });
    pairs.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    return { map: pairs };
  }
  if (tag === "packet") {
    return { packet: Object.fromEntries(Object.entries(v).map(([k, x]) => [k, loose(x)])) };
  }
  if (tag === "eos") return { eos: { source: loose(v.source) } };
  return t;
}

function withoutIgnored(vector) {
  if (!vector.ignored_keys) return vector.body;
  const keep = vector.body.map.filter(([k]) => !vector.ignored_keys.includes(k.str));
  return { map: keep };
}

test("vectors cover every kind", () => {
  assert.deepEqual(new Set(valid.map((v) => v.kind)), new Set(Object.values(Kind)));
  assert.ok(invalid.length >= 30);
});

for (const vector of valid) {
  test(`decode ${vector.name}`, () => {
    const msg = decodeFrame(bytes(vector.hex), { exactFloats: true });
    assert.equal(msg.kind, vector.kind);
    assert.equal(msg.flags, vector.flags);
    assert.deepEqual(loose(toTyped(msg.body)), loose(vector.body));
    if ([Kind.HELLO, Kind.CREDIT, Kind.ERROR].includes(vector.kind)) {
      assert.deepEqual(loose(toTyped(msg.fields)), loose(withoutIgnored(vector)));
    }
  });

  test(`encode ${vector.name}`, (t) => {
    if (!vector.canonical) {
      t.skip("not canonical (LZ4): this peer does not compress; decode is checked");
      return;
    }
    const body = fromTyped(vector.body);
    let frame;
    if (vector.kind === Kind.DATA) {
      const out = encodeData(body[0], body[1], body[2]);
      assert.deepEqual(out.errors, []);
      frame = out.frame;
    } else {
      frame = encodeFrame(vector.kind, body, vector.flags);
    }
    assert.equal(hex(frame), vector.hex);
  });
}

for (const vector of invalid) {
  test(`reject ${vector.name} (${vector.why})`, () => {
    assert.throws(() => decodeFrame(bytes(vector.hex)), DecodeError);
  });
}

test("plain decoding gives plain numbers; exactFloats keeps integral floats", () => {
  const scalars = valid.find((v) => v.name === "data_scalars");
  const plain = decodeFrame(bytes(scalars.hex)).fields.records;
  assert.equal(plain[4], 2); // 2.0 on the wire
  const exact = decodeFrame(bytes(scalars.hex), { exactFloats: true }).fields.records;
  assert.deepEqual(toTyped(exact[4]), { float: 2 });
});

test("a float partition key stays a float inside a Packet", () => {
  const packets = valid.find((v) => v.name === "data_packets");
  const records = decodeFrame(bytes(packets.hex)).fields.records;
  assert.deepEqual(toTyped(records[3].partitionKey), { float: 1 }); // Python key 1.0
  assert.deepEqual(toTyped(records[1].partitionKey), { int: 42 });
});
