"""The "work per idle hop" benchmark row runs the shm queue ends' own code (docs/architecture.md).

A benchmark, not a timed test: only that it runs, measures both sides, and closes what it opened
(the autouse leak check in conftest.py looks at sockets, threads and shared-memory segments).
"""

from __future__ import annotations

from sage_zmq.bench import bench_hop_work


def test_hop_work_measures_both_sides_and_closes_everything() -> None:
    ours, raw = bench_hop_work(200)
    assert 0 < raw < 0.01 and 0 < ours < 0.01  # seconds per hop: measured, and not stuck
