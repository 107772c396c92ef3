"""How `sage-zmq run` ends: SIGTERM, SIGKILL of the runner, Ctrl-C, --timeout.

A stopped run must leave nothing behind: no instance process (some were busy for good), no
ipc socket file, no stats advertisement; and its instances must stop without tripping over
their own queues ("rejected a frame from peer 535a0103...": the bytes of a DATA frame read
as a routing id, after an exception cut a ZeroMQ message in two).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sage_zmq import _runtime

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to find the instance processes"
)
PYTHON = sys.executable


def _long_topology(tmp_path: Path) -> Path:
    # Long enough to be stopped while every stage is busy: the source would run for minutes.
    path = tmp_path / "long.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "sigtest",
                "queue_type": "shm",
                "operators": [
                    {
                        "name": "src",
                        "kind": "source",
                        "function": "words",
                        "args": {"count": 50_000_000},
                    },
                    {
                        "name": "up",
                        "kind": "map",
                        "function": "upper",
                        "parallelism": 2,
                        "inputs": ["src"],
                    },
                    {
                        "name": "count",
                        "kind": "keyed",
                        "function": "count_by_key",
                        "parallelism": 2,
                        "inputs": ["up"],
                    },
                    {"name": "out", "kind": "sink", "function": "discard", "inputs": ["count"]},
                ],
            }
        )
    )
    return path


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of stat, after "pid (comm)": the parent pid
            found.add(int(entry))
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie has exited; its parent has not reaped it yet
            alive.add(pid)
    return alive


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], set[int], set[str]]]:
    """A `sage-zmq run` of a long topology, started and busy; its instances' pids."""
    runtime = _runtime.runtime_dir()
    before = set(os.listdir(runtime))
    proc = subprocess.Popen(
        [PYTHON, "-m", "sage_zmq", "run", str(_long_topology(tmp_path))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # like a service: no terminal's Ctrl-C reaches the group
    )
    children: set[int] = set()
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while line and "running; stats at" not in line:
            line = proc.stderr.readline()
        assert line, "the run did not start"
        time.sleep(1.0)  # records flowing through every stage
        children = _children(proc.pid)
        assert len(children) >= 6  # six instances (and multiprocessing's resource tracker)
        yield proc, children, before
    finally:
        for pid in _alive(children) | ({proc.pid} if proc.poll() is None else set()):
            os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def _left_behind(runtime_before: set[str]) -> set[str]:
    return set(os.listdir(_runtime.runtime_dir())) - runtime_before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_runner_stops_its_pipeline(
    sig: signal.Signals, running: tuple[subprocess.Popen[str], set[int], set[str]]
) -> None:
    # SIGTERM used to end the runner alone: 7 of 7 children were still alive 10 s later,
    # some busy, with their ipc socket files and the stats-PID.json advertisement.
    proc, children, before = running
    os.kill(proc.pid, sig)
    assert proc.wait(15) == 128 + sig
    assert _wait_gone(children, 5) == set()
    assert _left_behind(before) == set()
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "rejected a frame" not in err and "Traceback" not in err


def test_instances_stop_when_the_runner_is_killed(
    running: tuple[subprocess.Popen[str], set[int], set[str]],
) -> None:
    proc, children, before = running
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # Each notices within 0.5 s that its parent changed, and stops (5 s at most).
    assert _wait_gone(children, 10) == set()
    # Their own socket files go with them; the runner's advertisement (it could not remove
    # it) is dropped by the next discover(), which finds its pid dead.
    left = _left_behind(before)
    assert left <= {f"stats-{proc.pid}.json"}, left
    from sage_zmq.observe.stats_server import discover

    assert all(found["pid"] != proc.pid for found in discover())
    assert _left_behind(before) == set()


def test_run_timeout_is_bounded_and_quiet(tmp_path: Path) -> None:
    # `run --timeout 3` took 8.4-13.8 s, and instances logged rejected frames as they stopped.
    start = time.monotonic()
    done = subprocess.run(
        [PYTHON, "-m", "sage_zmq", "run", str(_long_topology(tmp_path)), "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 1
    assert "timed out waiting for" in done.stderr
    assert "rejected a frame" not in done.stderr, done.stderr
    # 3 s, the interpreter's start, and at most the 3 s stop grace (it takes ~1 s).
    assert elapsed < 3 + 6, elapsed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_demo_leaves_no_process_behind(sig: signal.Signals) -> None:
    # The demo's source and workers outlived a SIGTERM'd (or killed) demo: the source kept
    # sending, the workers kept waiting.
    runtime = _runtime.runtime_dir()
    before = set(os.listdir(runtime))
    proc = subprocess.Popen(
        [PYTHON, "-m", "sage_zmq", "demo", "--records", "5000000", "--rate", "50000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    children: set[int] = set()
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the banner
        assert "records" in proc.stdout.readline()  # the first progress line: all running
        children = _children(proc.pid)
        assert len(children) >= 3  # the source and two workers
        os.kill(proc.pid, sig)
        proc.wait(15)
        assert _wait_gone(children, 5) == set()
        left = _left_behind(before)
        if sig == signal.SIGTERM:
            assert proc.returncode == 130  # handled like Ctrl-C
            rest = proc.stdout.read()
            assert "lost in transit" not in rest and "Traceback" not in rest, rest
            assert left == set()
        else:
            # The workers' socket files go with them; the sink's was the killed process's own.
            assert all(name.startswith("demo-sink-") for name in left), left
            for name in left:
                os.unlink(os.path.join(runtime, name))
    finally:
        for pid in _alive(children) | ({proc.pid} if proc.poll() is None else set()):
            os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
