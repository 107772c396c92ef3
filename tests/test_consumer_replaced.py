"""A consumer dies and another process takes its endpoint: a producer waiting for credit
carries on with the new one, and close() names what went down with the old one."""

from __future__ import annotations

import socket
from multiprocessing.connection import Connection

import pytest

from sage_zmq import QueueDescriptor
from sage_zmq.errors import DeliveryError
from sage_zmq.testing import close_quietly, spawn_worker, wait_until

pytestmark = pytest.mark.timeout(90)


def _take_two_and_stall(conn: Connection, qd: QueueDescriptor) -> None:
    """Take 2 records, hold 3 more unread (all 5 have left the producer), wait to be killed."""
    taken = [qd.get(timeout=30) for _ in range(2)]
    wait_until(lambda: qd.qsize() >= 3, 10, "the other 3 records to arrive")
    conn.send(taken)
    conn.recv()  # never comes: the parent kills this process


def _read(conn: Connection, qd: QueueDescriptor, n: int) -> None:
    conn.send([qd.get(timeout=30) for _ in range(n)])
    qd.close()


@pytest.mark.parametrize("qtype", ["shm", "tcp"])
def test_a_producer_waiting_for_credit_resumes_with_a_replacement_consumer(qtype: str) -> None:
    meta: dict[str, object] = {"maxsize": 5}
    if qtype == "tcp":
        with socket.socket() as probe:  # an explicit endpoint: any process may bind it
            probe.bind(("127.0.0.1", 0))
            meta["endpoint"] = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    qd = QueueDescriptor(None, qtype, meta)
    try:
        with spawn_worker(_take_two_and_stall, qd) as first:
            for i in range(5):
                qd.put(i, timeout=10)  # the first consumer's whole window
            assert first.recv() == [0, 1]  # and it holds 2, 3, 4 unread
            first.process.kill()
        with spawn_worker(_read, qd, 10) as second:
            for i in range(5, 15):
                qd.put(i, timeout=20)  # blocked until the new consumer hears of us
            assert second.recv() == list(range(5, 15))
            with pytest.raises(DeliveryError, match=r"up to [345] records"):
                qd.close(timeout=10)
    finally:
        close_quietly(qd)
