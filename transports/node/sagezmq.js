// sage-zmq wire protocol v1 for Node.js: frames, records, key partition, producer, consumer.
// The contract is ../PROTOCOL.md; golden frames are ../vectors/frames.json.

export {
  EXT_END_OF_STREAM,
  EXT_NDARRAY,
  EXT_PACKET,
  FLAG_LZ4,
  FLAG_PICKLE,
  HEADER_SIZE,
  KIND_NAMES,
  Kind,
  VERSION,
  decodeFrame,
  dtypeItemsize,
  encodeData,
  encodeFrame,
  packValue,
  parseHeader,
  unpackValue,
} from "./lib/codec.js";
export { lz4FrameDecompress, xxh32 } from "./lib/lz4.js";
export {
  KEY_GROUP_DEFAULT,
  instanceForKey,
  keyBytes,
  keyGroup,
  keyHash,
  murmur3x86_32,
} from "./lib/partition.js";
export { Consumer, Producer, newProducerId } from "./lib/peers.js";
export {
  RELIABILITY_DEFAULTS,
  ReliableConsumer,
  ReliableProducer,
  reliabilitySettings,
} from "./lib/reliable.js";
export { fromTyped, toTyped } from "./lib/typed.js";
export {
  DecodeError,
  DeliveryError,
  EmptyError,
  EncodeError,
  EndOfStream,
  F64,
  FullError,
  NdArray,
  Packet,
  QueueClosedError,
  RoutingError,
  SzError,
} from "./lib/types.js";
