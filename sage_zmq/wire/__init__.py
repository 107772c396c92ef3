"""The wire format v1: one ZeroMQ frame = an 8-byte header + a msgpack body.

See ``transports/PROTOCOL.md`` for the language-neutral contract.
"""

from sage_zmq.wire.codec import Codec, DecodeLimits
from sage_zmq.wire.frame import FLAG_LZ4, FLAG_PICKLE, HEADER_SIZE, MAGIC, VERSION, Kind

__all__ = [
    "FLAG_LZ4",
    "FLAG_PICKLE",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "Codec",
    "DecodeLimits",
    "Kind",
]
