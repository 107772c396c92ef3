"""The stats endpoint: queries, reports from other processes' reporters (malformed ones
dropped), bad endpoints; the CLI views of what it answers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import zmq

from sage_zmq import Packet, QueueDescriptor
from sage_zmq.cli import main
from sage_zmq.cli.views import format_queues, format_trace, rates_between
from sage_zmq.observe import tracing
from sage_zmq.observe.stats_server import (
    Reporter,
    StatsError,
    StatsServer,
    check_report,
    query,
)


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


def _report(queues: list[Any], process: str = "h:1", **extra: Any) -> dict[str, Any]:
    snapshot = {"version": 1, "process": process, "pid": 1, "time": time.time()}
    return {
        "cmd": "report",
        "snapshot": {**snapshot, "queues": queues, "routers": []},
        "traces": [],
        "final": False,
        "meta": {"operator": "a", "instance": 0},
        **extra,
    }


GOOD_QUEUE = {
    "queue_id": "q",
    "role": "consumer",
    "sent": 0,
    "received": 5,
    "depth": 1,
    "maxsize": 10,
}


@pytest.mark.parametrize(
    ("queues", "why"),
    [
        ([{"queue_id": "q1"}], "has no 'role' string"),
        ([{**GOOD_QUEUE, "sent": "many"}], "'sent' is not a number"),
        ([{**GOOD_QUEUE, "depth": None}], "'depth' is not a number"),
        ([{**GOOD_QUEUE, "latency_p50": "slow"}], "'latency_p50' is not a number"),
        (["q"], "is not an object"),
        ({"q": 1}, "'queues' is not a list"),
    ],
)
def test_malformed_reports_are_named(queues: Any, why: str) -> None:
    assert why in (check_report(_report(queues)) or "")


def test_a_malformed_report_is_dropped_and_counted_and_stats_top_survive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One DEALER sending a report whose queues lack 'role' made every later `sage-zmq stats`
    # and `top` fail with KeyError: 'role' (the report was stored as it came).
    with StatsServer(include_local=False) as server:
        dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(server.endpoint)
        try:
            dealer.send(json.dumps(_report([GOOD_QUEUE], process="h:good")).encode())
            dealer.send(json.dumps(_report([{"queue_id": "q1"}], process="h:bad")).encode())
            # A later malformed report of a good process must not replace its good one.
            dealer.send(json.dumps(_report([{"queue_id": "q"}], process="h:good")).encode())
            bad_trace = _report([GOOD_QUEUE], process="h:t", traces=[{"trace_id": "x"}])
            dealer.send(json.dumps(bad_trace).encode())
            deadline = time.monotonic() + 5
            while server.rejected_reports < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            reply = query(server.endpoint, "snapshot")
            assert reply["rejected_reports"] == 2
            assert sorted(p["process"] for p in reply["processes"]) == ["h:good", "h:t"]
            assert query(server.endpoint, "traces")["traces"] == []
            assert main(["stats", server.endpoint]) == 0
            assert "h:good" in capsys.readouterr().out
            assert main(["top", server.endpoint, "--once", "--interval", "0.05"]) == 0
            assert "h:good" in capsys.readouterr().out
        finally:
            dealer.close()


def test_views_tolerate_snapshots_with_missing_or_odd_fields() -> None:
    # Snapshots can come from elsewhere (an older server, a file): show what is there.
    odd: list[Any] = [
        {"process": "h:1", "time": 1.0, "queues": [{"queue_id": "q"}, "junk", {"role": "x"}]},
        {"process": "h:2", "queues": None, "meta": "not a mapping"},
        {
            "time": 2.0,
            "queues": [
                {
                    "queue_id": "q",
                    "role": "r",
                    "sent": "7",
                    "depth": None,
                    "latency_histogram": {"nonsense": 1},
                }
            ],
        },
        "not a process",
    ]
    later = [{**odd[0], "time": 2.0, "queues": [{"queue_id": "q", "sent": 10}]}]
    table = format_queues(odd, rates_between(odd, later))
    assert "h:1" in table and "?" in table
    assert rates_between(odd, later)[("h:1", "q", "?")] == (10.0, 0.0)
    assert format_trace({"trace_id": "t", "hops": [["q", "p", "put", 1.0], "junk", [1, 2]]})


def test_query_refuses_a_timeout_zeromq_would_take_as_forever() -> None:
    for timeout in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(StatsError, match="timeout must be a number of seconds > 0"):
            query("tcp://127.0.0.1:1", timeout=timeout)


def test_an_ipc_stats_endpoint_removes_its_socket_file(tmp_path: Any) -> None:
    path = tmp_path / "stats.sock"
    with StatsServer(f"ipc://{path}") as server:
        assert path.exists()
        assert query(server.endpoint, "ping") == {"ok": True}
    assert not path.exists()  # libzmq leaves it; close() takes it away


def test_stats_shows_each_ends_average_rates_from_one_snapshot() -> None:
    # `sage-zmq stats` has one snapshot, no interval: OUT/s and IN/s are the averages since
    # each end opened (they were always "-").
    snap = [
        {
            "process": "h:1",
            "queues": [{"queue_id": "q", "role": "get", "sent": 0, "received": 2468, "uptime": 2}],
        }
    ]
    header, row = format_queues(snap).splitlines()
    cells = dict(zip(header.split(), row.split(), strict=False))
    assert cells["OUT/s"] == "0" and cells["IN/s"] == "1234", (header, row)
