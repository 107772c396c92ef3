"""The ``pipeline`` section of ``sage-zmq bench``: bursty traffic through source -> worker -> sink.

A source process sends bursts of records (each stamped with ``time.time()``) at fixed
intervals; a worker process passes each record on; the sink (this process) takes the time from
stamp to arrival. Through two ``shm`` queues, and through two ``multiprocessing.Queue`` in the
same run. Bursts are where batching costs latency: the tail of a burst must not wait for the
next one, nor for a timer at every stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from sage_zmq.bench import _spawn, _spawned, percentile_rows

Row = dict[str, Any]

BURST = 50
GAP = 0.005  # seconds from one burst's start to the next


def _burst_source(put: Callable[[Any], None], bursts: int) -> None:
    start = time.perf_counter()
    for b in range(bursts):
        for i in range(BURST):
            put({"t": time.time(), "i": i})
        # The workload's pace, not a wait for anything: the next burst starts on schedule.
        while (ahead := start + (b + 1) * GAP - time.perf_counter()) > 0:
            time.sleep(min(ahead, 0.0005))


def _sz_source(q1: Any, bursts: int, go: Any) -> None:
    from sage_zmq import EndOfStream

    go.wait()
    _burst_source(q1.put, bursts)
    q1.put(EndOfStream())
    q1.close()


def _sz_worker(q1: Any, q2: Any, up: Any) -> None:
    from sage_zmq import Empty, EndOfStream

    with contextlib.suppress(Empty):
        q1.get(timeout=0.01)  # open the consumer end before the source starts
    up.set()
    for record in q1:
        q2.put(record)
    q2.put(EndOfStream())
    q2.close()
    q1.close()


def _mpq_source(q1: Any, bursts: int, go: Any) -> None:
    go.wait()
    _burst_source(q1.put, bursts)
    q1.put(None)


def _mpq_worker(q1: Any, q2: Any, up: Any) -> None:
    up.set()
    while (record := q1.get()) is not None:
        q2.put(record)
    q2.put(None)


def bench_burst_sage(bursts: int) -> list[float]:
    """Seconds from stamp to arrival, per record, through two ``shm`` queues."""
    from sage_zmq import Empty, QueueDescriptor

    ctx = _spawn()
    up, go = ctx.Event(), ctx.Event()
    q1 = QueueDescriptor(None, "shm", {"maxsize": 5000})
    q2 = QueueDescriptor(None, "shm", {"maxsize": 5000})
    try:
        with contextlib.suppress(Empty):
            q2.get(timeout=0.01)  # the sink's end is open before the worker puts
        with _spawned(_sz_worker, q1, q2, up), _spawned(_sz_source, q1, bursts, go):
            if not up.wait(120):
                raise RuntimeError("benchmark worker did not start")
            go.set()
            return [time.time() - record["t"] for record in q2]
    finally:
        q2.close()
        q1.close()


def bench_burst_mpq(bursts: int) -> list[float]:
    """The same through two ``multiprocessing.Queue``."""
    ctx = _spawn()
    up, go = ctx.Event(), ctx.Event()
    q1, q2 = ctx.Queue(), ctx.Queue()
    try:
        with _spawned(_mpq_worker, q1, q2, up), _spawned(_mpq_source, q1, bursts, go):
            if not up.wait(120):
                raise RuntimeError("benchmark worker did not start")
            go.set()
            out = []
            while (record := q2.get()) is not None:
                out.append(time.time() - record["t"])
            return out
    finally:
        for q in (q1, q2):
            q.close()
            q.join_thread()


def run(quick: bool = False) -> list[Row]:
    """Rows ``{name, value, unit, competitor, competitor_value, ratio, target}``."""
    bursts = 100 if quick else 400
    ours = bench_burst_sage(bursts)
    theirs = bench_burst_mpq(bursts)
    if len(ours) != bursts * BURST or len(theirs) != bursts * BURST:
        raise RuntimeError(f"pipeline bench lost records: {len(ours)} / {len(theirs)}")
    what = f"bursts of {BURST} every {GAP * 1e3:g} ms, source -> worker -> sink"
    return percentile_rows(
        f"latency {{}}, {what}, shm queues",
        ours,
        "multiprocessing.Queue",
        theirs,
        scale=1e3,
        unit="ms",
    )
