// Frames (PROTOCOL.md sections 2, 3, 7): an 8-byte header plus one msgpack value.
//
// Encoding is done here rather than by @msgpack/msgpack because the wire needs exact control:
// a Packet timestamp is always a float64 even when integral, F64 forces a float, bigint and
// Map keep int64 and key order/type. Decoding uses @msgpack/msgpack with the extension types
// of the protocol; anything else (msgpack's own timestamp ext -1 included) is rejected.

import { Decoder, ExtensionCodec } from "@msgpack/msgpack";
import { lz4FrameDecompress } from "./lz4.js";
import { DecodeError, EncodeError, EndOfStream, F64, NdArray, Packet } from "./types.js";

export const MAGIC = [0x53, 0x5a];
export const VERSION = 1;
export const HEADER_SIZE = 8;
export const FLAG_LZ4 = 0x01;
export const FLAG_PICKLE = 0x02;
export const Kind = Object.freeze({
  HELLO: 1,
  CREDIT: 2,
  DATA: 3,
  END: 4,
  CLOSE: 5,
  HEARTBEAT: 6,
  ERROR: 7,
  RELEASE: 8,
});
export const KIND_NAMES = Object.freeze(
  Object.fromEntries(Object.entries(Kind).map(([name, code]) => [code, name])),
);
export const EXT_PACKET = 1;
export const EXT_NDARRAY = 2;
export const EXT_END_OF_STREAM = 3;
export const MAX_PRODUCER_ID = 128;
const SEQ_LIMIT = 2n ** 63n;
const MAX_DEPTH = 512;

// ------------------------------------------------------------------------------- encoding
const utf8 = new TextEncoder();

class Writer {
  constructor(size = 256) {
    this.buf = new Uint8Array(size);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }
  ensure(n) {
    if (this.pos + n <= this.buf.length) return;
    const grown = new Uint8Array(Math.max(this.pos + n, this.buf.length * 2));
    grown.set(this.buf.subarray(0, this.pos));
    this.buf = grown;
    this.view = new DataView(grown.buffer);
  }
  u8(v) {
    this.ensure(1);
    this.buf[this.pos++] = v;
  }
  head(byte, n, size) {
    // A type byte followed by a big-endian length or value of `size` bytes.
    this.ensure(1 + size);
    this.buf[this.pos++] = byte;
    if (size === 1) this.view.setUint8(this.pos, n);
    else if (size === 2) this.view.setUint16(this.pos, n);
    else if (size === 4) this.view.setUint32(this.pos, n);
    this.pos += size;
  }
  bytes(b) {
    this.ensure(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }
  result() {
    return this.buf.subarray(0, this.pos);
  }
}

function packInt(w, v) {
  // The smallest encoding, as msgpack-python and every conforming packer choose it.
  if (v >= 0) {
    if (v < 128) w.u8(v);
    else if (v < 256) w.head(0xcc, v, 1);
    else if (v < 65536) w.head(0xcd, v, 2);
    else if (v < 2 ** 32) w.head(0xce, v, 4);
    else {
      w.ensure(9);
      w.buf[w.pos++] = 0xcf;
      w.view.setBigUint64(w.pos, BigInt(v));
      w.pos += 8;
    }
  } else if (v >= -32) w.u8(v & 0xff);
  else if (v >= -128) {
    w.ensure(2);
    w.buf[w.pos++] = 0xd0;
    w.view.setInt8(w.pos++, v);
  } else if (v >= -32768) {
    w.ensure(3);
    w.buf[w.pos++] = 0xd1;
    w.view.setInt16(w.pos, v);
    w.pos += 2;
  } else if (v >= -(2 ** 31)) {
    w.ensure(5);
    w.buf[w.pos++] = 0xd2;
    w.view.setInt32(w.pos, v);
    w.pos += 4;
  } else {
    w.ensure(9);
    w.buf[w.pos++] = 0xd3;
    w.view.setBigInt64(w.pos, BigInt(v));
    w.pos += 8;
  }
}

function packBigInt(w, v) {
  if (v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)) {
    packInt(w, Number(v));
  } else if (v >= 0n && v < 2n ** 64n) {
    w.ensure(9);
    w.buf[w.pos++] = 0xcf;
    w.view.setBigUint64(w.pos, v);
    w.pos += 8;
  } else if (v < 0n && v >= -(2n ** 63n)) {
    w.ensure(9);
    w.buf[w.pos++] = 0xd3;
    w.view.setBigInt64(w.pos, v);
    w.pos += 8;
  } else {
    throw new EncodeError(`integer ${v} does not fit msgpack's 64 bits`);
  }
}

