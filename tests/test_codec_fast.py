"""The fast msgpack path (sage_zmq/wire/_fast.py) gives what msgpack-python gives, or declines.

Every property encodes or decodes the same input with the fast path on and off and compares:
frames byte for byte, decoded values value for value (types included), errors by message.

How much it saves: ``python -m sage_zmq.bench --only core`` (cross-process records/s), or
per record, ``Codec.decode_plain_data`` / ``Codec.encode_batch`` of 100 bench records under
``timeit`` with ``codec.fast`` True and False.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sage_zmq.errors import DecodeError
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.wire import _fast
from sage_zmq.wire.codec import Codec, DecodeLimits
from sage_zmq.wire.frame import Kind, header

pytestmark = pytest.mark.skipif(not _fast.AVAILABLE, reason="ormsgpack is not installed")

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _codecs(**kwargs: Any) -> tuple[Codec, Codec]:
    fast, slow = Codec(**kwargs), Codec(**kwargs)
    slow.fast = False
    return fast, slow


def _encode_both(records: list[Any], **kwargs: Any) -> tuple[Any, Any]:
    fast, slow = _codecs(**kwargs)
    return fast.encode_batch("p", 7, records), slow.encode_batch("p", 7, records)


def _decode_both(frame: bytes) -> tuple[Any, Any]:
    out = []
    for codec in _codecs(limits=DecodeLimits(1 << 22, 1 << 22)):
        try:
            out.append(("ok", codec.decode(frame).fields))
        except DecodeError as exc:
            out.append(("error", str(exc)))
    return out[0], out[1]


def _typed(value: Any) -> Any:
    """``value`` with each part's type beside it: 1 == 1.0 == True must not pass for equal."""
    if isinstance(value, dict):
        return ("dict", [(_typed(k), _typed(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, Packet):
        return ("Packet", _typed(value.payload), value.input_index, _typed(value.partition_key))
    return (type(value).__name__, value)


# Everything msgpack carries, with str keys (the fast path's case) and other keys (declined).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=300)
    | st.binary(max_size=300)
)
keys = st.text(max_size=20) | st.integers(-5, 5) | st.binary(max_size=4) | st.none()
records = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=12), inner, max_size=6)
        | st.dictionaries(keys, inner, max_size=4)
        | st.builds(EndOfStream, st.none() | st.text(max_size=8))
        | st.builds(Packet, inner, st.integers(0, 3), st.none() | st.text(max_size=8))
    ),
    max_leaves=25,
)


@PROPERTY
@given(st.lists(records, min_size=1, max_size=8))
@example([{"id": 1, "tags": ["a"], "ok": True, "v": 1.5}])
@example([{1: "int key"}, {"a": 1}])
@example([{(1, 2): "tuple key"}])
def test_frames_are_the_same_bytes(batch: list[Any]) -> None:
    fast, slow = _encode_both(batch)
    assert fast == slow


@PROPERTY
@given(st.lists(records, min_size=1, max_size=8))
def test_decoded_values_are_the_same(batch: list[Any]) -> None:
    frame, _, _ = Codec().encode_batch("p", 7, batch)
    fast, slow = _decode_both(frame)
    assert fast[0] == slow[0]  # both decode it, or both refuse it (a top-level EndOfStream)
    assert _typed(fast[1]) == _typed(slow[1])


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Ratio(float):
    pass


Point = collections.namedtuple("Point", "x y")


