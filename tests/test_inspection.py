"""full() in a process with no end of a socket queue opens nothing; qsize/empty open the consumer.

Opening the consumer end binds the endpoint and takes the queue's records: a producer process
that asked ``full()`` before its first put used to become the consumer of its own records, and
the real consumer then got nothing. A consumer, though, may poll ``empty()`` before its first
``get``: that must bind, or its producers would never reach it.
"""

from __future__ import annotations

import socket
from multiprocessing.connection import Connection

import pytest

from sage_zmq import EndOfStream, QueueDescriptor
from sage_zmq.testing import GET_TIMEOUT, spawn_worker, wait_until

pytestmark = pytest.mark.timeout(120)


def _probe_then_produce(conn: Connection, qd: QueueDescriptor) -> None:
    conn.send((qd.full(), qd.full()))
    assert conn.recv() == "go"
    for i in range(5):
        qd.put(i)
    qd.put(EndOfStream())
    qd.close()
    conn.send("closed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("queue_type", ["shm", "tcp", "sage"])
def test_a_producer_that_asks_first_does_not_take_the_queue(queue_type: str) -> None:
    meta = {"maxsize": 100}
    if queue_type != "shm":  # with an explicit endpoint, bound by the first get
        meta["endpoint"] = f"tcp://127.0.0.1:{_free_port()}"
    qd = QueueDescriptor(queue_type=queue_type, metadata=meta)
    try:
        with spawn_worker(_probe_then_produce, qd) as producer:
            assert producer.recv() == (False, False)  # nothing opened: room
            producer.send("go")
            got = [qd.get(timeout=GET_TIMEOUT) for _ in range(6)]
            assert got[:5] == [0, 1, 2, 3, 4] and isinstance(got[5], EndOfStream)
            assert producer.recv() == "closed"
            assert producer.join() == 0
    finally:
        qd.close()


def _produce_three_and_close(conn: Connection, qd: QueueDescriptor) -> None:
    for i in range(3):
        qd.put(i)
    qd.close()
    conn.send("closed")


@pytest.mark.parametrize("queue_type", ["shm", "sage"])
def test_a_consumer_that_polls_empty_before_its_first_get_gets_its_records(
    queue_type: str,
) -> None:
    qd = QueueDescriptor(queue_type=queue_type, metadata={"maxsize": 100})
    try:
        assert qd.empty()  # binds: the producer below finds the consumer
        with spawn_worker(_produce_three_and_close, qd) as producer:
            wait_until(lambda: qd.qsize() == 3, GET_TIMEOUT, "the records to arrive")
            # (A sage producer's close waits for consumption: take them before its answer.)
            assert [qd.get(timeout=GET_TIMEOUT) for _ in range(3)] == [0, 1, 2]
            assert producer.recv() == "closed"
            assert producer.join() == 0
    finally:
        qd.close()


def test_the_consumer_process_sees_its_records_once_it_got() -> None:
    qd = QueueDescriptor(queue_type="shm", metadata={"maxsize": 100})
    try:
        assert qd.qsize() == 0 and qd.empty() and not qd.full()
        qd.put("a")
        qd.put("b")
        assert qd.get(timeout=GET_TIMEOUT) == "a"
        assert qd.qsize() == 1 and not qd.empty()
    finally:
        qd.close()


def _produce_three(conn: Connection, qd: QueueDescriptor) -> None:
    for i in range(3):
        qd.put(i)
    qd.close()  # returns once the consumer (the maker, which only asked qsize) has them
    conn.send("closed")


def test_the_maker_of_a_tcp_queue_without_endpoint_is_its_consumer() -> None:
    # It bound the endpoint when it made the descriptor: qsize() there opens that consumer.
    qd = QueueDescriptor(queue_type="tcp", metadata={"maxsize": 100})
    try:
        assert qd.qsize() == 0
        with spawn_worker(_produce_three, qd) as producer:
            assert producer.recv() == "closed"
            assert producer.join() == 0
        assert qd.qsize() == 3 and not qd.empty()
        assert [qd.get(timeout=GET_TIMEOUT) for _ in range(3)] == [0, 1, 2]
    finally:
        qd.close()
