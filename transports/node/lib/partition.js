// Key partition (PROTOCOL.md section 8, docs/partitioning.md): key -> bytes -> MurmurHash3
// x86 32-bit (seed 0) -> key group -> instance position. Must agree bit for bit with
// sage_zmq/router/keys.py; transports/vectors/partition.json is the shared check.

import { F64, RoutingError } from "./types.js";

export const KEY_GROUP_DEFAULT = 128;
const utf8 = new TextEncoder();
// TextEncoder would silently turn a lone surrogate into U+FFFD; Python refuses such a key.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** MurmurHash3 x86 32-bit of `bytes` as an unsigned integer. */
export function murmur3x86_32(bytes, seed = 0) {
  const c1 = 0xcc9e2d51;
  const c2 = 0x1b873593;
  const n = bytes.length;
  const blocks = n & ~3;
  let h = seed | 0;
  for (let i = 0; i < blocks; i += 4) {
    let k = bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24);
    k = Math.imul(k, c1);
    k = (k << 15) | (k >>> 17);
    k = Math.imul(k, c2);
    h ^= k;
    h = (h << 13) | (h >>> 19);
    h = (Math.imul(h, 5) + 0xe6546b64) | 0;
  }
  let k = 0;
  switch (n & 3) {
    case 3:
      k ^= bytes[blocks + 2] << 16;
    // falls through
    case 2:
      k ^= bytes[blocks + 1] << 8;
    // falls through
    case 1:
      k ^= bytes[blocks];
      k = Math.imul(k, c1);
      k = (k << 15) | (k >>> 17);
      k = Math.imul(k, c2);
      h ^= k;
    // falls through
    default:
  }
  h ^= n;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

function doubleBytes(v) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setFloat64(0, v); // big-endian
  return out;
}

/**
 * The canonical bytes of a key. JS numbers that are safe integers count as ints (ASCII
 * decimal); other numbers, and F64, as floats (8 bytes IEEE-754 big-endian). A Python float
 * key such as 3.0 arrives inside a Packet as F64, so it hashes as a float here too.
 */
export function keyBytes(key) {
  if (typeof key === "string") {
    if (LONE_SURROGATE.test(key)) {
      throw new RoutingError("partition key string holds a lone surrogate: not valid UTF-8");
    }
    return utf8.encode(key);
  }
  if (key instanceof Uint8Array) return key;
  if (typeof key === "boolean") return utf8.encode(key ? "true" : "false");
  if (typeof key === "bigint") return utf8.encode(key.toString());
  if (key instanceof F64) return doubleBytes(key.value);
  if (typeof key === "number") {
    if (Number.isSafeInteger(key) && !Object.is(key, -0)) return utf8.encode(String(key));
    return doubleBytes(key);
  }
  if (key === null || key === undefined) {
    throw new RoutingError("hash routing needs a partition key, got null; set partitionKey");
  }
  throw new RoutingError(
    `cannot partition on a key of type ${key?.constructor?.name ?? typeof key}; ` +
      "pass a string, Uint8Array, boolean, number, bigint or F64",
  );
}

/** MurmurHash3 x86 32-bit, seed 0, unsigned, of keyBytes(key). */
export function keyHash(key) {
  return murmur3x86_32(keyBytes(key), 0);
}

function check(parallelism, maxParallelism) {
  if (!Number.isInteger(maxParallelism) || maxParallelism < 1) {
    throw new RoutingError(`maxParallelism must be an integer >= 1, got ${maxParallelism}`);
  }
  if (!Number.isInteger(parallelism) || parallelism < 1 || parallelism > maxParallelism) {
    throw new RoutingError(
      `parallelism must be an integer in 1..${maxParallelism}, got ${parallelism}`,
    );
  }
}

/** keyHash(key) mod maxParallelism. */
export function keyGroup(key, maxParallelism = KEY_GROUP_DEFAULT) {
  check(1, maxParallelism);
  return keyHash(key) % maxParallelism;
}

/** The instance position 0..parallelism-1 owning `key` (contiguous key-group ranges). */
export function instanceForKey(key, parallelism, maxParallelism = KEY_GROUP_DEFAULT) {
  check(parallelism, maxParallelism);
  return Math.floor(((keyHash(key) % maxParallelism) * parallelism) / maxParallelism);
}
