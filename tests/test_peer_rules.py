"""What a consumer does with frames that are well-formed but break the stream's rules
(PROTOCOL.md §3, §9): a raw DEALER plays a foreign producer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from sage_zmq import Empty, EndOfStream, QueueDescriptor
from sage_zmq.testing import close_quietly
from sage_zmq.wire.codec import Codec
from sage_zmq.wire.frame import Kind, header

pytestmark = pytest.mark.timeout(60)

_CODEC = Codec()


class RawProducer:
    def __init__(self, endpoint: str, producer: str, next_seq: int = 0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.producer = producer
        hello = {"producer": producer, "epoch": 0, "next_seq": next_seq}
        self.sock.send(_CODEC.encode_control(Kind.HELLO, hello))

    def data(self, seq: int, records: list[Any]) -> None:
        self.sock.send(header(Kind.DATA) + msgpack.packb([self.producer, seq, records]))

    def end(self, seq: int) -> None:
        self.sock.send(_CODEC.encode_control(Kind.END, [self.producer, seq]))

    def replies(self, timeout_ms: int = 3000) -> Iterator[tuple[Kind, Any]]:
        """Frames from the consumer until ``timeout_ms`` passes without one."""
        while self.sock.poll(timeout_ms):
            msg = _CODEC.decode(self.sock.recv())
            yield msg.kind, msg.fields

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def consumer() -> Iterator[QueueDescriptor]:
    qd = QueueDescriptor(queue_type="tcp", metadata={"maxsize": 100, "upstreams": 2})
    yield qd
    close_quietly(qd)


def _until_end(qd: QueueDescriptor) -> list[Any]:
    got = []
    while True:
        item = qd.get(timeout=10)
        got.append(item)
        if isinstance(item, EndOfStream):
            return got


def test_records_after_the_last_end_are_not_delivered_after_end_of_stream(
    consumer: QueueDescriptor, caplog: pytest.LogCaptureFixture
) -> None:
    """One producer sent two ENDs (each END counts as an upstream): once get() said the stream
    ended it keeps saying so, and what another producer sends later is named, not delivered."""
    a = RawProducer(consumer.endpoint, "a")
    b = RawProducer(consumer.endpoint, "b")
    try:
        a.data(0, ["a0"])
        a.end(1)
        a.end(2)
        assert _until_end(consumer) == ["a0", EndOfStream()]
        with caplog.at_level(logging.WARNING, logger="sage_zmq.queue"):
            b.data(0, ["b0", "b1"])
            for kind, fields in b.replies():  # the consumer acknowledges them all the same
                if kind is Kind.CREDIT and fields["acked"] == 2:
                    break
            else:
                pytest.fail("records after the end were never acknowledged")
        assert consumer.get(timeout=0) == EndOfStream()  # a file at EOF
        assert consumer.statistics().extra["after_end"] == 2
        assert "sent records after the end of the stream" in caplog.text
    finally:
        a.close()
        b.close()


def test_the_end_warns_when_a_producer_that_sent_records_has_not_ended(
    consumer: QueueDescriptor, caplog: pytest.LogCaptureFixture
) -> None:
    a = RawProducer(consumer.endpoint, "a")
    b = RawProducer(consumer.endpoint, "b")
    try:
        b.data(0, ["b0"])
        assert consumer.get(timeout=10) == "b0"
        with caplog.at_level(logging.WARNING, logger="sage_zmq.queue"):
            a.end(0)
            a.end(1)
            assert consumer.get(timeout=10) == EndOfStream()
        assert "producer(s) b sent records and no END" in caplog.text
        assert "a (2)" in caplog.text
    finally:
        a.close()
        b.close()


def test_an_end_of_stream_record_is_refused_not_taken_for_the_end(
    consumer: QueueDescriptor,
) -> None:
    a = RawProducer(consumer.endpoint, "a")
    try:
        a.data(0, ["a0"])
        assert consumer.get(timeout=10) == "a0"
        # As a record, an EndOfStream would come out of get() like the real end.
        a.sock.send(_CODEC.encode_batch("a", 1, [EndOfStream(), "x"])[0])
        a.data(1, [["nested is data", 1]])
        errors = [f["message"] for k, f in a.replies(1000) if k is Kind.ERROR]
        assert any("EndOfStream" in message for message in errors), errors
        assert consumer.get(timeout=10) == ["nested is data", 1]
        assert consumer.statistics().rejected >= 1
    finally:
        a.close()


def test_credit_limits_stay_below_2_63(consumer: QueueDescriptor) -> None:
    a = RawProducer(consumer.endpoint, "a", next_seq=2**63 - 3)
    try:
        with pytest.raises(Empty):  # the consumer's end opens at its first get
            consumer.get(timeout=0.1)
        credits = [f for k, f in a.replies(1000) if k is Kind.CREDIT]
        assert credits and all(c["limit"] <= 2**63 - 1 for c in credits)
        a.data(2**63 - 3, ["x", "y"])  # the seq after them is 2^63 - 1: still a seq
        assert consumer.get(timeout=10) == "x"
        a.data(2**63 - 1, ["z"])  # the seq after it would be 2^63
        errors = [f["message"] for k, f in a.replies(1000) if k is Kind.ERROR]
        assert any("2^63" in message for message in errors), errors
        credits = [f for k, f in a.replies(1000) if k is Kind.CREDIT]
        assert all(c["received"] < 2**63 and c["limit"] < 2**63 for c in credits)
    finally:
        a.close()


def _close(producer: RawProducer, seq: int) -> None:
    producer.sock.send(_CODEC.encode_control(Kind.CLOSE, [producer.producer, seq]))


@pytest.mark.parametrize("lost_before", ["data", "end", "close"])
def test_seqs_skipped_for_good_are_counted_and_reported_to_the_producer(
    consumer: QueueDescriptor, lost_before: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame that never arrives (refused, or dropped by ZeroMQ over MAXMSGSIZE) shows as a
    gap before the next frame, be it DATA, END or CLOSE; the receipt says how many were lost
    (CREDIT ``lost``), or a producer's close() would call them delivered."""
    a = RawProducer(consumer.endpoint, "a")
    try:
        with pytest.raises(Empty):  # the consumer's end opens at its first get
            consumer.get(timeout=0.1)
        a.data(0, ["a0", "a1"])
        # seqs 2..4 never arrive
        with caplog.at_level(logging.WARNING, logger="sage_zmq.queue"):
            if lost_before == "data":
                a.data(5, ["a5"])
                a.end(6)
                _close(a, 7)
                expected = ["a0", "a1", "a5"]
            elif lost_before == "end":
                a.end(5)
                _close(a, 6)
                expected = ["a0", "a1"]
            else:
                _close(a, 5)
                expected = ["a0", "a1"]
            got = [consumer.get(timeout=10) for _ in expected]
            assert got == expected
            receipts = [f for k, f in a.replies(1000) if k is Kind.CREDIT]
        assert receipts[-1]["lost"] == 3, receipts
        assert receipts[-1]["received"] == {"data": 7, "end": 6, "close": 5}[lost_before]
        assert "skipped seq 2..4 (records lost in transit)" in caplog.text
        assert consumer.statistics().extra["gaps"] == 3  # type: ignore[index]
    finally:
        a.close()
