"""A put that waited for the producer's lock while another thread closed it: QueueClosed."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from sage_zmq import QueueClosed, QueueDescriptor

pytestmark = pytest.mark.timeout(30)


class _SpyLock:
    """The producer's RLock, telling when a second thread starts to wait for it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self.inner.acquire(blocking=False):
            return True
        if not blocking:
            return False
        self.contended.set()
        return bool(self.inner.acquire(True, timeout))

    def release(self) -> None:
        self.inner.release()

    def __enter__(self) -> _SpyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@pytest.mark.parametrize("queue_type", ["tcp", "sage"])
def test_a_put_waiting_for_the_lock_while_another_thread_closes_gets_queue_closed(
    queue_type: str,
) -> None:
    qd = QueueDescriptor(queue_type=queue_type, metadata={"maxsize": 10})
    producer = qd._handle().producer(qd)
    spy = _SpyLock(producer._lock)
    producer._lock = spy
    raised: list[BaseException] = []

    def put() -> None:
        try:
            producer.put("x")
        except BaseException as exc:  # handed to the test thread
            raised.append(exc)

    try:
        with spy:  # hold it: the put below waits for it
            putter = threading.Thread(target=put)
            putter.start()
            assert spy.contended.wait(10), "the put never waited for the lock"
            producer.close(timeout=2)  # the same thread holds the (reentrant) lock
        putter.join(10)
        assert len(raised) == 1 and isinstance(raised[0], QueueClosed), raised
    finally:
        qd.close()


def test_a_tcp_queue_reopened_at_once_after_close_binds_and_delivers() -> None:
    # libzmq closed the consumer's listener after close() returned: a get right after failed
    # to bind (EADDRINUSE, in about a third of tries) and a producer opened meanwhile could
    # connect to the dying listener and lose its record. close() now waits for the listener.
    for k in range(20):
        qd = QueueDescriptor(f"reopen-{k}", "tcp", {"maxsize": 10})
        try:
            qd.put(0)
            assert qd.get(timeout=5) == 0
            qd.close(timeout=5)
            qd.put("again")
            assert qd.get(timeout=5) == "again"
        finally:
            qd.close(timeout=5)
