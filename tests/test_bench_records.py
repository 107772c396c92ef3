"""The "10 KiB dict records" benchmark row (shm against tcp) runs and cleans up.

A benchmark, not a timed test: only that it delivers every record from another process and
closes what it opened (the autouse leak check in conftest.py looks at sockets, threads and
shared-memory segments).
"""

from __future__ import annotations

import pytest

from sage_zmq.bench_shm import _documents, bench_records


@pytest.mark.parametrize("queue_type", ["shm", "tcp"])
def test_records_row_delivers_every_record_and_closes_everything(queue_type: str) -> None:
    docs = _documents(10 * 1024, 4)
    assert all(len(d["text"]) == 10 * 1024 for d in docs)
    assert bench_records(queue_type, docs, 300) > 0  # _timed takes all 300, or raises Empty
