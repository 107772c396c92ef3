// Key partition against ../vectors/partition.json (written from sage_zmq/router/keys.py).
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { test } from "node:test";
import {
  F64,
  RoutingError,
  instanceForKey,
  keyBytes,
  keyGroup,
  keyHash,
  murmur3x86_32,
} from "../sagezmq.js";

const url = new URL("../../vectors/partition.json", import.meta.url);
const hex = (b) => Buffer.from(b).toString("hex");

// Every JS spelling of a vector's key that must land on the same bytes.
function spellings(entry) {
  const { key, key_type: type } = entry;
  switch (type) {
    case "str":
      return [key];
    case "bytes_hex":
      return [new Uint8Array(Buffer.from(key, "hex"))];
    case "bool":
      return [key];
    case "int": {
      const big = BigInt(key);
      const out = [big];
      if (Number.isSafeInteger(Number(key)) && BigInt(Number(key)) === big) out.push(Number(key));
      return out;
    }
    case "float": {
      const v = Number(key);
      const out = [new F64(v)];
      if (!Number.isInteger(v) || Object.is(v, -0)) out.push(v);
      return out;
    }
    default:
      throw new Error(`unknown key_type ${type}`);
  }
}

test("partition vectors", { skip: !existsSync(url) && "partition.json not written yet" }, () => {
  const vectors = JSON.parse(readFileSync(url, "utf8"));
  assert.ok(vectors.length >= 20);
  let checked = 0;
  for (const entry of vectors) {
    for (const key of spellings(entry)) {
      const what = `${entry.key_type} ${String(entry.key)} as ${typeof key}`;
      assert.equal(hex(keyBytes(key)), entry.key_bytes_hex, what);
      assert.equal(keyHash(key), entry.hash, what);
      assert.equal(keyGroup(key, entry.max_parallelism), entry.group, what);
      for (const [p, index] of Object.entries(entry.instance)) {
        assert.equal(instanceForKey(key, Number(p), entry.max_parallelism), index, `${what} P=${p}`);
      }
      checked += 1;
    }
  }
  assert.ok(checked >= vectors.length);
});

test("murmur3 reference values", () => {
  // From the reference implementation (SMHasher) with seed 0 and a non-zero seed.
  const enc = (s) => new TextEncoder().encode(s);
  assert.equal(murmur3x86_32(enc("")), 0);
  assert.equal(murmur3x86_32(enc(""), 1), 0x514e28b7);
  assert.equal(murmur3x86_32(enc("hello")), 613153351);
  assert.equal(murmur3x86_32(enc("The quick brown fox jumps over the lazy dog")), 0x2e4ff723);
});

test("bad keys and parallelism are refused clearly", () => {
  assert.throws(() => keyBytes(null), /needs a partition key/);
  assert.throws(() => keyBytes({}), RoutingError);
  assert.throws(() => keyBytes("\ud800"), /lone surrogate/);
  assert.throws(() => instanceForKey("a", 0), /parallelism must be/);
  assert.throws(() => instanceForKey("a", 129), /parallelism must be/);
  assert.throws(() => instanceForKey("a", 2, 0), /maxParallelism/);
});