class OwnItems(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return [("x", 1)]


class OwnIter(list):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter([9, 9])


def _moved_to_end() -> collections.OrderedDict[str, int]:
    od = collections.OrderedDict(a=1, b=2)
    od.move_to_end("a")  # msgpack-python packs b, a: the dict's storage still says a, b
    return od


@dataclasses.dataclass
class Reading:
    value: int


# Values ormsgpack packs otherwise than msgpack-python (or not at all): the fast path must
# decline each, so that the frame, or the error, is msgpack-python's.
UNUSUAL = [
    Colour.RED,
    Level.HIGH,
    Ratio(0.5),
    Point(1, 2),
    Reading(1),
    datetime.datetime(2026, 1, 1),
    datetime.date(2026, 1, 1),
    uuid.UUID(int=5),
    2**64,
    -(2**63) - 1,
    {1},
    frozenset(),
    {Colour.RED: 1},
    {datetime.date(2026, 1, 1): 1},
    {uuid.UUID(int=5): 1},
    {1.5: 2},
    {None: 1},
    {True: 1},
    {(1, (2, 3)): "nested tuple key"},
    memoryview(b"abcdef")[::2],
    _moved_to_end(),
    OwnItems(a=1),
    OwnIter([1, 2]),
    collections.defaultdict(int, a=1),
    Packet({"k": 1}, headers=_moved_to_end()),
    np.float32(1.25),
    np.int64(-3),
    np.uint64(2**64 - 1),
    np.bool_(True),
    np.str_("s"),
    np.str_("s\x00"),  # item() would drop the NUL
    np.bytes_(b"b"),
    np.bytes_(b"b\x00"),
    np.datetime64("2026-01-01"),
    np.arange(6, dtype=np.int16).reshape(2, 3)[:, ::2],
    np.zeros((), dtype="<f8"),
    np.array(["a", "bc"]),
    np.array([1, 2], dtype=object),
    Packet({"k": Colour.RED}),
    Packet(np.arange(3)),
    EndOfStream("src"),
    msgpack.ExtType(42, b"x"),
]


@pytest.mark.parametrize("value", UNUSUAL, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_unusual_values_come_out_as_msgpack_python_makes_them(
    value: Any, allow_pickle: bool
) -> None:
    for batch in ([value], [{"a": 1}, value, "after"], [{"inner": [value]}]):
        fast, slow = _encode_both(batch, allow_pickle=allow_pickle)
        assert fast[0] == slow[0]
        assert fast[2] == slow[2]  # the same records refused, with the same words
        assert len(fast[1]) == len(slow[1])


UNPICKLED: list[str] = []


def _note_unpickled(what: str) -> str:
    UNPICKLED.append(what)
    return what


class Counted:
    def __reduce__(self) -> Any:
        return (_note_unpickled, ("unpickled",))


@pytest.mark.parametrize("then", [{"a": 2}, {1: 2}])  # the rest fast or declined
def test_pickle_frames_are_unpickled_once(then: Any) -> None:
    UNPICKLED.clear()
    frame, _, _ = Codec(allow_pickle=True).encode_batch("p", 0, [{"a": 1}, Counted(), then])
    assert Codec(allow_pickle=True).decode(frame).fields[2] == [{"a": 1}, "unpickled", then]
    assert UNPICKLED == ["unpickled"]


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb(["p", 1, [1]]) + b"\x01",  # trailing byte
        msgpack.packb(["p", 1, [1]]) + b"\xc0",
        msgpack.packb(["p", 1, [1]]) + b"\xd7\x55" + b"\x00" * 8,  # a marker, wrong nonce
        msgpack.packb(["p", 1, [1]]) + b"\xd9",  # a str header eating into the marker
        msgpack.packb(["p", 1, [Packet(1)]], default=lambda p: msgpack.ExtType(1, b"")),
        b"",
        b"\x93\xa1p\x01",  # truncated
        b"\x93\xa1p\x01\x91\xa1\xff",  # invalid UTF-8
        b"\x93\xa1p\x01\xdd\xff\xff\xff\xff",  # an array claiming 4 G items
        b"\x93\xa1p\x01\x91\xdf\xff\xff\xff\xff",  # a map claiming 4 G pairs
        b"\x93\xa1p\x01\x91" + b"\x91" * 3000 + b"\xc0",  # deeper than either decoder goes
        b"\x93\xa1p\x01\x91\xd6\xff\x00\x00\x00\x01",  # the timestamp extension
        b"\x93\xa1p\x01\x91\xd4\x7f\x00",  # pickle while pickle is off
    ],
)
def test_malformed_and_edge_bodies_decode_as_msgpack_python_decodes_them(body: bytes) -> None:
    fast, slow = _decode_both(header(Kind.DATA) + body)
    assert fast == slow


