// Record types and errors shared by the codec and the peers.

/** Base of every error this library raises. */
export class SzError extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}
/** Bytes from the wire are not a valid frame; the frame is dropped. */
export class DecodeError extends SzError {}
/** A value has no wire form (see PROTOCOL.md section 7). */
export class EncodeError extends SzError {}
/** put() found no credit before its timeout. */
export class FullError extends SzError {}
/** get() found nothing before its timeout. */
export class EmptyError extends SzError {}
/** The producer was closed. */
export class QueueClosedError extends SzError {}
/** close() could not confirm every record as received; `undelivered` says how many. */
export class DeliveryError extends SzError {
  constructor(message, undelivered) {
    super(message);
    this.undelivered = undelivered;
  }
}
/** A partition key or parallelism is unusable for hash routing. */
export class RoutingError extends SzError {}

/**
 * A float64 whose value happens to be integral (JS numbers cannot tell 2.0 from 2).
 * Encoding an F64 always writes a msgpack float64; decoding with `exactFloats` yields F64
 * for integral floats, and Packet keys that were floats on the wire always come back as F64
 * so they hash like the float they are.
 */
export class F64 {
  constructor(value) {
    this.value = Number(value);
  }
  valueOf() {
    return this.value;
  }
  toJSON() {
    return this.value;
  }
}

/** Ext type 1: a payload with routing metadata (field order is the wire order). */
export class Packet {
  constructor(
    payload,
    {
      inputIndex = 0,
      partitionKey = null,
      partitionStrategy = null,
      headers = null,
      timestamp = Date.now() / 1000,
    } = {},
  ) {
    this.payload = payload;
    this.inputIndex = inputIndex;
    this.partitionKey = partitionKey;
    this.partitionStrategy = partitionStrategy;
    this.headers = headers;
    this.timestamp = timestamp;
  }
}

/** Ext type 2: a NumPy-style array. `data` holds the C-order bytes. */
export class NdArray {
  constructor(dtype, shape, data) {
    this.dtype = dtype;
    this.shape = shape;
    this.data = data instanceof Uint8Array ? data : new Uint8Array(data);
  }

  /** Wraps a typed array (little-endian host assumed, as on x86 and ARM). */
  static fromTypedArray(array, shape = [array.length]) {
    const codes = {
      Float64Array: "<f8",
      Float32Array: "<f4",
      Int32Array: "<i4",
      Int16Array: "<i2",
      Int8Array: "|i1",
      Uint32Array: "<u4",
      Uint16Array: "<u2",
      Uint8Array: "|u1",
      BigInt64Array: "<i8",
      BigUint64Array: "<u8",
    };
    const dtype = codes[array.constructor.name];
    if (!dtype) throw new EncodeError(`no NumPy dtype for ${array.constructor.name}`);
    return new NdArray(dtype, shape, new Uint8Array(array.buffer, array.byteOffset, array.byteLength));
  }
}

/** Ext type 3: a record-level end marker. Queues signal end of stream with the END frame. */
export class EndOfStream {
  constructor(source = null) {
    this.source = source;
  }
}
