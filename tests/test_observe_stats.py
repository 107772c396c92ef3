"""The stats endpoint: queries, reports from other processes' reporters, bad endpoints."""

from __future__ import annotations

import pytest

from sage_zmq import Packet, QueueDescriptor
from sage_zmq.observe import tracing
from sage_zmq.observe.stats_server import Reporter, StatsError, StatsServer, query


def test_snapshot_and_traces_over_the_endpoint() -> None:
    qd = QueueDescriptor("stats-q", "local", {"maxsize": 50})
    tracing.clear_recent()
    with StatsServer("tcp://127.0.0.1:0", meta={"role": "test"}) as server:
        try:
            packet = Packet(1)
            tracing.start_trace(packet)
            qd.put(packet)
            got = qd.get(timeout=5)
            tracing.finish(got, "here")
            reply = query(server.endpoint, "snapshot")
            (proc,) = reply["processes"]
            assert proc["meta"] == {"role": "test"}
            (q,) = [q for q in proc["queues"] if q["queue_id"] == "stats-q"]
            assert q["sent"] == 1 and q["received"] == 1 and q["maxsize"] == 50
            traces = query(server.endpoint, "traces")["traces"]
            assert [t["finished_by"] for t in traces] == ["here"]
            assert query(server.endpoint, "traces", since=traces[0]["time"])["traces"] == []
            assert query(server.endpoint, "ping") == {"ok": True}
            with pytest.raises(StatsError, match="unknown request"):
                query(server.endpoint, "explode")
        finally:
            qd.close()


def test_reporter_reports_and_final_report_is_awaited() -> None:
    tracing.clear_recent()
    with StatsServer(include_local=False) as server:
        reporter = Reporter(server.endpoint, interval=10.0, meta={"operator": "op", "instance": 3})
        packet = Packet(1)
        tracing.start_trace(packet)
        tracing.finish(packet, "op[3]")
        reporter.close()  # sends the final report
        assert server.wait_final(1, 5.0)
        (proc,) = query(server.endpoint)["processes"]
        assert proc["meta"] == {"operator": "op", "instance": 3}
        assert [t["finished_by"] for t in query(server.endpoint, "traces")["traces"]] == ["op[3]"]
        assert not server.wait_final(2, 0.05)


def test_bad_or_dead_endpoints_are_clear_errors() -> None:
    with pytest.raises(StatsError, match="malformed stats endpoint 'localhost:1'"):
        query("localhost:1")
    with StatsServer() as server:
        endpoint = server.endpoint
    with pytest.raises(StatsError, match="no answer from stats endpoint"):
        query(endpoint, timeout=0.2)
    with StatsServer() as server, pytest.raises(StatsError, match="cannot serve stats"):
        StatsServer(server.endpoint)