def test_a_packet_extension_with_trailing_bytes_is_refused() -> None:
    inner = msgpack.packb([1, 0, None, None, None, 0.0]) + b"\x00"
    body = msgpack.packb(["p", 1, [msgpack.ExtType(1, inner)]])
    fast, slow = _decode_both(header(Kind.DATA) + body)
    assert fast == slow and fast[0] == "error"


def test_the_fast_path_is_taken_for_plain_records(monkeypatch: pytest.MonkeyPatch) -> None:
    used = collections.Counter[str]()
    pack, unpack = _fast.pack, _fast.unpack

    def counting_pack(value: Any, default: Any) -> bytes:
        used["pack"] += 1
        return pack(value, default)

    def counting_unpack(data: Any, hook: Any) -> Any:
        used["unpack"] += 1
        return unpack(data, hook)

    monkeypatch.setattr(_fast, "pack", counting_pack)
    monkeypatch.setattr(_fast, "unpack", counting_unpack)
    codec = Codec()
    records = [{"id": i, "tags": ["a", "b"], "v": 0.5} for i in range(100)]
    frame, sent, errors = codec.encode_batch("p", 0, records)
    assert codec.decode(frame).fields[2] == records and not errors and len(sent) == 100
    assert used == {"pack": 1, "unpack": 1}


def test_after_a_declined_frame_the_codec_pauses_the_fast_path() -> None:
    codec = Codec()
    int_keys = [{1: "a"}]
    for _ in range(3):
        frame, _, _ = codec.encode_batch("p", 0, int_keys)
        assert codec.decode(frame).fields[2] == int_keys
    assert 0 < codec._slow_encodes < _fast.PAUSE and 0 < codec._slow_decodes < _fast.PAUSE
    for _ in range(_fast.PAUSE):
        codec.encode_batch("p", 0, [{"a": 1}])
    assert codec._slow_encodes == 0


def test_large_bodies_skip_the_fast_path() -> None:
    big = b"x" * (_fast.MAX_BODY + 1)
    fast, slow = _decode_both(header(Kind.DATA) + msgpack.packb(["p", 1, [big]]))
    assert fast == slow and fast[0] == "ok"


def test_a_failing_shared_memory_ref_is_looked_up_once() -> None:
    calls: list[bytes] = []

    def decoder(data: bytes) -> Any:
        calls.append(data)
        raise ValueError("the slot is gone")

    frame = header(Kind.DATA) + msgpack.packb(["p", 1, [msgpack.ExtType(4, b"ref"), {1: 2}]])
    with pytest.raises(DecodeError, match="the slot is gone"):
        Codec(shm_decoder=decoder).decode(frame)
    assert calls == [b"ref"]  # the fast pass and the msgpack-python pass share its outcome


def test_deep_values_do_not_overflow_a_small_thread_stack() -> None:
    # ormsgpack recurses in C: a 128 KiB thread stack overflowed (SIGSEGV) decoding a frame
    # 250 levels deep, which a peer may send. (msgpack-python decodes without recursing, and
    # its packer recurses too: the record packed here stays shallow enough for it.)
    script = textwrap.dedent(
        """
        import threading
        from sage_zmq.wire.codec import Codec
        from sage_zmq.wire.frame import Kind, header
        deep = header(Kind.DATA) + b"\\x93\\xa1p\\x01\\x91" + b"\\x91" * 1000 + b"\\xc0"
        record = None
        for _ in range(240):
            record = [record]
        threading.stack_size(128 * 1024)
        out = []
        def work():
            codec = Codec()
            out.append(codec.decode(deep).kind.name)
            frame, sent, errors = codec.encode_batch("p", 0, [record])
            out.append((len(frame), len(sent), errors))
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        print(out)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr.decode()[-2000:])
    assert done.stdout.decode().strip() == "['DATA', (254, 1, [])]"
