"""Codec edge cases: datetime64/timedelta64 arrays on the wire, and the text of a rejection
for a body nested too deep (transports/PROTOCOL.md §7, §10)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from sage_zmq import QueueDescriptor
from sage_zmq.errors import DecodeError, Empty
from sage_zmq.packet import Packet
from sage_zmq.shm import is_shared
from sage_zmq.wire.codec import EXT_NDARRAY, EXT_PACKET, Codec
from sage_zmq.wire.dtypes import dtype_from_wire, dtype_to_wire
from sage_zmq.wire.frame import Kind, header

PRODUCER = "host:1:edge"
T = 20.0  # bound on every blocking call
KiB = 1024
NAT = -(2**63)


def _round_trip(records: list[Any], codec: Codec | None = None) -> list[Any]:
    codec = codec or Codec()
    frame, sent, errors = codec.encode_batch(PRODUCER, 3, records)
    assert errors == [] and sent == records
    producer, seq, got = codec.decode(frame).fields
    assert (producer, seq) == (PRODUCER, 3)
    return list(got)


def _assert_same_array(sent: np.ndarray, back: np.ndarray) -> None:
    # Compare the int64 counts, not the values: NaT != NaT, so == would hide a lost NaT.
    assert isinstance(back, np.ndarray)
    assert back.dtype == sent.dtype and back.shape == sent.shape
    assert np.ascontiguousarray(back).tobytes() == np.ascontiguousarray(sent).tobytes()


def _with_nat(arr: np.ndarray) -> np.ndarray:
    arr = arr.copy()
    if arr.size:
        arr.reshape(-1)[0] = (
            np.datetime64("NaT") if arr.dtype.kind == "M" else np.timedelta64("NaT")
        )
    return arr


def _dt_arrays(n: int = 6) -> list[np.ndarray]:
    """datetime64/timedelta64 arrays of several units and shapes, each holding a NaT."""
    base = np.arange(n, dtype=np.int64) * 977 - 1000  # negative counts too: before 1970
    return [
        _with_nat(base.astype("<M8[ns]")),
        _with_nat(base.astype("<M8[D]").reshape(2, -1)),
        _with_nat(base.astype("<M8[10ms]")),
        _with_nat(base.astype("<M8[M]")),
        _with_nat(base.astype("<m8[s]").reshape(-1, 2, 1)),
        _with_nat(base.astype("<m8[us]")),
        _with_nat(base.astype("<m8[Y]")),
        np.array(["NaT"], dtype="<M8"),  # the generic unit holds only NaT
        np.array(np.datetime64("2024-02-29T12:34:56.789", "ms")),  # 0-d
    ]


# ------------------------------------------------------------------ datetime64 / timedelta64
@pytest.mark.parametrize("arr", _dt_arrays(), ids=lambda a: f"{a.dtype.str}-{a.shape}")
def test_datetime_and_timedelta_arrays_round_trip_inline(arr: np.ndarray) -> None:
    (back,) = _round_trip([arr])
    _assert_same_array(arr, back)


def test_datetime_arrays_keep_their_dtype_on_the_wire_as_int64_counts() -> None:
    arr = np.array(["1970-01-02", "NaT", "1969-12-31"], dtype="<M8[D]")
    frame, _, errors = Codec().encode_batch(PRODUCER, 0, [arr])
    assert errors == []
    body = msgpack.unpackb(frame[8:], raw=False)
    ext = body[2][0]
    assert ext.code == EXT_NDARRAY
    dtype, shape, data = msgpack.unpackb(ext.data, raw=False)
    # What a non-Python peer reads (PROTOCOL.md §7): the real dtype string, int64 counts.
    assert (dtype, shape) == ("<M8[D]", [3])
    assert dtype_to_wire(arr.dtype) == dtype and dtype_from_wire(dtype) == arr.dtype  # as ext 4
    assert np.frombuffer(data, "<i8").tolist() == [1, NAT, -1]


def test_big_endian_strided_and_structured_datetimes_round_trip_inline() -> None:
    big = _with_nat(np.arange(8).astype(">M8[s]"))
    strided = _with_nat(np.arange(24).astype("<m8[ms]").reshape(4, 6))[:, ::2]
    structured = np.zeros(3, dtype=[("t", "<M8[ns]"), ("v", "<f8"), ("d", "<m8[s]", (2,))])
    structured["t"] = [0, NAT, 5]
    structured["d"] = [[1, NAT], [2, 3], [4, 5]]
    packet = Packet(_with_nat(np.arange(4).astype("<M8[us]")))
    back = _round_trip([big, strided, structured, packet])
    _assert_same_array(big, back[0])
    _assert_same_array(strided, back[1])
    _assert_same_array(structured, back[2])
    _assert_same_array(packet.payload, back[3].payload)


@pytest.fixture
def make(queues: Callable[..., QueueDescriptor]) -> Callable[..., QueueDescriptor]:
    return lambda queue_type, **meta: queues(None, queue_type, {"maxsize": 100, **meta})


@pytest.mark.parametrize("queue_type", ["tcp", "shm"])
def test_datetime_arrays_cross_a_queue_below_and_above_the_shm_threshold(
    make: Callable[..., QueueDescriptor], queue_type: str
) -> None:
    qd = make(queue_type, shm_threshold=64 * KiB)
    small = [*_dt_arrays(), np.empty((0, 3), dtype="<M8[s]")]
    # 16384 items x 8 bytes = 128 KiB: through the pool on shm, inline on tcp
    large = [
        _with_nat((np.arange(16384) * 1_000_003).astype("<M8[ns]")).reshape(128, 128),
        _with_nat(np.arange(16384).astype("<m8[s]")),
    ]
    records = small + large
    for arr in records:
        qd.put(arr)
    got = [qd.get(timeout=T) for _ in records]
    for sent, back in zip(records, got, strict=True):
        _assert_same_array(sent, back)
        assert back.size == 0 or not back.flags.writeable  # (an empty one is a fresh array)
    assert [is_shared(a) for a in got] == [
        queue_type == "shm" and a.nbytes >= 64 * KiB for a in got
    ]
    del got
    assert qd.statistics().encode_errors == 0


def test_datetime_arrays_cross_shm_when_its_pool_is_disabled(
    make: Callable[..., QueueDescriptor],
) -> None:
    qd = make("shm", shm_threshold=1 << 40)  # every array inline, even on shm
    arr = _with_nat(np.arange(20000).astype("<M8[ms]"))
    qd.put(arr)
    back = qd.get(timeout=T)
    _assert_same_array(arr, back)
    assert not is_shared(back)


# -------------------------------------------------------------------- nested too deep
DATA_HEADER = header(Kind.DATA)


def _data_frame(records_body: bytes) -> bytes:
    # [producer, 0, [<one record>]]
    return DATA_HEADER + b"\x93" + msgpack.packb(PRODUCER) + b"\x00\x91" + records_body


@pytest.mark.parametrize(
    "record",
    [b"\x91" * 100_000 + b"\x00", b"\x81\x00" * 50_000 + b"\x00"],
    ids=["array", "map"],
)
def test_a_body_nested_too_deep_is_rejected_with_a_reason(record: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        Codec().decode(_data_frame(record))
    message = str(info.value)
    assert message.startswith("malformed DATA body: ")
    assert "nested deeper than the decoder allows" in message
    assert "StackError" in message


def test_a_packet_payload_nested_too_deep_names_the_extension_and_the_reason() -> None:
    fields = b"\x96" + b"\x91" * 100_000 + b"\x00" + b"\x00\xc0\xc0\xc0" + msgpack.packb(1.0)
    record = msgpack.packb(msgpack.ExtType(EXT_PACKET, fields))
    with pytest.raises(DecodeError) as info:
        Codec().decode(_data_frame(record))
    message = str(info.value)
    assert message.startswith(f"bad extension value (type {EXT_PACKET}): ")
    assert "nested deeper than the decoder allows" in message


def test_the_consumer_error_reply_says_why_a_deep_body_was_rejected(
    make: Callable[..., QueueDescriptor],
) -> None:
    qd = make("tcp")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    codec = Codec()
    try:
        sock.connect(str(qd.endpoint))
        sock.send(_data_frame(b"\x91" * 100_000 + b"\x00"))
        errors: list[dict[str, Any]] = []
        deadline = time.monotonic() + T
        while not errors:
            assert time.monotonic() < deadline, "timed out waiting for the ERROR reply"
            with contextlib.suppress(Empty):
                qd.get(timeout=0.01)  # pumps the consumer: it reads and rejects the frame
            while sock.poll(0):
                msg = codec.decode(sock.recv())
                if msg.kind is Kind.ERROR:
                    errors.append(msg.fields)
        assert errors[0]["code"] == "rejected"
        assert "nested deeper than the decoder allows" in errors[0]["message"]
        assert qd.statistics().rejected == 1
    finally:
        sock.close(linger=0)
        ctx.term()


def test_an_empty_array_from_a_frame_is_read_only_like_the_others() -> None:
    import numpy as np

    from sage_zmq.wire.codec import Codec

    codec = Codec()
    frame, _, _ = codec.encode_batch("p", 0, [np.zeros(0, "<f8"), np.zeros(3, "<f8")])
    empty, full = codec.decode(frame).fields[2]
    assert empty.shape == (0,) and not empty.flags.writeable
    assert not full.flags.writeable


# ------------------------------------------------------------------ structured layouts
def _padded_dtypes() -> list[np.dtype[Any]]:
    inner = np.dtype([("x", "u1"), ("y", "<i4")], align=True)  # 3 bytes of padding inside
    return [
        np.dtype([("a", "u1"), ("b", "<f8")], align=True),  # padding between fields
        np.dtype([("b", "<f8"), ("a", "u1")], align=True),  # padding after the last field
        np.dtype({"names": ["p", "q"], "formats": ["<i2", "<i2"], "offsets": [0, 6]}),
        np.dtype([("n", inner), ("m", "<f4", (2,))], align=True),  # nested, and a subarray
        np.dtype({"names": ["v"], "formats": ["<i4"], "titles": ["Velocity"]}),
    ]


@pytest.mark.parametrize("dt", _padded_dtypes(), ids=str)
def test_structured_padding_stays_padding(dt: np.dtype[Any]) -> None:
    # np.dtype(descr) turns padding entries into fields named f1, ...: the receiver must not.
    arr = np.zeros(3, dt)
    for name in dt.names or ():
        arr[name] = 1
    assert dtype_from_wire(msgpack.unpackb(msgpack.packb(dtype_to_wire(dt)))) == dt
    (back,) = _round_trip([arr])
    assert back.dtype == dt and back.dtype.names == dt.names and back.dtype.itemsize == dt.itemsize
    assert back.tobytes() == arr.tobytes()


def test_structured_padding_stays_padding_through_shared_memory(
    queues: Callable[..., QueueDescriptor],
) -> None:
    qd = queues(None, "shm", {"shm_threshold": 1})
    sent = [np.ones(100, dt) for dt in _padded_dtypes()]
    for arr in sent:
        qd.put(arr, timeout=10)
    for arr in sent:
        back = qd.get(timeout=10)
        assert is_shared(back) and back.dtype == arr.dtype and back.dtype.names == arr.dtype.names
        assert back.tobytes() == arr.tobytes()
        del back


@pytest.mark.parametrize(
    "spec",
    [[["a"]], [["a", "<i4", [2], "x"]], [[5, "<i4"]], [["a", "|O"]], [["a", "zz9"]], 7],
    ids=repr,
)
def test_malformed_structured_dtypes_are_decode_errors(spec: Any) -> None:
    with pytest.raises(DecodeError, match=r"ndarray"):
        dtype_from_wire(spec)
