"""A consumer reports what it consumed soon after, not only every eighth of a window.

Producers learn from these reports how much room they have, routers read live load from
them, and ``statistics()`` shows them. A consumer that took the last record of a batch and
did not call ``get`` again used to leave its producer believing the queue still full.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from sage_zmq import Empty, QueueDescriptor
from sage_zmq import testing as conf


@pytest.fixture(params=["local", "shm", "tcp", "sage"])
def qd(request: pytest.FixtureRequest) -> Iterator[QueueDescriptor]:
    q = QueueDescriptor(None, request.param, {"maxsize": 100})
    with contextlib.suppress(Empty):
        q.get_nowait()  # the consumer end is here
    yield q
    q.close(timeout=1)


def test_a_drained_queue_takes_maxsize_more(qd: QueueDescriptor) -> None:
    for round_ in range(3):
        for i in range(100):
            qd.put((round_, i), timeout=conf.GET_TIMEOUT)
        got = [tuple(r) for r in conf.drain(qd, 100)]
        assert got == [(round_, i) for i in range(100)]
    # Every record was taken: a put must not wait for a get that would only ack the last batch.
    qd.put("after", timeout=conf.GET_TIMEOUT)
    assert qd.get(timeout=conf.GET_TIMEOUT) == "after"


def test_statistics_show_what_the_consumer_took(qd: QueueDescriptor) -> None:
    for i in range(30):
        qd.put(i, timeout=conf.GET_TIMEOUT)
    conf.drain(qd, 30)
    producer = qd._handle().producer(qd)
    consumer = qd._handle().consumer(qd)
    conf.wait_until(
        lambda: producer.statistics().in_flight == 0, what="the producer to see the consumption"
    )
    stats = producer.statistics()
    assert (stats.acked, stats.depth) == (30, 0), stats
    assert consumer.statistics().acked == 30


def test_statistics_after_close_keep_the_totals() -> None:
    qd = QueueDescriptor(None, "tcp", {"maxsize": 100})
    for i in range(7):
        qd.put(i, timeout=conf.GET_TIMEOUT)
    assert conf.drain(qd, 7) == list(range(7))
    qd.close()
    stats = qd.statistics()  # they were all zeros (role "idle") once the ends had closed
    assert (stats.role, stats.sent, stats.received) == ("producer+consumer", 7, 7), stats
    assert QueueDescriptor.from_dict(qd.to_dict()).statistics() == stats  # the same queue


@pytest.mark.parametrize("queue_type", ["shm", "tcp", "sage"])
def test_a_consumer_that_pauses_inside_a_batch_gives_back_what_it_took(queue_type: str) -> None:
    # Records arrived as one batch of 100; the consumer took 75 and paused (an actor method
    # "take 75, then work"). Credit came back only when the whole batch was taken, so the
    # producer got Full with 25 records unread (README: never more than maxsize ahead).
    qd = QueueDescriptor(None, queue_type, {"maxsize": 100, "flush_interval": 5})
    with contextlib.suppress(Empty):
        qd.get_nowait()  # the consumer end is here
    try:
        producer = qd._handle().producer(qd)
        producer._busy, producer._flush_at = True, 100  # one frame of 100
        for i in range(100):
            qd.put(i, timeout=conf.GET_TIMEOUT)
        assert [qd.get(timeout=conf.GET_TIMEOUT) for _ in range(75)] == list(range(75))
        for i in range(100, 175):  # room for 75 more, once the background tick reports
            qd.put(i, timeout=conf.GET_TIMEOUT)
        assert conf.drain(qd, 100) == list(range(75, 175))
    finally:
        qd.close(timeout=1)
