"""The wire codec: frames, records, validation, and property tests of encode/decode."""

from __future__ import annotations

import contextlib
import pickle
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sage_zmq import DecodeError, EncodeError, SageZmqError
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.testing import assert_same_record, sample_records
from sage_zmq.wire.codec import EXT_PICKLE, PLAIN_DATA_HEADER, Codec, DecodeLimits
from sage_zmq.wire.frame import FLAG_LZ4, FLAG_PICKLE, HEADER_SIZE, MAGIC, VERSION, Kind, header

PRODUCER = "host:1:abcd"


def _round_trip(records: list[Any], codec: Codec | None = None, **kw: Any) -> list[Any]:
    codec = codec or Codec()
    frame, sent, errors = codec.encode_batch(PRODUCER, 7, records, **kw)
    assert errors == [] and sent == records
    msg = codec.decode(frame)
    assert msg.kind is Kind.DATA and msg.nbytes == len(frame)
    producer, seq, got = msg.fields
    assert (producer, seq) == (PRODUCER, 7)
    return list(got)


# ----------------------------------------------------------------------------- records
def test_every_sample_record_round_trips() -> None:
    records = sample_records()
    got = _round_trip(records)
    for i, (sent, back) in enumerate(zip(records, got, strict=True)):
        assert_same_record(sent, back, by_reference=False, path=f"record {i}")


def test_packet_keeps_falsy_partition_keys() -> None:
    for key in (0, "", False, b"", 0.0, None):
        (back,) = _round_trip([Packet("p", partition_key=key)])
        assert back.partition_key == key and type(back.partition_key) is type(key)


def test_lz4_compressed_batch_round_trips() -> None:
    records = [{"text": "abc" * 100, "i": i} for i in range(50)]
    frame, _, _ = Codec().encode_batch(PRODUCER, 0, records, compress=True)
    assert frame[4] & FLAG_LZ4, "a compressible body should be compressed"
    assert Codec().decode(frame).fields[2] == records


def test_decoded_arrays_are_writable_copies_without_zero_copy() -> None:
    (arr,) = _round_trip([np.arange(4.0)], Codec(zero_copy=False))
    arr[0] = 9.0  # a read-only view of the frame would raise here


def test_unencodable_record_is_left_out_and_named() -> None:
    class Opaque:
        pass

    frame, sent, errors = Codec().encode_batch(PRODUCER, 0, [1, Opaque(), 3])
    assert sent == [1, 3]
    assert len(errors) == 1 and "Opaque" in errors[0]
    assert Codec().decode(frame).fields == (PRODUCER, 0, [1, 3])


def test_object_arrays_are_not_encoded() -> None:
    _, sent, errors = Codec().encode_batch(PRODUCER, 0, [np.array([object()])])
    assert sent == [] and errors and "object" in errors[0]


