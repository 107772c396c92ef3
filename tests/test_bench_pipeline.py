"""The ``pipeline`` benchmark section (bursts through source -> worker -> sink) runs and cleans up.

A benchmark, not a timed test: only that every record of every burst arrives through both
pipelines and that the section closes what it opened (the autouse leak check in conftest.py).
"""

from __future__ import annotations

from sage_zmq.bench_pipeline import BURST, bench_burst_mpq, bench_burst_sage


def test_both_pipelines_deliver_every_burst_and_close_everything() -> None:
    for bench in (bench_burst_sage, bench_burst_mpq):
        latencies = bench(4)
        assert len(latencies) == 4 * BURST and all(0 <= s < 60 for s in latencies)
