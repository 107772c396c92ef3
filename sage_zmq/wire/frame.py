"""Frame header: ``"SZ"``, version, kind, flags, three reserved zero bytes."""

from __future__ import annotations

from enum import IntEnum

from sage_zmq.errors import DecodeError

MAGIC = b"SZ"
VERSION = 1
HEADER_SIZE = 8

FLAG_LZ4 = 0x01
"""The body is an LZ4 frame (``lz4.frame``) holding the msgpack body."""
FLAG_PICKLE = 0x02
"""The body may hold pickle extension values (type 127); only honoured where pickle is enabled."""
KNOWN_FLAGS = FLAG_LZ4 | FLAG_PICKLE


class Kind(IntEnum):
    """What a frame carries. Direction: P = producer, C = consumer."""

    HELLO = 1  # P->C  producer introduces itself (id, epoch, first unacked seq)
    CREDIT = 2  # C->P  receipt, ack and credit limit (cumulative, idempotent)
    DATA = 3  # P->C  a batch of records with the seq of the first
    END = 4  # P->C  end of stream of one upstream; occupies one seq
    CLOSE = 5  # P->C  producer is closing after seq; asks for a receipt
    HEARTBEAT = 6  # P->C  liveness probe; answered with CREDIT
    ERROR = 7  # C->P  the consumer rejected something the producer sent
    RELEASE = 8  # C->P  shared-memory slots the consumer no longer uses


_HEADERS: dict[tuple[int, int], bytes] = {
    (kind, flags): MAGIC + bytes((VERSION, kind, flags, 0, 0, 0))
    for kind in Kind
    for flags in range(KNOWN_FLAGS + 1)
}


def header(kind: int, flags: int = 0) -> bytes:
    """The 8 header bytes for a frame of ``kind`` with ``flags``."""
    return _HEADERS[(kind, flags)]


_PARSED: dict[bytes, tuple[Kind, int]] = {
    head: (Kind(kind), flags) for (kind, flags), head in _HEADERS.items()
}


def parse_header(frame: bytes | memoryview) -> tuple[Kind, int]:
    """Validate a frame's header; returns ``(kind, flags)`` or raises :class:`DecodeError`."""
    # Every valid header is one of a few dozen byte strings: one lookup validates it.
    head = frame[:HEADER_SIZE]
    known = _PARSED.get(head if head.__class__ is bytes else bytes(head))
    if known is not None:
        return known
    return _explain_header(frame)


def _explain_header(frame: bytes | memoryview) -> tuple[Kind, int]:
    if len(frame) < HEADER_SIZE:
        raise DecodeError(f"frame of {len(frame)} bytes is shorter than the 8-byte header")
    head = bytes(frame[:HEADER_SIZE])
    if head[:2] != MAGIC:
        raise DecodeError(f"bad magic {head[:2]!r}; expected {MAGIC!r} (not a sage-zmq peer?)")
    if head[2] != VERSION:
        raise DecodeError(f"unsupported wire version {head[2]}; this peer speaks {VERSION}")
    try:
        kind = Kind(head[3])
    except ValueError:
        raise DecodeError(f"unknown frame kind {head[3]}") from None
    flags = head[4]
    if flags & ~KNOWN_FLAGS:
        raise DecodeError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}")
    if head[5:8] != b"\0\0\0":
        raise DecodeError("reserved header bytes are not zero")
    return kind, flags
