"""The sage-zmq command: every subcommand runs, bad input exits with a clear message."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sage_zmq import Packet, QueueDescriptor
from sage_zmq.cli import main
from sage_zmq.observe import tracing
from sage_zmq.observe.stats_server import StatsServer, discover

PYTHON = sys.executable


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--help"],
        ["run", "--help"],
        ["stats", "--help"],
        ["top", "--help"],
        ["trace", "--help"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        assert "usage: sage-zmq" in capsys.readouterr().out
    assert main([]) == 2


def test_python_dash_m_works() -> None:
    done = subprocess.run(
        [PYTHON, "-m", "sage_zmq", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "run" in done.stdout and "top" in done.stdout


def test_run_prints_a_summary(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    capsys = capfd  # the print sink runs in child processes: capture at the fd level
    path = tmp_path / "t.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "clirun",
                "operators": [
                    {"name": "src", "kind": "source", "function": "range", "args": {"count": 50}},
                    {"name": "up", "kind": "map", "function": "upper", "inputs": ["src"]},
                    {"name": "out", "kind": "sink", "function": "print", "inputs": ["up"]},
                ],
            }
        )
    )
    trace_log = tmp_path / "tr.jsonl"
    assert (
        main(
            [
                "--config",
                str(_config(tmp_path, 1.0)),
                "run",
                str(path),
                "--trace-log",
                str(trace_log),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "out[0]: '49'" in captured.out and "finished in" in captured.out
    assert "stats at tcp://127.0.0.1:" in captured.err
    assert discover() == []  # the advertisement is gone with the run
    assert main(["trace", str(trace_log), "--limit", "1"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("trace ") and "4 hops" in shown and "finished by out[0]" in shown
    assert main(["trace", str(trace_log), "--json", "--limit", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 50 and all(json.loads(line)["hops"] for line in lines)


def _config(tmp_path: Path, rate: float) -> Path:
    cfg = tmp_path / "sage.yaml"
    cfg.write_text(yaml.safe_dump({"observability": {"trace_sample_rate": rate}}))
    return cfg


def test_run_json_and_bad_topology(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "clijson",
                "stats": None,
                "operators": [
                    {"name": "src", "kind": "source", "function": "range", "args": {"count": 10}},
                    {"name": "out", "kind": "sink", "function": "discard", "inputs": ["src"]},
                ],
            }
        )
    )
    assert main(["run", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {(i["operator"], i["received"], i["emitted"]) for i in summary["instances"]} == {
        ("src", 0, 10),
        ("out", 10, 0),
    }
    path.write_text("name: x\noperators:\n  - {name: a, kind: sauce, function: range}\n")
    assert main(["run", str(path)]) == 1
    assert "kind 'sauce' is not one of" in capsys.readouterr().err


def test_stats_top_and_trace_read_a_running_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    qd = QueueDescriptor("cli-q", "local", {"maxsize": 100})
    tracing.clear_recent()
    with StatsServer() as server:
        try:
            for i in range(10):
                qd.put(Packet(i))
            qd.flush()
            packet = Packet("traced")
            tracing.start_trace(packet)
            qd.put(packet)
            for _ in range(11):
                got = qd.get(timeout=5)
            tracing.finish(got, "cli")
            assert main(["stats", server.endpoint]) == 0
            out = capsys.readouterr().out
            assert "QUEUE" in out and "cli-q" in out and "producer+consumer" in out
            assert main(["stats", server.endpoint, "--json"]) == 0
            snap = json.loads(capsys.readouterr().out)
            (q,) = [q for p in snap["processes"] for q in p["queues"] if q["queue_id"] == "cli-q"]
            assert q["sent"] == 11 and q["received"] == 11
            assert main(["top", server.endpoint, "--once", "--interval", "0.05"]) == 0
            out = capsys.readouterr().out
            assert out.startswith("sage-zmq top") and "OUT/s" in out and "cli-q" in out
            assert main(["trace", server.endpoint]) == 0
            assert "finished by cli" in capsys.readouterr().out
            assert main(["trace", server.endpoint, "--id", "0" * 32]) == 1
        finally:
            qd.close()


def test_bad_endpoints_and_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "nonsense"]) == 1
    assert "malformed stats endpoint 'nonsense'" in capsys.readouterr().err
    assert main(["top", "tcp://127.0.0.1:1", "--once", "--timeout", "0.2"]) == 1
    assert "no answer from stats endpoint" in capsys.readouterr().err
    assert main(["trace", str(tmp_path / "none.jsonl")]) == 1
    assert "no trace log" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n')
    assert main(["trace", str(bad)]) == 1
    assert "bad.jsonl:1: not a trace record" in capsys.readouterr().err
    if not discover():
        assert main(["stats"]) == 1
        assert "no running topology advertises" in capsys.readouterr().err


def test_keys_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("sage_zmq.security") is None:
        assert main(["keys", "generate", str(tmp_path)]) == 1
        assert "'keys' is not available" in capsys.readouterr().err
        return
    code = main(["keys", "generate", str(tmp_path / "keys")])
    assert code == 0, capsys.readouterr()
    assert any((tmp_path / "keys").iterdir())
    # A failure is one line in the format every command uses.
    assert main(["keys", "generate", str(tmp_path / "keys")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sage-zmq: error: ") and "already exists" in err, err
    assert err.count("\n") == 1, err


def test_bench_is_delegated(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("sage_zmq.bench") is None:
        pytest.skip("sage_zmq.bench is not there yet")
    assert main(["bench", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_bench_refuses_a_plot_path_it_cannot_write_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    for path in (tmp_path / "missing-dir" / "x.png", tmp_path):
        assert main(["bench", "--quick", "--only", "core", "--plot", str(path)]) == 2
        err = capsys.readouterr().err
        assert "cannot write a file there" in err, err
    assert time.monotonic() - started < 10  # nothing was measured


def test_demo_quick(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("sage_zmq.demo") is None:
        assert main(["demo"]) == 1
        assert "'demo' is not available" in capsys.readouterr().err
        pytest.skip("sage_zmq.demo is not there yet")
    assert main(["demo", "--quick"]) == 0


@pytest.mark.parametrize("queue_type", ["tcp", "sage"])
def test_demo_runs_over_every_queue_type_it_offers(
    queue_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each worker creates (and so binds) its own input queue: a tcp queue created in the
    # demo's process would be bound there, and the workers could not get() from it.
    assert main(["demo", "--records", "3000", "--queue-type", queue_type]) == 0
    out = capsys.readouterr().out
    assert f"over '{queue_type}' queues" in out and "3,000 of 3,000 records" in out


def test_demo_paced(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    assert main(["demo", "--records", "3000", "--rate", "20000"]) == 0
    assert time.monotonic() - t0 >= 3000 / 20000  # the source kept to its schedule
    out = capsys.readouterr().out
    assert "paced at 20,000 rec/s" in out and "3,000 of 3,000 records" in out
    assert main(["demo", "--rate", "0"]) == 2  # argparse's usage error
    assert "--rate: must be a positive number" in capsys.readouterr().err
