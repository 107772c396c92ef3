"""The cross-process throughput rows of ``sage-zmq bench`` (core section) run and clean up.

A benchmark, not a timed test: each competitor must deliver every record from a spawned
process, its warm-up record included, and end without waiting on an end-of-stream frame
(raw pyzmq can lose the tail of an ipc stream at close: libzmq issue 4660). The autouse leak
check in conftest.py looks at sockets, threads and shared-memory segments.
"""

from __future__ import annotations

import pytest

from sage_zmq.bench import bench_mp_queue, bench_raw_pyzmq, bench_sage_cross_process


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_raw_pyzmq_row_takes_every_record(transport: str) -> None:
    assert bench_raw_pyzmq(transport, 2_050) > 0  # _timed_consume raises if any is missing


@pytest.mark.parametrize("queue_type", ["shm", "tcp"])
def test_queue_row_takes_every_record(queue_type: str) -> None:
    assert bench_sage_cross_process(queue_type, 2_050) > 0


def test_multiprocessing_queue_row_takes_every_record() -> None:
    assert bench_mp_queue(2_050) > 0
