"""The CLI's global options, option values and error reporting (exit 2: usage, 1: failure).

Most cases run ``sage-zmq`` in a subprocess: what is checked is what a user sees (exit code,
stdout, stderr) and what the processes a command starts receive through the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sage_zmq.cli import _command_position, main

PYTHON = sys.executable


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    for name in ("SAGE_ZMQ_CONFIG", "SAGE_ZMQ__OBSERVABILITY__LOG_LEVEL"):
        if env is None or name not in env:
            full_env.pop(name, None)  # the test's own settings only
    return subprocess.run(
        [PYTHON, "-m", "sage_zmq", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def _topology(tmp_path: Path, sink: str = "discard", count: int = 100) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "opts",
                "stats": None,
                "operators": [
                    {
                        "name": "src",
                        "kind": "source",
                        "function": "range",
                        "args": {"count": count},
                    },
                    {"name": "out", "kind": "sink", "function": sink, "inputs": ["src"]},
                ],
            }
        )
    )
    return path


def test_the_command_is_found_after_global_options_with_their_values() -> None:
    assert _command_position(["--config", "c.yaml", "demo", "--records", "5"]) == 2
    assert _command_position(["--log-level", "INFO", "keys", "generate", "d"]) == 2
    assert _command_position(["--log-level=INFO", "--config", "c", "bench"]) == 3
    assert _command_position(["--help"]) is None


@pytest.mark.parametrize(
    "head",
    [["--config", "{cfg}"], ["--log-level", "INFO"], ["--config", "{cfg}", "--log-level", "INFO"]],
)
def test_space_separated_global_options_before_delegated_commands(
    head: list[str], tmp_path: Path
) -> None:
    # '--config FILE demo' failed with KeyError: 'demo', and '--log-level INFO demo --records
    # 1000' with "unrecognized arguments: --records 1000" (the '=' form worked).
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("performance:\n  batch_size: 10\n")
    head = [h.format(cfg=cfg) for h in head]
    done = _cli(*head, "demo", "--records", "500")
    assert done.returncode == 0, done.stderr
    assert "500 of 500 records" in done.stdout
    done = _cli(*head, "keys", "generate", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    assert any((tmp_path / "keys").iterdir())
    done = _cli(*head, "bench", "--only", "nosuch")
    assert done.returncode == 2 and "invalid choice: 'nosuch'" in done.stderr


def test_log_level_reaches_the_processes_a_command_starts(tmp_path: Path) -> None:
    # Only the CLI's own process used to get it: instances of `run` and the demo's workers
    # logged at WARNING (while --config with a log level, or the environment, reached them).
    topo = _topology(tmp_path)
    done = _cli("--log-level", "INFO", "run", str(topo))
    assert done.returncode == 0, done.stderr
    pids = {
        line.split("[", 1)[1].split("]", 1)[0]
        for line in done.stderr.splitlines()
        if " INFO sage_zmq" in line
    }
    assert len(pids) >= 2, done.stderr  # the source and the sink, each in its own process
    done = _cli("--log-level", "INFO", "demo", "--records", "500")
    assert done.returncode == 0, done.stderr
    workers = [
        line
        for line in done.stderr.splitlines()
        if " INFO sage_zmq" in line and "demo-worker-" in line
    ]
    assert workers, done.stderr


def test_global_options_do_not_outlive_an_in_process_call(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("performance:\n  batch_size: 10\n")
    before = {
        k: os.environ.get(k) for k in ("SAGE_ZMQ_CONFIG", "SAGE_ZMQ__OBSERVABILITY__LOG_LEVEL")
    }
    assert (
        main(["--config", str(cfg), "--log-level", "ERROR", "run", str(_topology(tmp_path))]) == 0
    )
    after = {k: os.environ.get(k) for k in before}
    assert after == before


@pytest.mark.parametrize(
    "args",
    [
        ["stats", "--timeout", "-1", "tcp://127.0.0.1:1"],
        ["top", "--once", "--timeout", "-1", "tcp://127.0.0.1:1"],
        ["trace", "--timeout", "-1", "tcp://127.0.0.1:1"],
        ["stats", "--timeout", "nan", "tcp://127.0.0.1:1"],
        ["top", "--once", "--timeout", "nan", "tcp://127.0.0.1:1"],
        ["trace", "--timeout", "nan", "tcp://127.0.0.1:1"],
        ["top", "--interval", "0", "--once", "tcp://127.0.0.1:1"],
        ["top", "--interval", "inf", "--once", "tcp://127.0.0.1:1"],
        ["top", "--count", "-1", "tcp://127.0.0.1:1"],
        ["trace", "--limit", "-1", "x.jsonl"],
        ["run", "--timeout", "-1", "x.yaml"],
        ["run", "--timeout", "nan", "x.yaml"],
        ["demo", "--rate", "0"],
        ["demo", "--rate", "nan"],
        ["demo", "--interval", "nan"],
        ["demo", "--interval", "-1"],
        ["demo", "--interval", "0"],
        ["demo", "--records", "0"],
        ["--log-level", "LOUD", "stats"],
    ],
)
def test_bad_option_values_are_usage_errors(args: list[str]) -> None:
    # They hung (a negative timeout is "forever" to ZeroMQ's poll), raised a traceback (nan),
    # flooded the terminal (demo --interval 0), or exited 1 like a failure (top --interval 0).
    done = _cli(*args, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("sage-zmq")  # "...: error: ..."
    assert done.stdout == ""


def test_a_broken_configuration_is_one_line_after_usage_errors(tmp_path: Path) -> None:
    env = {"SAGE_ZMQ_CONFIG": str(tmp_path / "nonexistent.yaml")}
    for args in (
        ["stats", "tcp://127.0.0.1:1"],
        ["keys", "generate", str(tmp_path / "k")],
        ["bench", "--only", "core", "--quick"],
        ["demo", "--records", "10"],
        ["run", str(_topology(tmp_path))],
    ):
        done = _cli(*args, env=env, timeout=30)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.strip().splitlines() == [
            f"sage-zmq: error: config file '{env['SAGE_ZMQ_CONFIG']}' (named by "
            "SAGE_ZMQ_CONFIG) does not exist; check the path"
        ], args
    assert not (tmp_path / "k").exists()  # nothing was done
    # The usage error wins: it was reported as the configuration's error before.
    done = _cli("keys", "generate", env=env, timeout=30)
    assert done.returncode == 2 and "required: directory" in done.stderr
    done = _cli("demo", "--rate", "0", env=env, timeout=30)
    assert done.returncode == 2 and "--rate" in done.stderr
    done = _cli("--config", str(tmp_path / "missing.yaml"), "stats", timeout=30)
    assert done.returncode == 1
    assert f"config file '{tmp_path / 'missing.yaml'}' does not exist" in done.stderr


def test_trace_errors_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "tr.jsonl"
    log.write_text(json.dumps({"trace_id": "a", "time": 1.0, "hops": []}) + "\n")
    assert main(["trace", str(log), "--id", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "trace nope not found" in captured.err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["trace", str(empty), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no traces yet" in captured.err


def test_run_json_stdout_is_only_the_json(tmp_path: Path) -> None:
    # The print sink's lines came first on stdout: `run --json | jq` could not parse it.
    done = _cli("run", str(_topology(tmp_path, sink="print", count=20)), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {i["operator"] for i in summary["instances"]} == {"src", "out"}
    assert "out[0]: 19" in done.stderr
    done = _cli("run", str(_topology(tmp_path, sink="print", count=20)))
    assert "out[0]: 19" in done.stdout  # without --json the sink still prints to stdout
