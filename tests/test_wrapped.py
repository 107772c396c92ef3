"""``QueueDescriptor.from_existing``: queue.Queue and multiprocessing.Queue behind the same API.

The Ray queue case lives in ``test_ray_queue.py`` (it needs that module's Ray session).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from sage_zmq import DescriptorError, Empty, EndOfStream, Full, InvalidArgument, QueueDescriptor
from sage_zmq.queues import _zmq, wrapped


def test_queue_queue_items_are_shared_with_raw_users() -> None:
    q: queue.Queue[object] = queue.Queue()
    qd = QueueDescriptor.from_existing(q, queue_id="jobs")
    assert qd.queue_type == "wrapped" and qd.queue_id == "jobs"
    record = {"a": [1, 2]}
    qd.put(record)
    assert q.get_nowait() is record  # by reference, like queue.Queue itself
    q.put("from raw")
    assert qd.get(timeout=1) == "from raw"
    assert qd.qsize() == 0 and qd.empty()
    assert qd.statistics().received == 1
    qd.close()
    wrapped.forget(qd)


def test_same_queue_same_reference() -> None:
    q: queue.Queue[object] = queue.Queue()
    a = QueueDescriptor.from_existing(q)
    b = QueueDescriptor.from_existing(q)
    assert a.metadata["ref"] == b.metadata["ref"]
    wrapped.forget(a)


def test_bounded_queue_full_and_empty_are_ours() -> None:
    q: queue.Queue[object] = queue.Queue(maxsize=2)
    qd = QueueDescriptor.from_existing(q)
    assert qd.maxsize == 2
    qd.put(1)
    qd.put(2)
    assert qd.full()
    with pytest.raises(Full, match="is full"):
        qd.put(3, timeout=0.05)
    with pytest.raises(queue.Full):  # still a queue.Full for existing worker loops
        qd.put_nowait(3)
    assert [qd.get(), qd.get()] == [1, 2]  # nothing dropped
    with pytest.raises(Empty):
        qd.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        qd.get_nowait()
    qd.close()
    wrapped.forget(qd)


def test_end_of_stream_counts_upstreams() -> None:
    q: queue.Queue[object] = queue.Queue()
    qd = QueueDescriptor.from_existing(q).with_options(upstreams=2)
    done = threading.Event()

    def producer(tag: str) -> None:
        for i in range(100):
            qd.put((tag, i))
        qd.put(EndOfStream())

    threads = [threading.Thread(target=producer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    items = list(qd)  # stops only after both ends
    for t in threads:
        t.join()
    done.set()
    assert sorted(items) == sorted((t, i) for t in "ab" for i in range(100))
    assert isinstance(qd.get(timeout=0.1), EndOfStream)  # like a file at EOF
    qd.close()
    wrapped.forget(qd)


def test_queue_queue_descriptor_refuses_other_process() -> None:
    q: queue.Queue[object] = queue.Queue()
    qd = QueueDescriptor.from_existing(q)
    moved = pickle.loads(pickle.dumps(qd))  # the descriptor pickles; the queue stays here
    moved.metadata["owner"] = "1-elsewhere"  # what another process would see
    with pytest.raises(DescriptorError, match=r"cannot leave its process.*multiprocessing"):
        moved.put(1)
    wrapped.forget(qd)


def test_forgotten_queue_is_a_clear_error() -> None:
    q: queue.Queue[object] = queue.Queue()
    qd = QueueDescriptor.from_existing(q)
    wrapped.forget(qd)
    with pytest.raises(DescriptorError, match="from_existing"):
        qd.put(1)
    qd.close()


def test_bad_inputs_are_clear() -> None:
    with pytest.raises(DescriptorError, match=r"queue\.Queue, multiprocessing\.Queue"):
        QueueDescriptor.from_existing([1, 2])
    with pytest.raises(DescriptorError, match="from_existing"):
        QueueDescriptor(queue_type="wrapped")


def _child(qd: QueueDescriptor, n: int) -> None:
    for i in range(n):
        qd.put(("child", i))
    qd.put(EndOfStream())
    qd.close()


def test_multiprocessing_queue_reaches_a_spawned_child() -> None:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue(maxsize=50)
    qd = QueueDescriptor.from_existing(q)
    assert qd.maxsize == 50
    p = ctx.Process(target=_child, args=(qd, 300))  # inherited at spawn: allowed
    p.start()
    try:
        got = list(qd)
    finally:
        p.join(30)
    assert p.exitcode == 0
    assert got == [["child", i] for i in range(300)] or got == [("child", i) for i in range(300)]
    # Outside process start multiprocessing refuses to pickle the queue; the descriptor says
    # why and what to use instead (multiprocessing's own error named no way out).
    with pytest.raises(DescriptorError, match=r"argument of a multiprocessing\.Process"):
        pickle.dumps(qd)
    with pytest.raises(DescriptorError, match=r"no JSON form: .*pass it to a multiprocessing"):
        qd.to_json()
    qd.close()
    wrapped.forget(qd)
    q.close()
    q.join_thread()


@contextlib.contextmanager
def _wrapped(kind: str, maxsize: int = 0) -> Iterator[QueueDescriptor]:
    """A descriptor wrapping a new queue.Queue or multiprocessing.Queue, ended on leaving."""
    q: Any = (
        queue.Queue(maxsize)
        if kind == "queue"
        else multiprocessing.get_context("spawn").Queue(maxsize)
    )
    qd = QueueDescriptor.from_existing(q)
    try:
        yield qd
    finally:
        qd.close()
        wrapped.forget(qd)
        if kind != "queue":
            q.close()
            q.join_thread()


@pytest.mark.parametrize("kind", ["queue", "multiprocessing"])
def test_statistics_count_records_as_every_queue_type_does(kind: str) -> None:
    with _wrapped(kind) as qd:
        for i in range(2):
            qd.put(i)
        qd.put(EndOfStream())
        assert list(qd) == [0, 1]
        stats = qd.statistics()
        # ENDs are not records; what get() returned is consumed.
        assert (stats.sent, stats.received, stats.acked, stats.in_flight) == (2, 2, 2, 0)
        assert stats.upstreams_ended == 1


@pytest.mark.parametrize("kind", ["queue", "multiprocessing"])
def test_timeouts_are_checked_as_on_every_queue(kind: str) -> None:
    # The stdlib queues hang on NaN (queue.Queue), overflow on infinity and take negative
    # timeouts differently; a wrapped one answers as the other types do.
    with _wrapped(kind, maxsize=2) as qd:
        assert qd.maxsize == 2
        for bad in (float("nan"), -1, "1"):
            with pytest.raises(InvalidArgument):
                qd.put("x", timeout=bad)
            with pytest.raises(InvalidArgument):
                qd.get(timeout=bad)
        qd.put("x", timeout=float("inf"))  # waits without limit; there is room
        assert qd.get(timeout=float("inf")) == "x"
        qd.put("y", timeout=1e12)  # beyond what the stdlib takes: no OverflowError
        assert qd.get(timeout=1e12) == "y"


@pytest.mark.parametrize("kind", ["queue", "multiprocessing"])
def test_an_unbounded_queue_reports_no_bound_and_refuses_promotion(kind: str) -> None:
    with _wrapped(kind) as qd:
        assert qd.maxsize == 0  # its own bound (none), not the config's max_size
        for new_type in ("shm", "tcp"):  # refused before anything is bound for it
            with pytest.raises(DescriptorError, match="cannot promote a 'wrapped' queue"):
                qd.as_type(new_type)
        assert not _zmq._prebound
        qd.put(1)
        assert qd.get(timeout=5) == 1  # still usable
