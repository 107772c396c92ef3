"""Records that cannot travel (unencodable, over ``max_message_size``): reported to the
producer that put them, never lost silently, and the records around them still arrive."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest

from sage_zmq import EncodeError, EndOfStream, QueueDescriptor
from sage_zmq import testing as conf

LIMIT = 100_000


@pytest.mark.parametrize("queue_type", ["tcp", "shm", "sage"])
def test_a_record_over_the_limit_is_refused_at_put_and_the_rest_arrive(queue_type: str) -> None:
    # The consumer refuses a frame over the limit; the producer used to send it anyway and
    # the records after it waited on a gap ("skipped seq"), while put and close said nothing.
    qd = QueueDescriptor(None, queue_type, {"maxsize": 5000, "max_message_size": LIMIT})
    with contextlib.suppress(Exception):
        qd.get_nowait()  # bind
    big: list[Any] = ["x" * (5 * LIMIT), list(range(LIMIT))]
    try:
        qd.put("before", timeout=conf.GET_TIMEOUT)
        for record in big:
            with pytest.raises(EncodeError, match=r"more than max_message_size \(100000\)"):
                qd.put(record, timeout=conf.GET_TIMEOUT)
        # Many small records whose batch would exceed the limit go in several frames.
        small = [f"{i:0200d}" for i in range(2000)]  # ~420 KB in all
        for record in small:
            qd.put(record, timeout=conf.GET_TIMEOUT)
        qd.put(EndOfStream(), timeout=conf.GET_TIMEOUT)
        got = list(qd)
        assert got == ["before", *small]
    finally:
        qd.close()


def test_several_dropped_records_are_each_named() -> None:
    import decimal

    qd = QueueDescriptor(None, "tcp", {"maxsize": 100, "batch_size": 100, "flush_interval": 5})
    qd.qsize()
    try:
        producer = qd._handle().producer(qd)
        # A burst: the producer batches, so the bad records are found at one flush.
        producer._busy, producer._flush_at = True, 100
        # A record of a class msgpack cannot carry is refused at its own put, even here.
        with pytest.raises(EncodeError, match=r"record refused: .*builtins\.set") as refused:
            qd.put({1, 2}, timeout=conf.GET_TIMEOUT)
        assert refused.value.accepted is False
        # What is inside a record is checked when its batch is encoded.
        for record in (1, {"v": {1, 2}}, 2, {"v": decimal.Decimal(1)}, 3, [1j]):
            qd.put(record, timeout=conf.GET_TIMEOUT)
        with pytest.raises(EncodeError) as caught:
            qd.put(EndOfStream(), timeout=conf.GET_TIMEOUT)
        message = str(caught.value)
        for name in ("builtins.set", "decimal.Decimal", "builtins.complex"):
            assert name in message, message
        assert "end of stream itself was sent" in message
        assert list(qd) == [1, 2, 3]
    finally:
        qd.close()


def test_records_of_plain_types_are_not_encoded_at_put(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only unusual classes pay an encode at put; a large bytearray or memoryview must not.
    from sage_zmq import Packet

    qd = QueueDescriptor(None, "shm", {"maxsize": 100, "flush_interval": 5})
    qd.qsize()
    try:
        producer = qd._handle().producer(qd)
        looked_at: list[type] = []
        monkeypatch.setattr(producer._link.codec, "refusal", lambda r: looked_at.append(type(r)))
        producer._busy, producer._flush_at = True, 100  # a burst, as in the test above
        plain = [b"x", bytearray(b"y" * 100_000), memoryview(b"z"), {"a": 1}, [1], 1.5, None]
        for record in [*plain, Packet(1), True, "s", (1, 2)]:
            qd.put(record, timeout=conf.GET_TIMEOUT)
        assert looked_at == []
        qd.put(EndOfStream(), timeout=conf.GET_TIMEOUT)
        assert len(list(qd)) == 11
    finally:
        qd.close()


@pytest.mark.parametrize("queue_type", ["tcp", "shm", "sage"])
def test_a_compressible_batch_over_the_limit_is_split_not_refused(queue_type: str) -> None:
    # Compressed, a batch holding a record over the limit came out as a small frame; the
    # consumer, which bounds the inflated body by the same limit, refused the whole batch: on
    # tcp the records were lost while close() returned, on sage resent forever.
    meta = {"maxsize": 5000, "max_message_size": LIMIT, "compression": True, "flush_interval": 5}
    qd = QueueDescriptor(None, queue_type, meta)
    with contextlib.suppress(Exception):
        qd.get_nowait()  # bind
    try:
        producer = qd._handle().producer(qd)
        producer._busy, producer._flush_at = True, 100  # one batch for all of them
        small = [f"{i:050d}" for i in range(99)]
        for record in small[:50]:
            qd.put(record, timeout=conf.GET_TIMEOUT)
        qd.put("x" * (3 * LIMIT), timeout=conf.GET_TIMEOUT)  # lz4 makes it ~1 KB
        errors = []
        for record in [*small[50:], EndOfStream()]:
            try:
                qd.put(record, timeout=conf.GET_TIMEOUT)
            except EncodeError as exc:  # a later put reports it; its own record went in
                assert exc.accepted
                errors.append(str(exc))
        assert len(errors) == 1 and "more than max_message_size (100000)" in errors[0]
        got = list(qd)
        assert got == small
        assert (qd.statistics().extra or {}).get("gaps", 0) == 0
        qd.close()  # every record it did not refuse was delivered
    finally:
        qd.close()


@pytest.mark.parametrize("queue_type", ["tcp", "sage"])
@pytest.mark.parametrize(
    ("bad", "why"),
    [({"v": {1}}, r"builtins\.set"), (b"x" * (2 * LIMIT), r"more than max_message_size")],
    ids=["unencodable", "too-large"],
)
def test_accepted_says_whether_the_call_s_own_record_went_in(
    queue_type: str, bad: Any, why: str
) -> None:
    # A late EncodeError comes from the put whose flush encoded the batch; accepted was True
    # even when that put's own record was the bad one (README: re-put only when not accepted).
    meta = {"maxsize": 100, "flush_interval": 5, "max_message_size": LIMIT}
    qd = QueueDescriptor(None, queue_type, meta)
    with contextlib.suppress(Exception):
        qd.get_nowait()  # bind
    try:
        producer = qd._handle().producer(qd)
        producer._busy, producer._flush_at = True, 3
        qd.put("a", timeout=conf.GET_TIMEOUT)
        qd.put("b", timeout=conf.GET_TIMEOUT)
        with pytest.raises(EncodeError, match=why) as own:
            qd.put(bad, timeout=conf.GET_TIMEOUT)  # fills the batch, and is the bad one
        assert own.value.accepted is False
        producer._busy, producer._flush_at = True, 3
        qd.put(bad, timeout=conf.GET_TIMEOUT)
        qd.put("c", timeout=conf.GET_TIMEOUT)
        with pytest.raises(EncodeError, match=why) as earlier:
            qd.put("d", timeout=conf.GET_TIMEOUT)  # fills the batch; an earlier one was bad
        assert earlier.value.accepted is True
        assert earlier.value.records_dropped == 1
        qd.put(EndOfStream(), timeout=conf.GET_TIMEOUT)
        assert list(qd) == ["a", "b", "c", "d"]
    finally:
        qd.close()


@pytest.mark.parametrize("queue_type", ["tcp", "shm"])
def test_a_flush_whose_records_were_all_refused_does_not_start_batching(queue_type: str) -> None:
    # A put right after the previous flush takes the batching path. When its record was
    # refused, that flush (0 bytes sent) read as "busy, with tiny records": the producer
    # switched to batches of batch_size, and the next oversize record waited in one instead
    # of being refused at its put (seen once in a full run).
    qd = QueueDescriptor(None, queue_type, {"maxsize": 5000, "max_message_size": LIMIT})
    qd.qsize()  # the consumer is here
    try:
        qd.put("before", timeout=conf.GET_TIMEOUT)
        producer = qd._handle().producer(qd)
        for record in ["x" * (5 * LIMIT), list(range(LIMIT))]:
            producer._last_flush = time.perf_counter()  # the caller came straight back
            with pytest.raises(EncodeError, match=r"more than max_message_size \(100000\)"):
                qd.put(record, timeout=conf.GET_TIMEOUT)
        assert not producer._busy and producer._flush_at == 1
        qd.put(EndOfStream(), timeout=conf.GET_TIMEOUT)
        assert list(qd) == ["before"]
    finally:
        qd.close()