class Custom:
    """Not a msgpack type: travels only as pickle."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom)

    __hash__ = object.__hash__


def test_pickle_only_where_enabled() -> None:
    pickling = Codec(allow_pickle=True)
    frame, sent, _ = pickling.encode_batch(PRODUCER, 0, [Custom()])
    assert sent and frame[4] & FLAG_PICKLE
    assert pickling.decode(frame).fields[2] == [Custom()]
    with pytest.raises(DecodeError, match="pickle"):
        Codec().decode(frame)
    # The extension without the flag is refused too.
    body = msgpack.packb(
        [PRODUCER, 0, [msgpack.ExtType(EXT_PICKLE, pickle.dumps(1))]], use_bin_type=True
    )
    with pytest.raises(DecodeError):
        Codec().decode(header(Kind.DATA) + body)


# ----------------------------------------------------------------------------- control frames
@pytest.mark.parametrize(
    ("kind", "body", "fields"),
    [
        (Kind.END, [PRODUCER, 3], (PRODUCER, 3)),
        (Kind.CLOSE, [PRODUCER, 0], (PRODUCER, 0)),
        (Kind.HEARTBEAT, [PRODUCER], (PRODUCER,)),
        (Kind.RELEASE, [PRODUCER, [1, 2]], (PRODUCER, [1, 2])),
        (
            Kind.HELLO,
            {"producer": PRODUCER, "epoch": 0, "next_seq": 5, "future_key": 1},
            {"producer": PRODUCER, "epoch": 0, "next_seq": 5},
        ),
        (
            Kind.CREDIT,
            {"session": "s", "received": 4, "acked": 2, "limit": 10},
            {"session": "s", "received": 4, "acked": 2, "limit": 10},
        ),
        (Kind.ERROR, {"code": "rejected", "message": "m"}, {"code": "rejected", "message": "m"}),
    ],
)
def test_control_frames_round_trip(kind: Kind, body: Any, fields: Any) -> None:
    codec = Codec()
    msg = codec.decode(codec.encode_control(kind, body))
    assert msg.kind is kind
    assert (tuple(msg.fields) if isinstance(fields, tuple) else msg.fields) == fields


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (Kind.END, [PRODUCER]),
        (Kind.END, [PRODUCER, -1]),
        (Kind.END, [PRODUCER, 2**63]),
        (Kind.END, [PRODUCER, True]),
        (Kind.CLOSE, ["", 0]),
        (Kind.CLOSE, ["p" * 129, 0]),
        (Kind.HEARTBEAT, "p"),
        (Kind.DATA, [PRODUCER, 0, "not a list"]),
        (Kind.DATA, [PRODUCER, 0]),
        (Kind.HELLO, {"producer": PRODUCER, "epoch": 0}),
        (Kind.HELLO, {"producer": PRODUCER, "epoch": "0", "next_seq": 0}),
        (Kind.CREDIT, {"session": "s", "received": 1, "acked": 2, "limit": 3}),
        (Kind.CREDIT, [1, 2, 3, 4]),
        (Kind.ERROR, {"code": "x"}),
        (Kind.RELEASE, [PRODUCER, [-1]]),
    ],
)
def test_off_spec_control_bodies_are_rejected(kind: Kind, body: Any) -> None:
    with pytest.raises(DecodeError):
        Codec().decode(header(kind) + msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (b"SZ\x01", "shorter"),
        (b"XX\x01\x03\x00\x00\x00\x00\x90", "magic"),
        (MAGIC + bytes((9, 3, 0, 0, 0, 0)) + b"\x90", "version"),
        (MAGIC + bytes((VERSION, 99, 0, 0, 0, 0)) + b"\x90", "kind"),
        (MAGIC + bytes((VERSION, 3, 0x80, 0, 0, 0)) + b"\x90", "flag"),
        (MAGIC + bytes((VERSION, 3, 0, 0, 1, 0)) + b"\x90", "reserved"),
        (header(Kind.DATA) + b"\xc1", "DATA"),
        (header(Kind.DATA) + msgpack.packb([PRODUCER, 0, []]) + b"\x00", "DATA"),
        (header(Kind.DATA, FLAG_LZ4) + b"not lz4", "lz4"),
    ],
)
def test_bad_frames_are_rejected(frame: bytes, needle: str) -> None:
    with pytest.raises(DecodeError) as exc:
        Codec().decode(frame)
    assert needle.lower() in str(exc.value).lower()
    assert isinstance(exc.value, SageZmqError)


def test_limits_bound_what_a_frame_can_allocate() -> None:
    frame, _, _ = Codec().encode_batch(PRODUCER, 0, list(range(20)))
    with pytest.raises(DecodeError):
        Codec(limits=DecodeLimits(max_frame_bytes=len(frame) - 1)).decode(frame)
    with pytest.raises(DecodeError):
        Codec(limits=DecodeLimits(max_records=10)).decode(frame)
    bomb, _, _ = Codec().encode_batch(PRODUCER, 0, [b"\0" * 100_000], compress=True)
    assert bomb[4] & FLAG_LZ4 and len(bomb) < 10_000
    with pytest.raises(DecodeError):
        Codec(limits=DecodeLimits(max_decompressed_bytes=50_000)).decode(bomb)


def test_ndarray_with_inconsistent_data_is_rejected() -> None:
    inner = msgpack.packb(["<f8", [3], b"\0" * 16], use_bin_type=True)
    body = msgpack.packb([PRODUCER, 0, [msgpack.ExtType(2, inner)]], use_bin_type=True)
    with pytest.raises(DecodeError, match="bytes"):
        Codec().decode(header(Kind.DATA) + body)
    inner = msgpack.packb(["|O", [1], b"\0" * 8], use_bin_type=True)
    body = msgpack.packb([PRODUCER, 0, [msgpack.ExtType(2, inner)]], use_bin_type=True)
    with pytest.raises(DecodeError):
        Codec().decode(header(Kind.DATA) + body)


def test_a_pickled_top_level_end_of_stream_record_is_refused_too() -> None:
    # With pickle on, an EndOfStream can arrive pickled (ext 127) instead of as ext 3.
    codec = Codec(allow_pickle=True)
    pickled = msgpack.ExtType(EXT_PICKLE, pickle.dumps(EndOfStream()))
    top = msgpack.packb([PRODUCER, 0, ["a", pickled]], use_bin_type=True)
    with pytest.raises(DecodeError, match="a DATA record is an EndOfStream"):
        codec.decode(header(Kind.DATA, FLAG_PICKLE) + top)
    nested = msgpack.packb([PRODUCER, 0, ["a", [pickled]]], use_bin_type=True)
    assert codec.decode(header(Kind.DATA, FLAG_PICKLE) + nested).fields[2] == ["a", [EndOfStream()]]


def test_end_of_stream_value_keeps_its_source() -> None:
    ((back,),) = _round_trip([[EndOfStream("upstream-1")]])  # nested: data
    assert isinstance(back, EndOfStream) and back.source == "upstream-1"


@pytest.mark.parametrize("compress", [False, True])
def test_a_top_level_end_of_stream_record_is_refused(compress: bool) -> None:
    # It would come out of a consumer's get() like the real end of the stream (PROTOCOL §9);
    # an upstream ends with an END frame. Both decode paths refuse it (plain and flagged).
    codec = Codec()
    codec.compression_min_bytes = 0
    frame, _, _ = codec.encode_batch("p", 0, ["a" * 500, EndOfStream()], compress=compress)
    assert (frame[:HEADER_SIZE] != PLAIN_DATA_HEADER) == compress  # compressed: flagged
    with pytest.raises(DecodeError, match="a DATA record is an EndOfStream"):
        codec.decode(frame)
    if not compress:
        with pytest.raises(DecodeError, match="a DATA record is an EndOfStream"):
            codec.decode_plain_data(frame)


def test_an_integer_beyond_64_bits_is_refused_saying_why() -> None:
    _, sent, errors = Codec().encode_batch(
        PRODUCER, 0, [2**64 - 1, {"id": 2**64}, Packet(1, partition_key=-(2**63) - 1)]
    )
    assert sent == [2**64 - 1]
    assert len(errors) == 2
    assert "builtins.dict" in errors[0] and "the integer 18446744073709551616" in errors[0]
    assert "sage_zmq.packet.Packet" in errors[1] and "-9223372036854775809" in errors[1]
    assert all("-2**63 to 2**64-1" in e and "as a str" in e for e in errors)
    # With pickle on (an authenticated link), such an integer travels pickled.
    pickling = Codec(allow_pickle=True)
    frame, sent, errors = pickling.encode_batch(PRODUCER, 0, [2**70, {"id": 2**64}])
    assert errors == [] and pickling.decode_plain_data(frame)[2] == [2**70, {"id": 2**64}]


def test_encode_error_is_a_sage_error_naming_the_type() -> None:
    codec = Codec()
    with pytest.raises(EncodeError, match=r"builtins\.object") as exc:
        codec._default(object())
    assert isinstance(exc.value, SageZmqError) and isinstance(exc.value, TypeError)


# ----------------------------------------------------------------------------- properties
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), inner, max_size=5)
        | st.builds(
            Packet,
            inner,
            st.integers(0, 5),
            st.none() | st.integers(-5, 5) | st.text(max_size=5) | st.booleans(),
            st.none() | st.sampled_from(["hash", "broadcast"]),
            st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
            st.floats(0, 2e9),
        )
    ),
    max_leaves=20,
)
_arrays = hnp.arrays(
    # The dtypes PROTOCOL.md promises (datetime64 is not among them).
    dtype=hnp.boolean_dtypes()
    | hnp.integer_dtypes()
    | hnp.unsigned_integer_dtypes()
    | hnp.floating_dtypes()
    | hnp.complex_number_dtypes()
    | hnp.byte_string_dtypes()
    | hnp.unicode_string_dtypes(),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(records=st.lists(_values | _arrays, max_size=8), compress=st.booleans())
def test_decode_inverts_encode(records: list[Any], compress: bool) -> None:
    got = _round_trip(records, compress=compress)
    for sent, back in zip(records, got, strict=True):
        assert_same_record(sent, back, by_reference=False)


@_settings
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        Codec().decode(data)


@_settings
@given(
    kind=st.sampled_from(list(Kind)),
    flags=st.sampled_from([0, FLAG_LZ4]),
    body=st.binary(max_size=200)
    | _values.map(lambda v: msgpack.packb(v, default=_pack_default, use_bin_type=True)),
)
def test_random_bodies_behind_a_valid_header_only_raise_decode_error(
    kind: Kind, flags: int, body: bytes
) -> None:
    with contextlib.suppress(DecodeError):
        Codec().decode(header(kind, flags) + body)


@_settings
@given(code=st.integers(0, 127), payload=st.binary(max_size=64))
def test_random_extension_values_only_raise_decode_error(code: int, payload: bytes) -> None:
    body = msgpack.packb([PRODUCER, 0, [msgpack.ExtType(code, payload)]], use_bin_type=True)
    with contextlib.suppress(DecodeError):
        Codec().decode(header(Kind.DATA) + body)


def _pack_default(obj: Any) -> Any:
    # Random control bodies may contain Packets; encode them as the codec would.
    frame, _, _ = Codec().encode_batch(PRODUCER, 0, [obj])
    return msgpack.unpackb(frame[HEADER_SIZE:], raw=False, ext_hook=msgpack.ExtType)[2][0]


class NeedsPickle:
    """Picklable (defined at module level), and msgpack cannot carry it."""


def test_a_pickled_value_left_out_of_a_frame_does_not_mark_it_pickle() -> None:
    # The first pack pickled part of a record it then failed on; the salvage pass left that
    # record out but kept the PICKLE flag, so a pickle-off consumer refused the plain rest.
    import threading

    from sage_zmq.wire.frame import FLAG_PICKLE, parse_header

    bad = [NeedsPickle(), threading.Lock()]  # pickles its first item, fails on the lock
    frame, sent, errors = Codec(allow_pickle=True).encode_batch("p", 0, [{"a": 1}, bad, 2])
    assert sent == [{"a": 1}, 2] and len(errors) == 1
    assert not parse_header(frame)[1] & FLAG_PICKLE
    assert Codec().decode(frame).fields[2] == [{"a": 1}, 2]


def test_without_ormsgpack_msgpack_does_everything() -> None:
    # ormsgpack is a CPython-only dependency (pyproject.toml): elsewhere the codec must work
    # with msgpack alone, frames unchanged.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        sys.modules["ormsgpack"] = None  # an import of it now fails, as where it is missing
        from sage_zmq import QueueDescriptor
        from sage_zmq.wire.codec import Codec
        codec = Codec()
        frame, _, _ = codec.encode_batch("p", 3, [{"a": [1, 2.5]}, {1: "x"}])
        print(codec.fast, frame.hex(), codec.decode(frame).fields)
        qd = QueueDescriptor(queue_type="tcp")
        qd.put({"k": "v"})
        print(qd.get(timeout=10))
        qd.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    first, second = done.stdout.decode().splitlines()
    expected, _, _ = Codec().encode_batch("p", 3, [{"a": [1, 2.5]}, {1: "x"}])
    assert first == f"False {expected.hex()} ('p', 3, [{{'a': [1, 2.5]}}, {{1: 'x'}}])"
    assert second == "{'k': 'v'}"
