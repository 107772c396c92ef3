"""ipc socket files that killed consumers leave behind are swept by a later process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_zmq import _runtime

pytestmark = pytest.mark.timeout(60)


def _left_behind(path: Path) -> None:
    """A socket file nobody listens on: what a consumer killed by a signal leaves."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_only_old_socket_files_nobody_listens_on_are_removed(tmp_path: Path) -> None:
    stale, young, other = tmp_path / "dead-1.sock", tmp_path / "young-1.sock", tmp_path / "x.txt"
    _left_behind(stale)
    _left_behind(young)  # may be a consumer between its bind and its listen
    other.write_text("not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(tmp_path / "live-1.sock"))
        live.listen()
        for path in (stale, tmp_path / "live-1.sock", other):
            _age(path, 2 * _runtime.STALE_AFTER)
        assert _runtime.sweep_stale_ipc_files(str(tmp_path)) == [str(stale)]
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "live-1.sock",
            "x.txt",
            "young-1.sock",
        ]


def test_a_killed_consumers_socket_file_goes_when_a_later_process_uses_queues(
    tmp_path: Path,
) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "SAGE_ZMQ_RUNTIME_DIR": str(runtime)}
    consumer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, sage_zmq\n"
            "qd = sage_zmq.QueueDescriptor(queue_type='shm')\n"
            "try:\n"
            "    qd.get_nowait()\n"
            "except sage_zmq.Empty:\n"
            "    pass\n"
            "print(qd.endpoint, flush=True)\n"
            "sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert consumer.stdout is not None
        path = Path(consumer.stdout.readline().strip().removeprefix("ipc://"))
        assert path.exists()
    finally:
        consumer.send_signal(signal.SIGKILL)
        consumer.communicate(timeout=30)
    assert path.exists()  # nobody removed it: the consumer was killed
    _age(path, 2 * _runtime.STALE_AFTER)
    later = subprocess.run(
        [sys.executable, "-c", "import sage_zmq; sage_zmq.QueueDescriptor(queue_type='shm')"],
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert later.returncode == 0, later.stderr
    assert not path.exists()


def test_a_relative_ipc_endpoint_is_refused_at_creation() -> None:
    from sage_zmq import DescriptorError, QueueDescriptor

    with pytest.raises(DescriptorError, match=r"relative path.*absolute"):
        QueueDescriptor("rel", "shm", {"endpoint": "ipc://rel.sock"})


def test_a_relative_runtime_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAGE_ZMQ_RUNTIME_DIR", "rt")
    assert _runtime.runtime_dir() == str(tmp_path / "rt")  # endpoints derived here travel


def test_a_runtime_dir_that_cannot_be_made_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sage_zmq import DescriptorError

    monkeypatch.setenv("SAGE_ZMQ_RUNTIME_DIR", str(tmp_path / "missing" / "rt"))
    with pytest.raises(
        DescriptorError, match=r"cannot create the runtime directory.*SAGE_ZMQ_RUNTIME_DIR"
    ):
        _runtime.runtime_dir()


def test_a_persist_path_that_is_not_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    from sage_zmq import QueueDescriptor, SageZmqError
    from sage_zmq.testing import close_quietly

    plain_file = tmp_path / "file"
    plain_file.write_text("")
    qd = QueueDescriptor(None, "sage", {"persist": str(plain_file)})
    try:
        with pytest.raises(SageZmqError, match=r"write-ahead log.*metadata\['persist'\]"):
            qd.put(1)
    finally:
        close_quietly(qd)


def test_a_runtime_dir_too_long_for_ipc_paths_is_refused_before_it_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sage_zmq import DescriptorError, QueueDescriptor

    long_dir = tmp_path / ("d" * 90)
    monkeypatch.setenv("SAGE_ZMQ_RUNTIME_DIR", str(long_dir))
    with pytest.raises(DescriptorError, match="too long for ipc socket paths"):
        QueueDescriptor(queue_type="shm")
    assert not long_dir.exists()  # an empty directory was left behind