function packFloat(w, v) {
  w.ensure(9);
  w.buf[w.pos++] = 0xcb;
  w.view.setFloat64(w.pos, v);
  w.pos += 8;
}

function packLength(w, n, fix, fixMax, b8, b16, b32) {
  if (fix !== null && n <= fixMax) w.u8(fix | n);
  else if (b8 !== null && n < 256) w.head(b8, n, 1);
  else if (n < 65536) w.head(b16, n, 2);
  else w.head(b32, n, 4);
}

function packStr(w, s) {
  const bytes = utf8.encode(s);
  packLength(w, bytes.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
  w.bytes(bytes);
}

function packBin(w, b) {
  packLength(w, b.length, null, 0, 0xc4, 0xc5, 0xc6);
  w.bytes(b);
}

function packExt(w, type, body) {
  const fixed = { 1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8 }[body.length];
  if (fixed) w.u8(fixed);
  else packLength(w, body.length, null, 0, 0xc7, 0xc8, 0xc9);
  w.u8(type);
  w.bytes(body);
}

function packInner(value, depth) {
  const w = new Writer(64);
  pack(w, value, depth);
  return w.result();
}

function isPlainObject(v) {
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

function describe(v) {
  if (v === undefined) return "undefined";
  if (typeof v !== "object") return typeof v;
  return v.constructor ? v.constructor.name : "object";
}

function pack(w, v, depth) {
  if (depth > MAX_DEPTH) throw new EncodeError(`value nests deeper than ${MAX_DEPTH} levels`);
  if (v === null || v === undefined) return w.u8(0xc0);
  switch (typeof v) {
    case "boolean":
      return w.u8(v ? 0xc3 : 0xc2);
    case "number":
      if (Number.isSafeInteger(v) && !Object.is(v, -0)) return packInt(w, v);
      return packFloat(w, v);
    case "bigint":
      return packBigInt(w, v);
    case "string":
      return packStr(w, v);
    default:
  }
  if (v instanceof F64) return packFloat(w, v.value);
  if (v instanceof Uint8Array) return packBin(w, v);
  if (Array.isArray(v)) {
    packLength(w, v.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const item of v) pack(w, item, depth + 1);
    return;
  }
  if (v instanceof Packet) {
    checkPacket(v);
    const fields = [
      v.payload,
      v.inputIndex,
      v.partitionKey,
      v.partitionStrategy,
      v.headers,
      new F64(v.timestamp), // Python sends a float; do the same so frames are identical
    ];
    return packExt(w, EXT_PACKET, packInner(fields, depth + 1));
  }
  if (v instanceof NdArray) {
    checkNdArray(v);
    return packExt(w, EXT_NDARRAY, packInner([v.dtype, v.shape, v.data], depth + 1));
  }
  if (v instanceof EndOfStream) return packExt(w, EXT_END_OF_STREAM, packInner([v.source], depth + 1));
  if (v instanceof Map) {
    packLength(w, v.size, 0x80, 15, null, 0xde, 0xdf);
    for (const [key, item] of v) {
      if (key !== null && typeof key === "object" && !Array.isArray(key) && !(key instanceof Uint8Array) && !(key instanceof F64)) {
        // A map or object key: no receiver can hold it (a Python dict refuses it as a key).
        throw new EncodeError(`cannot encode a Map key that is a ${describe(key)}: use a string, number, bigint, boolean, Uint8Array or an Array of those`);
      }
      pack(w, key, depth + 1);
      pack(w, item, depth + 1);
    }
    return;
  }
  if (ArrayBuffer.isView(v)) {
    throw new EncodeError(
      `cannot encode a ${describe(v)}: wrap it with NdArray.fromTypedArray() or pass its bytes ` +
        "as a Uint8Array",
    );
  }
  if (typeof v === "object" && isPlainObject(v)) {
    const keys = Object.keys(v);
    packLength(w, keys.length, 0x80, 15, null, 0xde, 0xdf);
    for (const key of keys) {
      packStr(w, key);
      pack(w, v[key], depth + 1);
    }
    return;
  }
  throw new EncodeError(
    `cannot encode a record of type ${describe(v)}: records must be null, boolean, number, ` +
      "bigint, string, Uint8Array, Array, Map, a plain object, Packet, NdArray, EndOfStream or F64",
  );
}

/** msgpack bytes of one value, encoded exactly as the Python reference would. */
export function packValue(value) {
  const w = new Writer();
  pack(w, value, 0);
  return w.result();
}

function header(kind, flags) {
  return Uint8Array.of(MAGIC[0], MAGIC[1], VERSION, kind, flags, 0, 0, 0);
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

/** A control frame (anything but DATA) of `kind` with msgpack `body`. */
export function encodeFrame(kind, body, flags = 0) {
  if (!KIND_NAMES[kind]) throw new EncodeError(`unknown frame kind ${kind}`);
  const w = new Writer();
  w.bytes(header(kind, flags));
  pack(w, body, 0);
  return w.result();
}

/**
 * A DATA frame: [producer, seq, records]. Records that cannot be encoded are left out and
 * named in `errors`, the rest still go (PROTOCOL.md section 7), so `sent` may be shorter.
 */
export function encodeData(producer, seq, records) {
  try {
    return { frame: encodeFrame(Kind.DATA, [producer, seq, records]), sent: records, errors: [] };
  } catch (err) {
    if (!(err instanceof EncodeError)) throw err;
  }
  const parts = [];
  const sent = [];
  const errors = [];
  for (const record of records) {
    try {
      parts.push(packInner(record, 1));
      sent.push(record);
    } catch (err) {
      if (!(err instanceof EncodeError)) throw err;
      errors.push(err.message);
    }
  }
  const w = new Writer();
  w.bytes(header(Kind.DATA, 0));
  w.u8(0x93);
  pack(w, producer, 1);
  pack(w, seq, 1);
  packLength(w, parts.length, 0x90, 15, null, 0xdc, 0xdd);
  for (const part of parts) w.bytes(part);
  return { frame: w.result(), sent, errors };
}

// ------------------------------------------------------------------------------- decoding
// Integral floats are always decoded boxed (F64), so that validation can tell a float seq from
// an int and a float Packet key keeps its type; decodeFrame unboxes records afterwards unless
// the caller asked for exactFloats. `context.boxed.n` counts boxes so unboxing is skipped when
// there were none.
class SzDecoder extends Decoder {
  constructor(options) {
    super(options);
    this.options = options;
  }
  clone() {
    return new SzDecoder(this.options);
  }
  // int64/uint64 within 2^53 become numbers; only larger ones stay bigint.
  readU64AsBigInt() {
    const v = super.readU64AsBigInt();
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }
  readI64AsBigInt() {
    const v = super.readI64AsBigInt();
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(v)
      : v;
  }
  readF64() {
    return this.box(super.readF64());
  }
  readF32() {
    return this.box(super.readF32());
  }
  box(v) {
    if (Number.isInteger(v)) {
      this.options.context.boxed.n += 1;
      return new F64(v);
    }
    return v;
  }
}

function unbox(v) {
  if (v instanceof F64) return v.value;
  if (Array.isArray(v)) return v.map(unbox);
  if (v instanceof Packet) {
    v.payload = unbox(v.payload);
    v.headers = unbox(v.headers);
    return v;
  }
  if (v instanceof NdArray || v instanceof EndOfStream) return v;
  if (v !== null && typeof v === "object" && !(v instanceof Uint8Array)) {
    for (const key of Object.keys(v)) v[key] = unbox(v[key]);
  }
  return v;
}

function isInt(v) {
  return (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
}

class SzExtensions extends ExtensionCodec {
  decode(data, type, context) {
    switch (type) {
      case EXT_PACKET:
        return decodePacket(data, context);
      case EXT_NDARRAY:
        return decodeNdArray(data, context);
      case EXT_END_OF_STREAM: {
        const fields = decodeValue(data, context);
        if (!Array.isArray(fields) || fields.length !== 1 || !(fields[0] === null || typeof fields[0] === "string")) {
          throw new DecodeError("EndOfStream extension must hold [source: str or nil]");
        }
        return new EndOfStream(fields[0]);
      }
      default:
        throw new DecodeError(`unknown or disabled msgpack extension type ${type}`);
    }
  }
}

const EXTENSIONS = new SzExtensions();

function decodePacket(data, context) {
  const fields = decodeValue(data, context);
  if (!Array.isArray(fields) || fields.length !== 6) {
    throw new DecodeError("Packet extension must hold 6 fields");
  }
  const [payload, index, key, strategy, headers, ts] = fields;
  if (!isInt(index) || !(typeof ts === "number" || ts instanceof F64 || isInt(ts))) {
    throw new DecodeError("Packet input_index/timestamp have wrong types");
  }
  if (strategy !== null && typeof strategy !== "string") {
    throw new DecodeError("Packet partition_strategy must be a string or nil");
  }
  if (headers !== null && !isMapValue(headers)) {
    throw new DecodeError("Packet headers must be a map or nil");
  }
  return new Packet(payload, {
    inputIndex: index,
    partitionKey: key, // an F64 if it was a float on the wire: it must hash as one
    partitionStrategy: strategy,
    headers,
    timestamp: Number(ts instanceof F64 ? ts.value : ts),
  });
}

function isMapValue(v) {
  // @msgpack/msgpack decodes a map to a plain object
  return v !== null && typeof v === "object" && Object.getPrototypeOf(v) === Object.prototype;
}

function decodeNdArray(data, context) {
  const fields = decodeValue(data, context);
  if (!Array.isArray(fields) || fields.length !== 3) {
    throw new DecodeError("ndarray extension must hold [dtype, shape, data]");
  }
  const [dtype, rawShape, raw] = fields;
  const shape = Array.isArray(rawShape) ? rawShape.map((n) => (n instanceof F64 ? NaN : n)) : null;
  if (!Array.isArray(shape) || !shape.every((n) => typeof n === "number" && Number.isInteger(n) && n >= 0)) {
    throw new DecodeError("ndarray shape must be a list of non-negative ints");
  }
  if (!(raw instanceof Uint8Array)) throw new DecodeError("ndarray data must be bin");
  const itemsize = dtypeItemsize(dtype);
  const count = shape.reduce((a, n) => a * n, 1);
  if (count * itemsize !== raw.length) {
    throw new DecodeError(
      `ndarray data is ${raw.length} bytes; shape [${shape}] of ${JSON.stringify(dtype)} ` +
        `needs ${count * itemsize}`,
    );
  }
  return new NdArray(dtype, shape, raw);
}

/** Refuse at put what the receiver would refuse (with the rest of its frame). */
function checkNdArray(v) {
  if (!Array.isArray(v.shape) || !v.shape.every((n) => Number.isInteger(n) && n >= 0)) {
    throw new EncodeError(`NdArray shape must be an array of non-negative integers, got ${JSON.stringify(v.shape)}`);
  }
  let itemsize;
  try {
    itemsize = dtypeItemsize(v.dtype);
  } catch (err) {
    if (!(err instanceof DecodeError)) throw err;
    throw new EncodeError(`NdArray ${err.message.replace(/^ndarray /, "")}`);
  }
  const count = v.shape.reduce((a, n) => a * n, 1);
  if (count * itemsize !== v.data.length) {
    throw new EncodeError(
      `NdArray data is ${v.data.length} bytes; shape [${v.shape}] of ${JSON.stringify(v.dtype)} needs ${count * itemsize}`,
    );
  }
}

function checkPacket(v) {
  const index = v.inputIndex;
  if (!(Number.isInteger(index) || typeof index === "bigint")) {
    throw new EncodeError(`Packet inputIndex must be an integer, got ${describe(index)}`);
  }
  if (v.partitionStrategy !== null && typeof v.partitionStrategy !== "string") {
    throw new EncodeError(`Packet partitionStrategy must be a string or null, got ${describe(v.partitionStrategy)}`);
  }
  const h = v.headers;
  if (h !== null && !(h instanceof Map) && !(typeof h === "object" && isPlainObject(h))) {
    throw new EncodeError(`Packet headers must be a plain object, a Map or null, got ${describe(h)}`);
  }
  if (typeof v.timestamp !== "number" || !Number.isFinite(v.timestamp)) {
    throw new EncodeError(`Packet timestamp must be a finite number of seconds, got ${describe(v.timestamp)}`);
  }
}

/** Bytes per item of a NumPy dtype string ("<f8") or descr list ([["x", "<i4"], ...]). */
export function dtypeItemsize(dtype) {
  if (typeof dtype === "string") {
    // datetime64 / timedelta64: 8-byte signed counts of the unit in brackets (PROTOCOL.md §7).
    if (/^[<>|=]?[Mm]8(\[\d*(Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\])?$/.test(dtype)) return 8;
    const m = /^[<>|=]?([biufcSUV])(\d+)$/.exec(dtype);
    if (!m) throw new DecodeError(`ndarray dtype ${JSON.stringify(dtype)} is not supported here`);
    const n = Number(m[2]);
    return m[1] === "U" ? 4 * n : n;
  }
  if (Array.isArray(dtype) && dtype.length > 0) {
    let total = 0;
    for (const field of dtype) {
      if (!Array.isArray(field) || field.length < 2 || typeof field[0] !== "string") {
        throw new DecodeError("structured ndarray dtype must be [[name, type(, shape)], ...]");
      }
      const sub = field.length > 2 && Array.isArray(field[2]) ? field[2].reduce((a, n) => a * n, 1) : 1;
      total += dtypeItemsize(field[1]) * sub;
    }
    return total;
  }
  throw new DecodeError("ndarray dtype must be a type string or a list of fields");
}

function newDecoder(nbytes, context) {
  // No msgpack length can exceed the bytes present; this bounds every allocation.
  return new SzDecoder(
    {
      extensionCodec: EXTENSIONS,
      context,
      useBigInt64: true,
      maxStrLength: nbytes,
      maxBinLength: nbytes,
      maxArrayLength: nbytes,
      maxMapLength: nbytes,
      maxExtLength: nbytes,
    },
  );
}

function decodeValue(bytes, context) {
  return newDecoder(bytes.length, context).decode(bytes);
}

function decodeBoxed(bytes) {
  const context = { boxed: { n: 0 } };
  return { value: decodeValue(bytes, context), boxed: context.boxed.n };
}

/** Decode exactly one msgpack value (with the protocol's extension types). */
export function unpackValue(bytes, { exactFloats = false } = {}) {
  try {
    const { value, boxed } = decodeBoxed(bytes);
    return exactFloats || !boxed ? value : unbox(value);
  } catch (err) {
    if (err instanceof DecodeError) throw err;
    throw new DecodeError(`malformed msgpack: ${err.message}`);
  }
}

// ----------------------------------------------------------------------------- validation
function producerId(v) {
  if (typeof v !== "string" || v.length === 0 || [...v].length > MAX_PRODUCER_ID) {
    throw new DecodeError("producer id must be a string of 1-128 characters");
  }
  return v;
}

function seq(v) {
  const ok =
    (typeof v === "number" && Number.isInteger(v) && v >= 0) ||
    (typeof v === "bigint" && v >= 0n && v < SEQ_LIMIT);
  if (!ok) throw new DecodeError("sequence numbers must be integers in [0, 2^63)");
  return v;
}

const SCHEMAS = {
  [Kind.HELLO]: {
    types: { producer: "str", epoch: "int", queue: "str", next_seq: "int", acked: "int", window: "int" },
    required: ["producer", "epoch", "next_seq"],
  },
  [Kind.CREDIT]: {
    types: {
      session: "str",
      received: "int",
      acked: "int",
      limit: "int",
      base: "int",
      pid: "int",
      lost: "int",
      release_ring: "str",
    },
    required: ["session", "received", "acked", "limit"],
  },
  [Kind.ERROR]: { types: { code: "str", message: "str" }, required: ["code", "message"] },
};

function checkMap(kind, value) {
  const name = KIND_NAMES[kind];
  if (!isMapValue(value)) {
    throw new DecodeError(`${name} body must be a map`);
  }
  const { types, required } = SCHEMAS[kind];
  for (const key of required) {
    if (!Object.hasOwn(value, key)) throw new DecodeError(`${name} lacks '${key}'`);
  }
  const out = {};
  for (const [key, item] of Object.entries(value)) {
    const type = Object.hasOwn(types, key) ? types[key] : undefined;
    if (type === undefined) continue; // unknown keys are ignored (section 2)
    if (type === "str" ? typeof item !== "string" : !isInt(item)) {
      throw new DecodeError(`${name} field '${key}' has the wrong type`);
    }
    if (type === "int") seq(item);
    out[key] = item;
  }
  if ("producer" in out) producerId(out.producer);
  if (kind === Kind.CREDIT && out.acked > out.received) {
    throw new DecodeError("CREDIT acked must not exceed received");
  }
  return out;
}

function checkFields(kind, body, limits) {
  const arr = (n, what) => {
    if (!Array.isArray(body) || body.length !== n) throw new DecodeError(what);
  };
  switch (kind) {
    case Kind.DATA: {
      arr(3, "DATA body must be [producer, seq, records]");
      const [p, s, records] = body;
      if (!Array.isArray(records)) throw new DecodeError("DATA records must be an array");
      if (records.length > limits.maxRecords) {
        throw new DecodeError(`DATA batch of ${records.length} records exceeds the limit`);
      }
      // The seq after the batch must be a seq too: a CREDIT reports it as `received`.
      if (BigInt(seq(s)) + BigInt(records.length) >= SEQ_LIMIT) {
        throw new DecodeError("DATA seq + record count must stay below 2^63");
      }
      // A top-level EndOfStream would come out of a consumer like the real end (PROTOCOL §9).
      if (records.some((r) => r instanceof EndOfStream)) {
        throw new DecodeError(
          "a DATA record is an EndOfStream: an upstream ends with an END frame, not a record",
        );
      }
      return { producer: producerId(p), seq: s, records };
    }
    case Kind.END:
    case Kind.CLOSE: {
      arr(2, "END/CLOSE body must be [producer, seq]");
      const fields = { producer: producerId(body[0]), seq: seq(body[1]) };
      if (kind === Kind.END && BigInt(fields.seq) + 1n >= SEQ_LIMIT) {
        throw new DecodeError("END seq + 1 must stay below 2^63");
      }
      return fields;
    }
    case Kind.HEARTBEAT:
      arr(1, "HEARTBEAT body must be [producer]");
      return { producer: producerId(body[0]) };
    case Kind.RELEASE:
      if (!Array.isArray(body) || body.length !== 2 || !Array.isArray(body[1])) {
        throw new DecodeError("RELEASE body must be [producer, [slot ids]]");
      }
      return { producer: producerId(body[0]), slots: body[1].map(seq) };
    default:
      return checkMap(kind, body);
  }
}

/** Validate the 8 header bytes; returns {kind, flags} or throws DecodeError. */
export function parseHeader(frame) {
  if (frame.length < HEADER_SIZE) {
    throw new DecodeError(`frame of ${frame.length} bytes is shorter than the 8-byte header`);
  }
  if (frame[0] !== MAGIC[0] || frame[1] !== MAGIC[1]) {
    throw new DecodeError("bad magic; expected 'SZ' (not a sage-zmq peer?)");
  }
  if (frame[2] !== VERSION) {
    throw new DecodeError(`unsupported wire version ${frame[2]}; this peer speaks ${VERSION}`);
  }
  const kind = frame[3];
  if (!KIND_NAMES[kind]) throw new DecodeError(`unknown frame kind ${kind}`);
  const flags = frame[4];
  if (flags & ~(FLAG_LZ4 | FLAG_PICKLE)) {
    throw new DecodeError(`unknown flag bits 0x${(flags & ~3).toString(16).padStart(2, "0")}`);
  }
  if (frame[5] || frame[6] || frame[7]) throw new DecodeError("reserved header bytes are not zero");
  return { kind, flags };
}

/**
 * Decode and validate one frame. Returns {kind, kindName, flags, body, fields, nbytes}:
 * `body` is the msgpack value as sent; `fields` the validated view (DATA: {producer, seq,
 * records}; END/CLOSE: {producer, seq}; HEARTBEAT: {producer}; RELEASE: {producer, slots};
 * HELLO/CREDIT/ERROR: the known keys). Throws DecodeError on anything off-spec.
 */
export function decodeFrame(
  frame,
  {
    maxFrameBytes = 2 ** 31 - 1,
    maxDecompressedBytes = 2 ** 31 - 1,
    maxRecords = 1_000_000,
    exactFloats = false,
  } = {},
) {
  const bytes = frame instanceof Uint8Array ? frame : new Uint8Array(frame);
  if (bytes.length > maxFrameBytes) {
    throw new DecodeError(`frame of ${bytes.length} bytes exceeds the limit`);
  }
  const { kind, flags } = parseHeader(bytes);
  if (flags & FLAG_PICKLE) {
    // Pickle is Python-only and never enabled in this peer.
    throw new DecodeError("frame is marked as carrying pickle, but pickle is not enabled");
  }
  let body = bytes.subarray(HEADER_SIZE);
  if (flags & FLAG_LZ4) body = lz4FrameDecompress(body, maxDecompressedBytes);
  let value;
  let boxed;
  try {
    ({ value, boxed } = decodeBoxed(body));
  } catch (err) {
    if (err instanceof DecodeError) throw err;
    throw new DecodeError(`malformed ${KIND_NAMES[kind]} body: ${err.message}`);
  }
  const fields = checkFields(kind, value, { maxRecords });
  if (boxed && !exactFloats) {
    value = unbox(value);
    if (kind === Kind.DATA) fields.records = value[2];
  }
  return { kind, kindName: KIND_NAMES[kind], flags, body: value, fields, nbytes: bytes.length };
}
