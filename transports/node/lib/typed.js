// Typed trees: the JSON form of msgpack values used by transports/vectors/frames.json and by
// the CLI scripts (see transports/vectors/README.md). Each value is a one-key object whose key
// names the msgpack type, so ints, floats, str, bin and map key order survive JSON.

import { EndOfStream, F64, NdArray, Packet } from "./types.js";

const hex = (b) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

function typedFloat(v) {
  if (Number.isNaN(v)) return { float: "nan" };
  if (v === Infinity) return { float: "inf" };
  if (v === -Infinity) return { float: "-inf" };
  return { float: v };
}

function typedInt(v) {
  if (typeof v === "bigint") {
    return Number.isSafeInteger(Number(v)) && BigInt(Number(v)) === v
      ? { int: Number(v) }
      : { int: v.toString() };
  }
  return { int: v };
}

/** A JS value (as decoded by this library) as a typed tree. */
export function toTyped(v) {
  if (v === null || v === undefined) return { nil: null };
  if (typeof v === "boolean") return { bool: v };
  if (typeof v === "bigint") return typedInt(v);
  if (typeof v === "number") {
    return Number.isSafeInteger(v) && !Object.is(v, -0) ? { int: v } : typedFloat(v);
  }
  if (typeof v === "string") return { str: v };
  if (v instanceof F64) return typedFloat(v.value);
  if (v instanceof Uint8Array) return { bin: hex(v) };
  if (Array.isArray(v)) return { array: v.map(toTyped) };
  if (v instanceof Map) return { map: [...v].map(([k, x]) => [toTyped(k), toTyped(x)]) };
  if (v instanceof Packet) {
    return {
      packet: {
        payload: toTyped(v.payload),
        input_index: toTyped(v.inputIndex),
        partition_key: toTyped(v.partitionKey),
        partition_strategy: toTyped(v.partitionStrategy),
        headers: toTyped(v.headers),
        timestamp: typedFloat(Number(v.timestamp)),
      },
    };
  }
  if (v instanceof NdArray) {
    return { ndarray: { dtype: v.dtype, shape: v.shape, data: hex(v.data) } };
  }
  if (v instanceof EndOfStream) return { eos: { source: toTyped(v.source) } };
  if (typeof v === "object") {
    return { map: Object.entries(v).map(([k, x]) => [{ str: k }, toTyped(x)]) };
  }
  throw new TypeError(`no typed form for ${typeof v}`);
}

/**
 * The JS value of a typed tree, built so that packValue() reproduces the exact bytes: floats
 * become F64, big ints bigint, maps Map (key order and key types kept).
 */
export function fromTyped(t) {
  const entries = Object.entries(t);
  if (entries.length !== 1) throw new TypeError(`a typed value is a one-key object: ${JSON.stringify(t)}`);
  const [[tag, v]] = entries;
  switch (tag) {
    case "nil":
      return null;
    case "bool":
    case "str":
      return v;
    case "int":
      return typeof v === "string" ? BigInt(v) : v;
    case "float":
      return new F64(v === "nan" ? NaN : v === "inf" ? Infinity : v === "-inf" ? -Infinity : v);
    case "bin":
      return unhex(v);
    case "array":
      return v.map(fromTyped);
    case "map":
      return new Map(v.map(([k, x]) => [fromTyped(k), fromTyped(x)]));
    case "packet":
      return new Packet(fromTyped(v.payload), {
        inputIndex: fromTyped(v.input_index),
        partitionKey: fromTyped(v.partition_key),
        partitionStrategy: fromTyped(v.partition_strategy),
        headers: fromTyped(v.headers),
        timestamp: Number(fromTyped(v.timestamp)),
      });
    case "ndarray":
      return new NdArray(v.dtype, v.shape, unhex(v.data));
    case "eos":
      return new EndOfStream(fromTyped(v.source));
    default:
      throw new TypeError(`unknown typed tag ${tag}`);
  }
}
