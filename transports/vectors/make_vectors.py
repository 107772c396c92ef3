"""Regenerate ``frames.json``: golden wire frames made by the Python codec.

Usage: ``python transports/vectors/make_vectors.py`` (writes ``frames.json`` beside this file)
or ``--check`` (exits 1 if the file on disk differs from what the codec makes now).

The output is deterministic: fixed producer ids, timestamps and data. Each value is written as a
*typed tree* (see ``README.md``) so that a reader in any language can tell an int from a float,
a str from bin and a map's key order, none of which plain JSON keeps. ``to_typed`` and
``from_typed`` are also used by ``tests/test_vectors.py`` and ``tests/test_node_interop.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import lz4.frame
import msgpack
import numpy as np

from sage_zmq.errors import DecodeError
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.wire.codec import _MAP_SCHEMAS, Codec
from sage_zmq.wire.dtypes import dtype_from_wire, dtype_to_wire
from sage_zmq.wire.frame import Kind

HERE = Path(__file__).resolve().parent
FRAMES = HERE / "frames.json"
SAFE_INT = 2**53 - 1

Typed = dict[str, Any]


# ------------------------------------------------------------------ typed trees
def to_typed(value: Any) -> Typed:
    """A Python record as a typed tree (the language-neutral JSON form of a msgpack value)."""
    if value is None:
        return {"nil": None}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value if abs(value) <= SAFE_INT else str(value)}
    if isinstance(value, float):
        if math.isnan(value):
            return {"float": "nan"}
        if math.isinf(value):
            return {"float": "inf" if value > 0 else "-inf"}
        return {"float": value}
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bin": bytes(value).hex()}
    if isinstance(value, list | tuple):
        return {"array": [to_typed(v) for v in value]}
    if isinstance(value, dict):
        return {"map": [[to_typed(k), to_typed(v)] for k, v in value.items()]}
    if isinstance(value, Packet):
        return {
            "packet": {
                "payload": to_typed(value.payload),
                "input_index": to_typed(value.input_index),
                "partition_key": to_typed(value.partition_key),
                "partition_strategy": to_typed(value.partition_strategy),
                "headers": to_typed(value.headers),
                "timestamp": to_typed(value.timestamp),
            }
        }
    if isinstance(value, np.ndarray):
        dtype = dtype_to_wire(value.dtype)
        return {
            "ndarray": {
                "dtype": json.loads(json.dumps(dtype)),  # tuples -> lists
                "shape": list(value.shape),
                "data": np.ascontiguousarray(value).tobytes().hex(),
            }
        }
    if isinstance(value, EndOfStream):
        return {"eos": {"source": to_typed(value.source)}}
    raise TypeError(f"no typed form for {type(value).__qualname__}")


def from_typed(tree: Typed) -> Any:
    """The Python value of a typed tree (inverse of :func:`to_typed`)."""
    if not isinstance(tree, dict) or len(tree) != 1:
        raise ValueError(f"a typed value is a one-key object, got {tree!r}")
    ((tag, v),) = tree.items()
    if tag == "nil":
        return None
    if tag in ("bool", "str"):
        return v
    if tag == "int":
        return int(v)
    if tag == "float":
        return float(v)
    if tag == "bin":
        return bytes.fromhex(v)
    if tag == "array":
        return [from_typed(x) for x in v]
    if tag == "map":
        return {from_typed(k): from_typed(x) for k, x in v}
    if tag == "packet":
        return Packet(
            from_typed(v["payload"]),
            from_typed(v["input_index"]),
            from_typed(v["partition_key"]),
            from_typed(v["partition_strategy"]),
            from_typed(v["headers"]),
            from_typed(v["timestamp"]),
        )
    if tag == "ndarray":
        dtype = dtype_from_wire(v["dtype"])
        return np.frombuffer(bytes.fromhex(v["data"]), dtype=dtype).reshape(v["shape"]).copy()
    if tag == "eos":
        return EndOfStream(from_typed(v["source"]))
    raise ValueError(f"unknown typed tag {tag!r}")


# ---------------------------------------------------------------------- vectors
TS = 1700000000.25  # a fixed Packet timestamp: exactly representable
PRODUCER = "host:4242:0badc0de"


def _records() -> dict[str, list[Any]]:
    """Record batches, one DATA vector each."""
    return {
        "data_ints": [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1],
        "data_negative_ints": [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**63)],
        "data_scalars": [
            None, True, False, 1.5, 2.0, -0.0, 1e300, float("inf"), float("-inf"),
            "", "héllo wörld ✓", "x" * 31, "y" * 40, "z" * 300, b"", b"\x00\xff", bytes(300),
        ],
        "data_containers": [
            [],
            [1, [2, [3, []]]],
            list(range(20)),
            {},
            {"b": 1, "a": 2, "1": 3},
            {f"k{i}": i for i in range(17)},
            {1: "one", -2: "minus two"},
            {"nested": {"list": [1.25, "s", None, b"\x01"]}},
        ],
        "data_packets": [
            Packet("payload", 0, "user-1", None, None, TS),
            Packet({"v": 1}, 2, 42, "hash", {"trace": "abc", "hop": 1}, TS),
            Packet(b"\x01\x02", 0, b"\xde\xad", None, {}, TS),
            Packet([1, 2], 1, 1.0, None, None, TS),
            Packet(None, 0, 0, "round_robin", None, TS),
            Packet("", 0, "", None, None, TS),
            Packet(bytes(300), 0, True, None, None, TS),
            Packet(np.arange(3, dtype="<i4"), 0, None, None, None, TS),
        ],
        "data_ndarrays": [
            np.array([[1.0, 2.0], [3.0, 4.5]], dtype="<f8"),
            np.arange(6, dtype="<i4").reshape(2, 3),
            np.zeros(0, dtype="|u1"),
            np.array([True, False]),
            np.array([1 + 2j], dtype="<c16"),
            np.array(7, dtype="<i8"),
            np.array([(1, 2.5), (3, -1.0)], dtype=[("x", "<i4"), ("y", "<f8")]),
            _aligned(),
        ],
        # Nested: as a top-level record an EndOfStream is refused (see the invalid vectors).
        "data_end_of_stream_records": [[EndOfStream(), EndOfStream("upstream-1")], "after"],
        "data_empty_batch": [],
    }


def _aligned() -> np.ndarray:
    """align=True leaves 7 bytes of padding (a "" entry) between x and y and 4 after z; they
    are zeroed, so that the vector is deterministic."""
    arr = np.zeros(2, np.dtype([("x", "|u1"), ("y", "<f8"), ("z", "<i4")], align=True))
    arr["x"], arr["y"], arr["z"] = [1, 4], [2.5, -1.0], [3, 5]
    return arr


def _control() -> list[tuple[str, Kind, Any, str]]:
    return [
        (
            "hello_fresh",
            Kind.HELLO,
            {"producer": PRODUCER, "epoch": 0, "queue": "q1", "next_seq": 0, "acked": 0},
            "what a new producer sends first (key order as the Python producer sends it)",
        ),
        (
            "hello_restart",
            Kind.HELLO,
            {"producer": PRODUCER, "epoch": 3, "queue": "q1", "next_seq": 1500, "acked": 1200},
            "a persistent producer after its third restart",
        ),
        (
            "hello_minimal_future_key",
            Kind.HELLO,
            {"producer": "p", "epoch": 0, "next_seq": 0, "x-future": [1, 2]},
            "only the required keys plus an unknown one, which a receiver ignores",
        ),
        (
            "credit",
            Kind.CREDIT,
            {"session": "a1b2c3d4e5f6", "received": 150, "acked": 100, "limit": 1100},
            "consumer -> producer: received/acked/limit are cumulative seqs",
        ),
        (
            "credit_first",
            Kind.CREDIT,
            {"session": "a1b2c3d4e5f6", "received": 0, "acked": 0, "limit": 500},
            "the answer to HELLO with 2 producers on maxsize 1000",
        ),
        (
            "credit_shm_base_pid",
            Kind.CREDIT,
            {
                "session": "0f1e2d3c4b5a",
                "received": 42,
                "acked": 40,
                "limit": 140,
                "base": 30,
                "pid": 4242,
            },
            "an shm consumer whose stream from this producer started at seq 30 (section 6)",
        ),
        (
            "credit_release_ring",
            Kind.CREDIT,
            {
                "session": "0f1e2d3c4b5a",
                "received": 42,
                "acked": 40,
                "limit": 140,
                "base": 30,
                "pid": 4242,
                "release_ring": "sagezmq-4242-9c0ffee1-0",
            },
            "an shm consumer naming its release ring for this producer (section 6)",
        ),
        ("end", Kind.END, [PRODUCER, 250], "end of stream of one upstream; takes seq 250"),
        ("close", Kind.CLOSE, [PRODUCER, 251], "producer leaves after seq 250; wants a receipt"),
        ("close_big_seq", Kind.CLOSE, [PRODUCER, 2**63 - 1], "the largest seq allowed"),
        ("heartbeat", Kind.HEARTBEAT, [PRODUCER], "asks for a CREDIT"),
        (
            "error",
            Kind.ERROR,
            {"code": "rejected", "message": "unsupported wire version 2; this peer speaks 1"},
            "consumer -> producer after a rejected frame",
        ),
        ("release", Kind.RELEASE, [PRODUCER, [0, 5, 17]], "shared-memory slots handed back"),
    ]


def _frame_hex(kind: Kind, body_bytes: bytes, flags: int = 0) -> str:
    return (b"SZ" + bytes((1, int(kind), flags, 0, 0, 0)) + body_bytes).hex()


def _invalid() -> list[dict[str, str]]:
    """Frames every receiver must reject."""
    pack = msgpack.packb
    good_end = pack([PRODUCER, 1])
    cases = [
        ("empty", b"", "no header at all"),
        ("short_header", b"SZ\x01\x04\x00\x00\x00", "7 bytes: shorter than the header"),
        ("bad_magic", b"SX\x01\x04\x00\x00\x00\x00" + good_end, "magic is not 'SZ'"),
        ("version_2", b"SZ\x02\x04\x00\x00\x00\x00" + good_end, "a version this peer lacks"),
        ("version_0", b"SZ\x00\x04\x00\x00\x00\x00" + good_end, "version 0 does not exist"),
        ("kind_0", b"SZ\x01\x00\x00\x00\x00\x00" + good_end, "unknown kind 0"),
        ("kind_9", b"SZ\x01\x09\x00\x00\x00\x00" + good_end, "unknown kind 9"),
        ("flag_bit_2", b"SZ\x01\x04\x04\x00\x00\x00" + good_end, "reserved flag bit 0x04"),
        ("flag_bit_7", b"SZ\x01\x04\x80\x00\x00\x00" + good_end, "reserved flag bit 0x80"),
        ("reserved_byte", b"SZ\x01\x04\x00\x00\x01\x00" + good_end, "reserved byte not zero"),
        (
            "pickle_flag_without_pickle",
            b"SZ\x01\x03\x02\x00\x00\x00" + pack(["p", 0, []]),
            "PICKLE flag on a link where pickle is not enabled (the default)",
        ),
        ("no_body", b"SZ\x01\x04\x00\x00\x00\x00", "header without a msgpack body"),
        ("trailing_bytes", _raw(Kind.END, good_end + b"\xc0"), "two msgpack values"),
        ("truncated_body", _raw(Kind.END, good_end[:-1]), "msgpack value cut short"),
        (
            "array_longer_than_frame",
            _raw(Kind.DATA, b"\x93\xa1p\x00\xdd\xff\xff\xff\xff"),
            "array header claims 2^32-1 items in a tiny frame",
        ),
        ("reserved_msgpack_byte", _raw(Kind.END, b"\x92\xa1p\xc1"), "0xc1 is never used"),
        ("data_as_map", _raw(Kind.DATA, pack({"producer": "p"})), "DATA body must be an array"),
        ("data_two_fields", _raw(Kind.DATA, pack(["p", 0])), "DATA needs 3 fields"),
        ("data_records_not_array", _raw(Kind.DATA, pack(["p", 0, 5])), "records not an array"),
        ("data_negative_seq", _raw(Kind.DATA, pack(["p", -1, []])), "seq below 0"),
        ("data_seq_2_63", _raw(Kind.DATA, pack(["p", 2**63, []])), "seq not below 2^63"),
        ("data_float_seq", _raw(Kind.DATA, pack(["p", 1.0, []])), "seq must be an int"),
        (
            "data_seq_past_2_63",
            _raw(Kind.DATA, pack(["p", 2**63 - 2, [1, 2]])),
            "seq + record count reaches 2^63: the seq after the batch must be below 2^63",
        ),
        ("end_seq_2_63_minus_1", _raw(Kind.END, pack(["p", 2**63 - 1])), "END seq + 1 reaches 2^63"),
        ("data_empty_producer", _raw(Kind.DATA, pack(["", 0, []])), "producer id empty"),
        ("data_long_producer", _raw(Kind.DATA, pack(["p" * 129, 0, []])), "producer id > 128"),
        ("data_bin_producer", _raw(Kind.DATA, pack([b"p", 0, []])), "producer id must be str"),
        ("end_three_fields", _raw(Kind.END, pack(["p", 1, 2])), "END is [producer, seq]"),
        ("heartbeat_two_fields", _raw(Kind.HEARTBEAT, pack(["p", 1])), "HEARTBEAT is [producer]"),
        (
            "hello_missing_next_seq",
            _raw(Kind.HELLO, pack({"producer": "p", "epoch": 0})),
            "HELLO requires producer, epoch, next_seq",
        ),
        (
            "hello_bool_epoch",
            _raw(Kind.HELLO, pack({"producer": "p", "epoch": True, "next_seq": 0})),
            "a bool is not an int",
        ),
        (
            "credit_acked_above_received",
            _raw(Kind.CREDIT, pack({"session": "s", "received": 1, "acked": 2, "limit": 5})),
            "acked must not exceed received",
        ),
        (
            "credit_missing_limit",
            _raw(Kind.CREDIT, pack({"session": "s", "received": 1, "acked": 1})),
            "CREDIT requires all four keys",
        ),
        ("error_not_map", _raw(Kind.ERROR, pack(["rejected", "x"])), "ERROR body is a map"),
        ("release_bad_slots", _raw(Kind.RELEASE, pack(["p", 3])), "slots must be an array"),
        (
            "unknown_ext_5",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(5, b"\x90")]])),
            "extension type 5 is not defined",
        ),
        (
            "pickle_ext_not_enabled",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(127, b"\x80\x05N.")]])),
            "extension 127 (pickle) where pickle is not enabled",
        ),
        (
            "shm_ref_without_shm",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(4, pack(["s", 0, 1, 0, None, None]))]])),
            "extension 4 on a link without shared memory",
        ),
        (
            "end_of_stream_top_level_record",
            _raw(Kind.DATA, pack(["p", 0, ["a", msgpack.ExtType(3, pack([None]))]])),
            "a top-level DATA record is an EndOfStream (an upstream ends with END, PROTOCOL §9)",
        ),
        (
            "end_of_stream_int_source",
            _raw(Kind.DATA, pack(["p", 0, [[msgpack.ExtType(3, pack([5]))]]])),
            "an EndOfStream (extension 3) holds [source: str or nil]",
        ),
        (
            "end_of_stream_empty",
            _raw(Kind.DATA, pack(["p", 0, [[msgpack.ExtType(3, pack([]))]]])),
            "an EndOfStream (extension 3) holds exactly one field",
        ),
        (
            "packet_five_fields",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(1, pack([1, 0, None, None, None]))]])),
            "a Packet holds exactly 6 fields",
        ),
        (
            "packet_str_timestamp",
            _raw(
                Kind.DATA,
                pack(["p", 0, [msgpack.ExtType(1, pack([1, 0, None, None, None, "now"]))]]),
            ),
            "Packet timestamp must be a number",
        ),
        (
            "packet_headers_not_map",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(1, pack([1, 0, None, None, 5, 1.0]))]])),
            "Packet headers must be a map or nil",
        ),
        (
            "ndarray_size_mismatch",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(2, pack(["<f8", [2], b"\0" * 8]))]])),
            "2 float64 need 16 bytes, not 8",
        ),
        (
            "ndarray_negative_dim",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(2, pack(["<f8", [-1], b""]))]])),
            "shape entries are non-negative",
        ),
        (
            "ndarray_object_dtype",
            _raw(Kind.DATA, pack(["p", 0, [msgpack.ExtType(2, pack(["|O", [1], b"\0" * 8]))]])),
            "object arrays never travel",
        ),
        ("lz4_garbage", _raw(Kind.END, b"not an lz4 frame", flags=1), "LZ4 flag, body not LZ4"),
        (
            "lz4_truncated",
            _raw(Kind.END, lz4.frame.compress(good_end * 10)[:-6], flags=1),
            "LZ4 frame without its end mark",
        ),
    ]
    return [{"name": n, "hex": b.hex(), "why": why} for n, b, why in cases]


def _raw(kind: Kind, body: bytes, flags: int = 0) -> bytes:
    return bytes.fromhex(_frame_hex(kind, body, flags))


def build() -> dict[str, Any]:
    """All vectors, as written to ``frames.json``."""
    codec = Codec()
    valid: list[dict[str, Any]] = []
    for name, kind, body, what in _control():
        frame = codec.encode_control(kind, body)
        valid.append(_entry(name, what, frame, kind, 0, body, canonical=True))
    for name, records in _records().items():
        frame, sent, errors = codec.encode_batch(PRODUCER, 7, records)
        assert not errors and len(sent) == len(records), errors
        body = [PRODUCER, 7, records]
        valid.append(_entry(name, f"DATA: {name[5:].replace('_', ' ')}", frame, Kind.DATA, 0, body,
                            canonical=True))
    lz_records = [{"i": i, "text": "repetitive text " * 4} for i in range(20)]
    frame, _, _ = codec.encode_batch(PRODUCER, 0, lz_records, compress=True)
    assert frame[4] == 1, "expected the LZ4 flag"
    valid.append(
        _entry(
            "data_lz4",
            "DATA with an LZ4-frame body; decode only: LZ4 output differs between libraries",
            frame,
            Kind.DATA,
            1,
            [PRODUCER, 0, lz_records],
            canonical=False,
        )
    )
    invalid = _invalid()
    for case in invalid:  # the vectors must hold for the reference implementation itself
        try:
            codec.decode(bytes.fromhex(case["hex"]))
        except DecodeError:
            continue
        raise AssertionError(f"the Python codec accepts invalid vector {case['name']}")
    return {
        "format": "sage-zmq golden frames, wire version 1; see README.md",
        "generator": "transports/vectors/make_vectors.py",
        "valid": valid,
        "invalid": invalid,
    }


def _entry(
    name: str, what: str, frame: bytes, kind: Kind, flags: int, body: Any, *, canonical: bool
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "description": what,
        "kind": int(kind),
        "kind_name": kind.name,
        "flags": flags,
        "body": to_typed(body),
        "canonical": canonical,
        "hex": frame.hex(),
    }
    if kind in (Kind.HELLO, Kind.CREDIT, Kind.ERROR):
        known = _MAP_SCHEMAS[kind]  # the keys the codec reads; any other one is ignored
        ignored = [k for k in body if k not in known]
        if ignored:
            entry["ignored_keys"] = ignored
    return entry


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if frames.json is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        on_disk = FRAMES.read_text(encoding="utf-8") if FRAMES.exists() else ""
        if on_disk != text:
            print(f"{FRAMES} is stale: run {Path(__file__).name} to regenerate", file=sys.stderr)
            return 1
        return 0
    FRAMES.write_text(text, encoding="utf-8")
    print(f"wrote {FRAMES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
