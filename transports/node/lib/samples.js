// Deterministic sample records for the CLI scripts and interop tests: record i of a kind is
// the same on every run, so a test can predict what the other side must see.

import { instanceForKey } from "./partition.js";
import { F64, NdArray, Packet } from "./types.js";

export const PARALLELISMS = [1, 2, 3, 7, 128];
export const KINDS = ["ints", "packets", "mixed"];

/** Partition key number i out of `keys` distinct ones, cycling through every key type. */
export function keyFor(i, keys) {
  const j = i % keys;
  switch (i % 7) {
    case 0:
      return `user-${j}`;
    case 1:
      return j - Math.floor(keys / 2); // negative ints too
    case 2:
      return Uint8Array.of(j & 255, (j >> 8) & 255, 7);
    case 3:
      return new F64(j); // an integral float: must hash as 8 IEEE bytes, not as "j"
    case 4:
      return j + 0.25;
    case 5:
      return 2n ** 62n + BigInt(j);
    default:
      return i % 14 === 6 ? j % 2 === 0 : `ключ-${j}`;
  }
}

/** The Packet record i: headers.partition holds this side's instance for each parallelism. */
export function packetFor(i, { keys = 50, tag = "node", timestamp = Date.now() / 1000 } = {}) {
  const key = keyFor(i, keys);
  const partition = Object.fromEntries(
    PARALLELISMS.map((p) => [String(p), instanceForKey(key, p)]),
  );
  return new Packet(
    { i, src: tag },
    { partitionKey: key, headers: { partition }, timestamp },
  );
}

/** Record i of a mix of every record type. */
export function mixedFor(i) {
  switch (i % 13) {
    case 0:
      return i;
    case 1:
      return -i - 1;
    case 2:
      return new F64(i);
    case 3:
      return i + 0.5;
    case 4:
      return `str-${i}-ü`;
    case 5:
      return i % 97 === 5 ? new Uint8Array(70000).fill(i & 255) : new Uint8Array(i % 50).fill(1);
    case 6:
      return [i, "x", null, true, [new F64(1)]];
    case 7:
      return { i, nested: { a: [1.5, "z"] } };
    case 8:
      return NdArray.fromTypedArray(Float64Array.of(i, i + 0.5));
    case 9:
      return 2n ** 63n - 1n - BigInt(i);
    case 10:
      return new Packet(i, { timestamp: 1700000000.5 });
    case 11:
      return new Map([[i, "int key"]]);
    default:
      return false;
  }
}

export function recordFor(kind, i, options = {}) {
  if (kind === "ints") return i;
  if (kind === "packets") return packetFor(i, options);
  if (kind === "mixed") return mixedFor(i);
  throw new RangeError(`unknown record kind ${kind}; use one of ${KINDS.join(", ")}`);
}
