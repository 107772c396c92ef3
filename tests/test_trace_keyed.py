"""Tracing through keyed (hash-partitioned) stages: a sampled record's trace is always finished.

A keyed stage that aggregates (``count_by_key``) absorbs its input records and emits new ones
only at end of stream, which start no trace; the traces of the absorbed records must end there
rather than vanish (they used to: with the example topology no trace was ever written).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from sage_zmq import Packet, QueueDescriptor, observe
from sage_zmq.observe import tracing
from sage_zmq.router import Connection, HashRouter, RoundRobinRouter
from sage_zmq.router.keys import instance_for_key
from sage_zmq.testing import close_quietly
from sage_zmq.topology import load_topology, run_topology

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def clean_traces() -> Any:
    tracing.clear_recent()
    tracing.set_trace_log(None)
    observe.activate()  # now: the first queue opened would apply the config's rate (0) over ours
    tracing.set_sample_rate(1.0)
    yield
    tracing.set_sample_rate(None)
    tracing.set_trace_log(None)
    tracing.clear_recent()


def test_hash_router_chain_keeps_the_trace_and_its_hops() -> None:
    """In one process: source -> hash router (2 tcp queues) -> propagate -> sink queue."""
    keyed = [QueueDescriptor(f"tk-keyed-{i}", "tcp") for i in range(2)]
    sink = QueueDescriptor("tk-sink", "tcp")
    to_keyed, to_sink = HashRouter(), RoundRobinRouter()
    try:
        for i, qd in enumerate(keyed):
            to_keyed.add_connection(Connection(0, i, "keyed", qd))
        to_sink.add_connection(Connection(0, 0, "sink", sink))
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
        started = {}
        for word in words:
            packet = Packet(word, partition_key=word)
            assert tracing.maybe_trace(packet)
            started[word] = tracing.trace_id(packet)
            to_keyed.route(packet)
        to_keyed.close()
        owner = {}
        for i, qd in enumerate(keyed):
            for _ in range(sum(instance_for_key(w, 2) == i for w in words)):
                got = qd.get(timeout=5)
                owner[got.payload] = qd.queue_id
                to_sink.route(tracing.propagate(got, Packet(got.payload.upper())))
        to_sink.close()
        finished = {}
        for _ in words:
            got = sink.get(timeout=5)
            record = tracing.finish(got, "sink[0]")
            assert record is not None
            finished[got.payload.lower()] = record
    finally:
        close_quietly(*keyed, sink)
    assert set(finished) == set(words)
    assert set(owner.values()) == {"tk-keyed-0", "tk-keyed-1"}  # both instances were used
    for word, record in finished.items():
        assert record["trace_id"] == started[word]
        assert [(h[0], h[2]) for h in record["hops"]] == [
            (owner[word], "put"),
            (owner[word], "get"),
            ("tk-sink", "put"),
            ("tk-sink", "get"),
        ]


def _wordcount(log: Path, count: int) -> dict[str, Any]:
    # examples/topology.yaml, smaller and with every record sampled
    return {
        "name": "tk",
        "queue_type": "shm",
        "trace_log": str(log),
        "stats": None,
        "config": {"observability": {"trace_sample_rate": 1.0}},
        "operators": [
            {"name": "words", "kind": "source", "function": "words", "args": {"count": count}},
            {
                "name": "upper",
                "kind": "map",
                "function": "upper",
                "parallelism": 2,
                "inputs": ["words"],
            },
            {
                "name": "count",
                "kind": "keyed",
                "function": "count_by_key",
                "parallelism": 2,
                "inputs": ["upper"],
            },
            {"name": "out", "kind": "sink", "function": "collect", "inputs": ["count"]},
        ],
    }


def test_keyed_aggregation_finishes_the_traces_of_the_records_it_absorbs(
    tmp_path: Path,
) -> None:
    log = tmp_path / "kt.jsonl"
    result = run_topology(load_topology(_wordcount(log, 200)), timeout=60)
    counts = {r["key"]: r["count"] for r in result.collected["out"]}
    assert sum(counts.values()) == 200 and len(counts) == 8
    assert log.exists(), "no trace was finished"
    traces = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(traces) == 200 and len({t["trace_id"] for t in traces}) == 200
    upper_queues = {u.input_queue for u in result.by_operator("upper")}
    count_by_name = {f"count[{c.index}]": c.input_queue for c in result.by_operator("count")}
    by_instance: dict[str, int] = defaultdict(int)
    for trace in traces:
        hops = trace["hops"]
        # source -> upper[i] -> count[j], and the path ended (absorbed) at count[j]
        assert [h[2] for h in hops] == ["put", "get", "put", "get"]
        assert hops[0][0] == hops[1][0] and hops[0][0] in upper_queues
        where = trace["finished_by"]
        assert where in count_by_name
        assert hops[2][0] == hops[3][0] == count_by_name[where]
        by_instance[where] += 1
    # each key went to one instance: its traces end where its count was kept
    emitted = {c.index: c.emitted for c in result.by_operator("count")}
    assert sum(by_instance.values()) == 200
    assert {int(w[6:-1]) for w in by_instance} == {i for i, n in emitted.items() if n}


def test_a_record_dropped_by_a_keyed_function_finishes_its_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A keyed function passing only odd numbers: odd records reach the sink, even ones end
    # at the keyed stage; every one of them has a finished trace.
    (tmp_path / "tk_funcs.py").write_text(
        "def odd(state, record):\n    return record if record % 2 else None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tk_funcs", None)
    log = tmp_path / "kt.jsonl"
    topo = {
        "name": "tkd",
        "queue_type": "shm",
        "trace_log": str(log),
        "stats": None,
        "config": {"observability": {"trace_sample_rate": 1.0}},
        "operators": [
            {"name": "src", "kind": "source", "function": "range", "args": {"count": 40}},
            {
                "name": "odd",
                "kind": "keyed",
                "function": "tk_funcs:odd",
                "parallelism": 2,
                "inputs": ["src"],
            },
            {"name": "out", "kind": "sink", "function": "collect", "inputs": ["odd"]},
        ],
    }
    result = run_topology(load_topology(topo), timeout=60)
    assert sorted(result.collected["out"]) == list(range(1, 40, 2))
    traces = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(traces) == 40
    ends = defaultdict(list)
    for trace in traces:
        ends[trace["finished_by"].split("[")[0]].append(len(trace["hops"]))
    assert sorted(ends) == ["odd", "out"]
    assert ends["out"] == [4] * 20 and ends["odd"] == [2] * 20
