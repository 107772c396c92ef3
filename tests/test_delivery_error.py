"""What a producer's close() says when the consumer did not confirm everything."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from sage_zmq import DeliveryError, EndOfStream, Full, QueueDescriptor
from sage_zmq.wire.codec import Codec
from sage_zmq.wire.frame import Kind, parse_header

pytestmark = pytest.mark.timeout(60)


CODEC = Codec()
Answer = Callable[[Kind, bytes, list[Any]], "dict[str, Any] | None"]


def _close_against_raw_consumer(
    queue_type: str, puts: list[Any], answer: Answer, timeout: float
) -> tuple[BaseException | None, list[Any]]:
    """Put ``puts``, then close() while a raw ROUTER plays the consumer: ``answer(kind, frame,
    records so far)`` gives the CREDIT body to send back (None: no reply). Returns what close()
    raised and the records the raw consumer received."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.linger = 0
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        qd = QueueDescriptor(
            queue_type=queue_type, metadata={"endpoint": f"tcp://127.0.0.1:{port}", "maxsize": 100}
        )
        for item in puts:
            qd.put(item)
        outcome: list[BaseException | None] = []

        def close() -> None:
            try:
                qd.close(timeout=timeout)
                outcome.append(None)
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)

        closer = threading.Thread(target=close)
        closer.start()
        records: list[Any] = []
        try:
            while closer.is_alive():
                if not sock.poll(100):
                    continue
                peer, frame = sock.recv_multipart()
                kind = parse_header(frame)[0]
                if kind is Kind.DATA:
                    records += CODEC.decode(frame).fields[2]
                body = answer(kind, frame, records)
                if body is not None:
                    sock.send_multipart([peer, CODEC.encode_control(Kind.CREDIT, body)])
        finally:
            closer.join(timeout + 10)
    return outcome[0], records


@pytest.mark.parametrize("queue_type", ["tcp", "sage"])
def test_an_unconfirmed_end_is_not_called_a_record(queue_type: str) -> None:
    # A consumer confirms the 5 records but never the END after them: close() must not say
    # "1 records put were not confirmed" when every record was (PROTOCOL §4: the END counts).
    def confirm_records(kind: Kind, frame: bytes, records: list[Any]) -> dict[str, Any] | None:
        if kind not in (Kind.HELLO, Kind.DATA, Kind.CLOSE):
            return None
        n = len(records)
        return {"session": "raw", "received": n, "acked": n, "limit": 1000}

    raised, records = _close_against_raw_consumer(
        queue_type, [0, 1, 2, 3, 4, EndOfStream()], confirm_records, 1.5
    )
    outcome = [raised]
    assert records[:5] == [0, 1, 2, 3, 4]
    assert isinstance(outcome[0], DeliveryError), outcome
    message = str(outcome[0])
    assert "the end of stream was not confirmed" in message, message
    assert "records put" not in message, message
    assert outcome[0].undelivered == 1  # the END counts as one (PROTOCOL §4)


def test_records_received_but_not_consumed_are_named_too() -> None:
    # A consumer that went silent had confirmed receiving 150 of 202 records and consuming 50:
    # besides the 52 unconfirmed, close() names the 100 it held (lost with it if it is gone).
    codec = Codec()
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.linger = 0
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        qd = QueueDescriptor(
            queue_type="tcp", metadata={"endpoint": f"tcp://127.0.0.1:{port}", "maxsize": 1000}
        )
        for i in range(202):
            qd.put(i)
        qd.flush()
        assert sock.poll(5000)
        peer, _ = sock.recv_multipart()
        body = {"session": "raw", "received": 150, "acked": 50, "limit": 1000}
        sock.send_multipart([peer, codec.encode_control(Kind.CREDIT, body)])
        with pytest.raises(DeliveryError) as caught:
            qd.close(timeout=1.0)
    message = str(caught.value)
    assert "52 records put were not confirmed" in message, message
    assert "100 more that it confirmed receiving were not yet consumed" in message, message
    assert caught.value.undelivered == 52
    assert caught.value.may_be_lost == 152


def test_a_put_waiting_on_a_consumer_that_never_answered_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A refused CURVE handshake, or a peer that is no consumer, shows a plain producer nothing
    # but silence: while a put waits for credit, the log names the likely causes, once.
    caplog.set_level("WARNING", logger="sage_zmq.connection")
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.linger = 0
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        qd = QueueDescriptor(
            queue_type="tcp", metadata={"endpoint": f"tcp://127.0.0.1:{port}", "maxsize": 2}
        )
        qd.put(0)
        qd.put(1)  # the implicit first grant is used up
        for _ in range(2):
            with pytest.raises(Full):
                qd.put(2, timeout=1.5)  # past the 1 s after which the producer says HELLO again
        with pytest.raises(DeliveryError):
            qd.close(timeout=0.5)
    noted = [r for r in caplog.records if getattr(r, "sage_event", "") == "connect_failed"]
    assert len(noted) == 1, noted
    assert "no consumer has answered yet" in noted[0].getMessage()
    assert "CURVE" in noted[0].getMessage()


def test_records_the_consumer_reports_lost_in_transit_fail_close() -> None:
    # A plain consumer moves past a gap (a frame it refused, or one ZeroMQ dropped) and says
    # so in CREDIT "lost"; close() used to return normally on a receipt covering every seq.
    def receipt_with_loss(kind: Kind, frame: bytes, records: list[Any]) -> dict[str, Any] | None:
        if kind is not Kind.CLOSE:
            return None
        seq = CODEC.decode(frame).fields[1]
        # as if the frame with seqs 1-2 had been refused
        return {"session": "raw", "received": seq, "acked": seq, "limit": 1000, "lost": 2}

    raised, _ = _close_against_raw_consumer("tcp", [0, 1, 2, 3, 4], receipt_with_loss, 10)
    outcome = [raised]
    assert isinstance(outcome[0], DeliveryError), outcome
    assert "2 records put were lost in transit" in str(outcome[0])
    assert outcome[0].undelivered == 2


def test_a_lost_end_and_close_are_sent_again() -> None:
    # A connection that broke took the END and CLOSE with it (a reconnect, a frame over the
    # consumer's MAXMSGSIZE): the consumer never ended the stream and close() waited out its
    # timeout. A plain producer sends both again while it waits for the receipt.
    seen: list[Kind] = []

    def drop_the_first_tail(kind: Kind, frame: bytes, records: list[Any]) -> dict[str, Any] | None:
        seen.append(kind)
        if kind is not Kind.CLOSE or seen.count(Kind.CLOSE) == 1:
            return None  # as if the first END and CLOSE never arrived
        seq = CODEC.decode(frame).fields[1]
        return {"session": "raw", "received": seq, "acked": seq, "limit": 1000}

    raised, records = _close_against_raw_consumer(
        "tcp", [0, 1, EndOfStream()], drop_the_first_tail, 10
    )
    assert raised is None and records == [0, 1]
    assert seen.count(Kind.END) >= 2 and seen.count(Kind.CLOSE) == 2
