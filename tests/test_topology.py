"""Topologies: validation with clear errors, and real multi-process runs (3 stages)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sage_zmq.topology import TopologyError, load_topology, run_topology


def _ops(*ops: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": "t", "operators": list(ops), **top}


SRC = {"name": "src", "kind": "source", "function": "range", "args": {"count": 10}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _ops(SRC, {"name": "m", "kind": "mapp", "function": "identity", "inputs": ["src"]}),
            "kind 'mapp' is not one of .*did you mean 'map'",
        ),
        (
            _ops(SRC, {"name": "m", "kind": "map", "function": "uper", "inputs": ["src"]}),
            "unknown map function 'uper'; did you mean 'upper'",
        ),
        (
            _ops(SRC, {"name": "s", "kind": "sink", "function": "print", "inputs": ["nope"]}),
            "input 'nope': no such operator",
        ),
        (
            _ops({"name": "s", "kind": "sink", "function": "print", "inputs": ["src"]}, SRC),
            "input 'src': it must be declared before",
        ),
        (_ops(SRC, {"name": "s", "kind": "sink", "function": "print"}), "a sink needs 'inputs'"),
        (_ops(SRC, SRC), "two operators are named 'src'"),
        (_ops({**SRC, "parallelism": 0}), "parallelism must be an integer >= 1"),
        (_ops({**SRC, "paralelism": 2}), "unknown key 'paralelism'; did you mean 'parallelism'"),
        (_ops(SRC, queue_type="local"), "local queues cannot connect processes"),
        (
            _ops(SRC, {"name": "m", "kind": "map", "function": "nosuchmod:f", "inputs": ["src"]}),
            "cannot import module 'nosuchmod'",
        ),
        (
            _ops(
                SRC,
                {
                    "name": "m",
                    "kind": "map",
                    "function": "identity",
                    "inputs": ["src"],
                    "strategy": "roundrobin",
                },
            ),
            "did you mean 'round_robin'",
        ),
        (
            _ops(SRC, config={"performance": {"batch_sise": 1}}),
            "did you mean 'performance.batch_size'",
        ),
        (_ops(SRC, stats="localhost"), "malformed stats endpoint"),
        ({"name": "t"}, "'operators' must be a non-empty list"),
    ],
)
def test_bad_topologies_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        load_topology(data)


def test_bad_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("operators: [\n")
    with pytest.raises(TopologyError, match=r"bad\.yaml.*not valid YAML"):
        load_topology(path)
    with pytest.raises(TopologyError, match="cannot read topology file"):
        load_topology(tmp_path / "missing.yaml")


def test_example_topology_loads() -> None:
    topo = load_topology(Path(__file__).resolve().parent.parent / "examples" / "topology.yaml")
    assert [op.kind for op in topo.operators] == ["source", "map", "keyed", "sink"]
    assert topo.operator("count").routing == "hash"


def test_three_stage_trace_hops_match_the_real_path(tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    topo = load_topology(
        _ops(
            {"name": "src", "kind": "source", "function": "range", "args": {"count": 200}},
            {
                "name": "mid",
                "kind": "map",
                "function": "identity",
                "parallelism": 2,
                "inputs": ["src"],
            },
            {"name": "out", "kind": "sink", "function": "collect", "inputs": ["mid"]},
            name="tr",
            queue_type="shm",
            trace_log=str(log),
            config={"observability": {"trace_sample_rate": 1.0}},
        )
    )
    result = run_topology(topo, timeout=60)
    assert sorted(result.collected["out"]) == list(range(200))
    (src,) = result.by_operator("src")
    mids = result.by_operator("mid")
    (out,) = result.by_operator("out")
    assert sum(m.received for m in mids) == 200 and all(m.received > 0 for m in mids)
    traces = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(traces) == 200 and len({t["trace_id"] for t in traces}) == 200
    mid_by_queue = {m.input_queue: m for m in mids}
    host = lambda pid: f":{pid}"  # noqa: E731
    seen_mids = set()
    for trace in traces:
        hops = trace["hops"]
        assert [h[2] for h in hops] == ["put", "get", "put", "get"]
        first_q = hops[0][0]
        mid = mid_by_queue[first_q]
        seen_mids.add(mid.index)
        assert [h[0] for h in hops] == [first_q, first_q, out.input_queue, out.input_queue]
        assert hops[0][1].endswith(host(src.pid))
        assert hops[1][1].endswith(host(mid.pid)) and hops[2][1].endswith(host(mid.pid))
        assert hops[3][1].endswith(host(out.pid))
        times = [h[3] for h in hops]
        assert times == sorted(times)
        assert trace["finished_by"] == "out[0]"
    assert seen_mids == {0, 1}
    # the final reports reached the runner's stats endpoint
    reported = {(p["meta"]["operator"], p["meta"]["instance"]) for p in result.final_snapshot}
    assert reported == {("src", 0), ("mid", 0), ("mid", 1), ("out", 0)}
    (out_snap,) = [p for p in result.final_snapshot if p["meta"]["operator"] == "out"]
    (out_q,) = [q for q in out_snap["queues"] if q["role"] == "consumer"]
    assert out_q["received"] == 200 and out_q["upstreams_ended"] == 2


def test_keyed_counts_over_tcp_with_a_user_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "topo_funcs.py").write_text(
        "def evens(ctx):\n"
        "    return ({'k': i % 3, 'v': i} for i in range(ctx.index, 300, ctx.parallelism))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("topo_funcs", None)
    topo = load_topology(
        _ops(
            {"name": "src", "kind": "source", "function": "topo_funcs:evens", "parallelism": 2},
            {
                "name": "cnt",
                "kind": "keyed",
                "function": "count_by_key",
                "key": "k",
                "parallelism": 2,
                "inputs": ["src"],
            },
            {"name": "out", "kind": "sink", "function": "collect", "inputs": ["cnt"]},
            name="kc",
            queue_type="tcp",
            stats=None,
        )
    )
    result = run_topology(topo, timeout=60)
    counts = {r["key"]: r["count"] for r in result.collected["out"]}
    assert counts == {0: 100, 1: 100, 2: 100}
    # each key was counted by exactly one instance (hash routing)
    assert sum(i.emitted for i in result.by_operator("cnt")) == 3
    assert result.stats_endpoint is None and result.final_snapshot == []


def test_a_failing_instance_fails_the_run_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "topo_bad.py").write_text("def boom(record):\n    raise RuntimeError('kaboom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("topo_bad", None)
    topo = load_topology(
        _ops(
            {"name": "src", "kind": "source", "function": "range", "args": {"count": 5}},
            {"name": "m", "kind": "map", "function": "topo_bad:boom", "inputs": ["src"]},
            {"name": "out", "kind": "sink", "function": "discard", "inputs": ["m"]},
            name="bad",
            stats=None,
            config={"communication": {"queue": {"timeout": 2}}},
        )
    )
    with pytest.raises(TopologyError, match=r"m\[0\] failed: RuntimeError: kaboom"):
        run_topology(topo, timeout=30)


@pytest.mark.parametrize("timeout", [-1.0, 0, float("nan"), True])
def test_run_refuses_a_timeout_that_is_no_time(timeout: Any) -> None:
    # run --timeout -1 used to start every process and then report a confusing
    # "words[0] start-up: no answer before the timeout".
    topo = load_topology(
        _ops(
            SRC,
            {"name": "out", "kind": "sink", "function": "discard", "inputs": ["src"]},
            stats=None,
        )
    )
    with pytest.raises(TopologyError, match="timeout must be a number of seconds > 0"):
        run_topology(topo, timeout=timeout)
