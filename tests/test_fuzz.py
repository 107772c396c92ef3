"""A consumer under fire: >= 100k hostile frames from raw pyzmq DEALERs, interleaved with a real
producer's traffic. The consumer must not crash or hang, must deliver every valid record, and
must count every hostile frame in ``statistics().rejected`` (issue 8; PROTOCOL.md §2, §10)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import lz4.frame
import msgpack
import pytest
import zmq

from sage_zmq import Empty, QueueDescriptor
from sage_zmq.errors import DecodeError
from sage_zmq.testing import close_quietly
from sage_zmq.wire.codec import Codec, DecodeLimits
from sage_zmq.wire.frame import Kind, header

HOSTILE_A = 90_000  # frames from peer A, which also owns producer id "fuzz-a"
HOSTILE_B = 10_000  # frames from peer B, which impersonates "fuzz-a" and the real producer
VALID = 20_000  # records from the real producer
OWN_EVERY = 100  # A sends one valid record of its own per this many hostile frames
MAX_MESSAGE = 1 << 20
BURST = 500
DEADLINE = 60.0

_CODEC = Codec()
_PACK = msgpack.Packer(use_bin_type=True)
_HUGE = [
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array32 of 4G items
    b"\xdf\xff\xff\xff\xff",  # map32 of 4G pairs
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
]


def _nested_ext(depth: int, code: int) -> Any:
    value: Any = None
    for _ in range(depth):
        inner = [value, 0, None, None, None, 0.0] if code == 1 else [value]
        value = msgpack.ExtType(code, msgpack.packb(inner))
    return value


def _data(producer: Any, seq: Any, records: Any) -> bytes:
    return header(Kind.DATA) + _PACK.pack([producer, seq, records])


class Arsenal:
    """Pools of hostile frames, each checked to be rejected by the wire decoder itself, plus
    frames that decode fine but name a producer the sender does not own."""

    def __init__(self, rng: random.Random, queue_id: str, victims: list[str]) -> None:
        self.rng = rng
        checker = Codec(limits=DecodeLimits(MAX_MESSAGE, MAX_MESSAGE))
        self.undecodable: list[tuple[str, bytes]] = []
        for category, make, count in self._recipes(queue_id):
            for _ in range(count):
                frame = make()
                try:
                    checker.decode(frame)
                except DecodeError:
                    self.undecodable.append((category, frame))
        self.categories = {c for c, _ in self.undecodable}
        self.impersonating = [f for v in victims for f in self._impersonate(v)]
        self.multipart = [[_data("fuzz-a", 0, [1]), b"extra"], [b"", b"", b""]]

    def _recipes(self, queue_id: str) -> list[tuple[str, Callable[[], bytes], int]]:
        rng = self.rng
        good = _data("p", 0, [{"k": [1, 2.5, "x"]}, b"bytes", None])

        def random_bytes() -> bytes:
            data = bytearray(rng.randbytes(rng.randrange(0, 200)))
            if data[:1] == b"S":
                data[0] = 0
            return bytes(data)

        def truncated() -> bytes:
            frame = _data("p", rng.randrange(2**40), [rng.randbytes(20), {"a": [1, 2]}])
            return frame[: rng.randrange(8, len(frame))]

        def with_header_byte(index: int, values: list[int]) -> Callable[[], bytes]:
            def make() -> bytes:
                frame = bytearray(good)
                frame[index] = rng.choice(values)
                return bytes(frame)

            return make

        def garbage_body() -> bytes:
            kind = rng.choice([Kind.DATA, Kind.HELLO, Kind.END, Kind.CLOSE, Kind.HEARTBEAT])
            return header(kind, rng.choice([0, 1])) + rng.randbytes(rng.randrange(1, 64))

        def huge_length() -> bytes:
            prefix = rng.choice([b"\x93\xa1p\x00\x91", b"\x93\xa1p\x00", b"\x93"])
            return header(Kind.DATA) + prefix + rng.choice(_HUGE) + rng.randbytes(4)

        def deep_arrays() -> bytes:
            depth = rng.choice([1100, 5000, 20000])
            return header(Kind.DATA) + b"\x93\xa1p\x00\x91" + b"\x91" * depth + b"\xc0"

        def deep_ext() -> bytes:
            return _data("p", 0, [_nested_ext(rng.choice([17, 64, 300]), rng.choice([1, 3]))])

        def unknown_ext() -> bytes:
            code = rng.choice([4, 5, 9, 42, 100, 126, 127])  # 4: no shm here; 127: pickle off
            return _data("p", 0, [msgpack.ExtType(code, rng.randbytes(rng.randrange(0, 16)))])

        def bad_ext_body() -> bytes:
            code = rng.choice([1, 2, 3])
            return _data("p", 0, [msgpack.ExtType(code, rng.randbytes(rng.randrange(0, 24)))])

        def bad_fields() -> bytes:
            return rng.choice(
                [
                    _data("p", -1, [1]),
                    _data("p", 2**63, [1]),
                    _data("p", 2**64 - 1, [1]),
                    _data("p", True, [1]),
                    _data("p", 1.5, [1]),
                    _data("", 0, [1]),
                    _data("x" * 129, 0, [1]),
                    _data(7, 0, [1]),
                    _data("p", 0, "not a list"),
                    header(Kind.DATA) + _PACK.pack(["p", 0]),
                    header(Kind.END) + _PACK.pack(["p"]),
                    header(Kind.HELLO) + _PACK.pack({"producer": "p", "epoch": 0}),
                    header(Kind.HELLO) + _PACK.pack({"producer": "p", "epoch": -1, "next_seq": 0}),
                    header(Kind.HELLO) + _PACK.pack(["p", 0, 0]),
                    header(Kind.HEARTBEAT) + _PACK.pack([None]),
                ]
            )

        def flagged() -> bytes:
            body = _PACK.pack(["p", 0, [1]])
            return rng.choice(
                [
                    header(Kind.DATA, 0x02) + body,  # pickle flag: pickle is off
                    header(Kind.DATA, 0x01) + body,  # LZ4 flag on a plain body
                    header(Kind.DATA, 0x01) + lz4.frame.compress(body)[:-3],  # truncated LZ4
                    header(Kind.DATA, 0x01)
                    + lz4.frame.compress(_PACK.pack(["p", 0, [b"\0" * (2 * MAX_MESSAGE)]])),
                ]
            )

        return [
            ("random bytes", random_bytes, 400),
            ("truncated msgpack", truncated, 400),
            ("wrong version", with_header_byte(2, [0, 2, 3, 255]), 50),
            ("wrong magic", with_header_byte(0, [0, 0x73, 0xFF]), 50),
            ("unknown kind", with_header_byte(3, [0, 9, 10, 127, 255]), 50),
            ("unknown flags", with_header_byte(4, [0x04, 0x80, 0xFF]), 50),
            ("reserved bytes", with_header_byte(5 + rng.randrange(3), [1, 0x80]), 50),
            ("valid header, garbage body", garbage_body, 400),
            ("huge declared length", huge_length, 100),
            ("deep array nesting", deep_arrays, 6),
            ("deep extension nesting", deep_ext, 12),
            ("unknown extension type", unknown_ext, 100),
            ("malformed extension body", bad_ext_body, 200),
            ("out-of-range fields", bad_fields, 100),
            ("bad flags or lz4", flagged, 20),
            ("consumer-only kinds", self._consumer_kinds, 30),
            ("hello for another queue", lambda: self._hello("p", queue=queue_id + "-other"), 5),
            ("hello acked > next_seq", lambda: self._hello("p", acked=5, next_seq=1), 5),
        ]

    def _consumer_kinds(self) -> bytes:
        rng = self.rng
        return rng.choice(
            [
                _CODEC.encode_control(
                    Kind.CREDIT, {"session": "s", "received": 0, "acked": 0, "limit": 2**62}
                ),
                _CODEC.encode_control(Kind.RELEASE, ["p", [rng.randrange(100)]]),
                _CODEC.encode_control(Kind.ERROR, {"code": "x", "message": "y"}),
            ]
        )

    @staticmethod
    def _hello(producer: str, **fields: Any) -> bytes:
        body = {"producer": producer, "epoch": 0, "next_seq": 0, **fields}
        return _CODEC.encode_control(Kind.HELLO, body)

    def _impersonate(self, victim: str) -> list[bytes]:
        """Well-formed frames for a producer id the sender does not own ("wrong seqs")."""
        frames = [_data(victim, seq, ["forged"]) for seq in (0, 1, 2, 10**6, 2**62, 2**63 - 1)]
        frames += [_CODEC.encode_control(Kind.END, [victim, s]) for s in (0, 5, 2**62)]
        frames += [_CODEC.encode_control(Kind.CLOSE, [victim, s]) for s in (0, 2**62)]
        frames += [
            _CODEC.encode_control(Kind.HEARTBEAT, [victim]),
            self._hello(victim, next_seq=2**62, acked=2**62, epoch=99),
        ]
        return frames

    def pick(self) -> bytes:
        if self.rng.random() < 0.1:
            return self.rng.choice(self.impersonating)
        return self.rng.choice(self.undecodable)[1]


class RawPeer(threading.Thread):
    """Sends hostile frames in bursts, with valid records of its own in between."""

    def __init__(self, endpoint: str, name: str, n: int, arsenal: Arsenal, own: str | None) -> None:
        super().__init__(name=f"fuzz-{name}", daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.n, self.arsenal, self.own = n, arsenal, own
        self.sentinel = f"{name}-done"
        self.hostile = 0
        self.own_records: list[Any] = []
        self.replies = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        own, seq = self.own, 0
        if own is not None:
            self.sock.send(
                _CODEC.encode_control(Kind.HELLO, {"producer": own, "epoch": 0, "next_seq": 0})
            )
        sent = 0
        while sent < self.n:
            for _ in range(min(BURST, self.n - sent)):
                if sent % 997 == 0:
                    self.sock.send_multipart(self.arsenal.rng.choice(self.arsenal.multipart))
                else:
                    self.sock.send(self.arsenal.pick())
                sent += 1
                if own is not None and sent % OWN_EVERY == 0:
                    record = [own, seq]
                    self.sock.send(_data(own, seq, [record]))
                    self.own_records.append(record)
                    if seq and sent % (OWN_EVERY * 7) == 0:
                        self.sock.send(_data(own, seq - 1, [[own, seq - 1]]))  # a duplicate
                    seq += 1
            while self.sock.poll(0):
                self.sock.recv()
                self.replies += 1
        self.hostile = sent
        if own is not None:
            self.sock.send(_data(own, seq, [self.sentinel]))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture(params=["tcp", "sage"])
def target(request: pytest.FixtureRequest) -> Iterator[QueueDescriptor]:
    meta: dict[str, Any] = {"maxsize": 2000, "max_message_size": MAX_MESSAGE}
    if request.param == "sage":
        meta["transport"] = "tcp"
    qd = QueueDescriptor(None, request.param, meta)
    yield qd
    close_quietly(qd, timeout=2)


def test_consumer_survives_hostile_frames_and_delivers_every_valid_record(
    target: QueueDescriptor,
) -> None:
    qd = target
    qd.put(("legit", -1))
    assert qd.get(timeout=10) == ["legit", -1]  # the real producer now owns its id
    victim = qd._handle()._producer.producer_id

    rng = random.Random(8)
    started = time.monotonic()
    a = RawPeer(str(qd.endpoint), "a", HOSTILE_A, Arsenal(rng, qd.queue_id, [victim]), "fuzz-a")
    b_arsenal = Arsenal(random.Random(9), qd.queue_id, [victim, "fuzz-a"])
    b = RawPeer(str(qd.endpoint), "b", HOSTILE_B, b_arsenal, "fuzz-b")
    assert len(a.arsenal.categories) >= 15, a.arsenal.categories

    def produce() -> None:
        for i in range(VALID):
            qd.put(("legit", i), timeout=DEADLINE)
        qd.flush(timeout=DEADLINE)

    producer = threading.Thread(target=produce, name="fuzz-producer", daemon=True)
    legit: list[Any] = []
    own: dict[str, list[Any]] = {"fuzz-a": [], "fuzz-b": []}
    done: set[str] = set()
    try:
        producer.start()
        a.start()
        b.start()
        while len(legit) < VALID or len(done) < 2:
            assert time.monotonic() - started < DEADLINE, (
                f"hung: {len(legit)} legit records, sentinels {done}, {qd.statistics()}"
            )
            try:
                record = qd.get(timeout=10)
            except Empty:
                raise AssertionError(
                    f"stalled after {len(legit)} legit records; {qd.statistics()}"
                ) from None
            if isinstance(record, str):
                done.add(record)
            elif record[0] == "legit":
                legit.append(record[1])
            else:
                own[record[0]].append(record)
        for thread in (producer, a, b):
            thread.join(DEADLINE)
            assert not thread.is_alive(), f"{thread.name} did not finish"
        for peer in (a, b):
            assert peer.error is None, f"{peer.name}: {peer.error!r}"

        assert legit == list(range(VALID)), "valid records lost, reordered or duplicated"
        assert own["fuzz-a"] == a.own_records  # a peer's own valid records still count
        assert done == {"a-done", "b-done"}
        stats = qd.statistics()
        hostile = a.hostile + b.hostile
        assert hostile >= 100_000
        assert stats.rejected == hostile, (
            f"{hostile} hostile frames sent, {stats.rejected} counted as rejected"
        )
        assert stats.upstreams_ended == 0, "a forged END ended a stream"
        assert a.replies > 0  # rejected frames are answered with ERROR
        with pytest.raises(Empty):
            qd.get(timeout=0.05)
    finally:
        for peer in (a, b):
            peer.join(5)
            peer.close()
        producer.join(5)
