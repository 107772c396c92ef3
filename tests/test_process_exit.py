"""What a process that exits without ``close()`` is told (``sage_zmq.shutdown`` at exit).

At exit the runtime closes every queue with a 0 s timeout. A producer waits there for no
CREDIT, so it used to warn that records were "not confirmed" even when the consumer in the
same process had already returned them from ``get``: every short script that put and got its
own records printed one warning per queue. It now asks that consumer directly; records that
nobody read are still reported.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from sage_zmq import Empty
from sage_zmq import testing as conf


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize("queue_type", ["tcp", "shm", "sage"])
def test_records_the_process_got_itself_are_not_reported_at_exit(queue_type: str) -> None:
    stderr = _run(
        "import sage_zmq\n"
        f"qd = sage_zmq.QueueDescriptor(queue_type={queue_type!r})\n"
        "for i in range(3):\n"
        "    qd.put(i)\n"
        "assert [qd.get(timeout=10) for _ in range(3)] == [0, 1, 2]\n"
    )
    assert "not confirmed" not in stderr, stderr


def test_records_nobody_read_are_reported_at_exit() -> None:
    stderr = _run(
        "import sage_zmq\n"
        "qd = sage_zmq.QueueDescriptor(queue_type='shm')\n"
        "qd.put('read')\n"
        "assert qd.get(timeout=10) == 'read'\n"
        "other = sage_zmq.QueueDescriptor(queue_type='tcp')\n"
        "other.put('never read')\n"
    )
    assert "1 record put was not confirmed" in stderr, stderr
    assert stderr.count("not confirmed") == 1, stderr


@pytest.mark.parametrize("queue_type", ["tcp", "shm", "sage"])
def test_records_another_process_got_are_not_reported_at_exit(queue_type: str) -> None:
    # The consumer (this process) has every record before the producer's process exits
    # without close(): its reports wait in the producer's socket, which the 0 s close at exit
    # used to count without reading.
    from sage_zmq import EndOfStream, QueueDescriptor

    qd = QueueDescriptor(queue_type=queue_type, metadata={"maxsize": 100})
    with contextlib.suppress(Empty):
        qd.get_nowait()  # bound before the producer starts
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, sage_zmq\n"
            "qd = sage_zmq.QueueDescriptor.from_json(sys.argv[1])\n"
            "for i in range(10):\n"
            "    qd.put(i)\n"
            "qd.put(sage_zmq.EndOfStream())\n"
            "sys.stdin.readline()\n"
            # The consumer's reports have reached this process (not read: that is exit's job).
            "link = qd._handle().producer(qd)._link\n"
            "assert getattr(link, 'inner', link).sock.poll(10_000)\n",  # then exits, no close()
            qd.to_json(),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        got = []
        while not isinstance(item := qd.get(timeout=30), EndOfStream):
            got.append(item)
        assert got == list(range(10))
        # The consumer has told the producer (a CREDIT is in the producer's socket).
        consumer = qd._handle().consumer(qd)
        conf.wait_until(
            lambda: all(u.reported >= u.acked for u in consumer._ups.values()),
            what="the consumer's report of what it consumed",
        )
        _, stderr = proc.communicate("exit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        qd.close()
    assert proc.returncode == 0, stderr
    assert "not confirmed" not in stderr, stderr


_BLOCKED = {
    # get: its consumer's lock is held (a get waits inside it); put: it waits for credit
    "get": (
        "def blocked():\n"
        "    c = qd._handle()._consumer\n"
        "    if c is None or c._lock.acquire(blocking=False) and not c._lock.release():\n"
        "        return False\n"
        "    return True\n"
    ),
    "put": "def blocked():\n    return qd.statistics().credit_waits > 0\n",
}


@pytest.mark.parametrize("queue_type", ["local", "shm", "tcp"])
@pytest.mark.parametrize("side", ["get", "put"])
def test_a_daemon_thread_blocked_on_a_queue_does_not_hold_up_exit(
    queue_type: str, side: str
) -> None:
    """As with queue.Queue: the process exits at once and quietly (it hung: close at exit
    waited for the lock the blocked call held)."""
    call = "qd.get()" if side == "get" else "[qd.put(i) for i in range(100)]"
    stderr = _run(
        "import threading, sage_zmq, sage_zmq.testing\n"
        f"qd = sage_zmq.QueueDescriptor(queue_type={queue_type!r}, metadata={{'maxsize': 2}})\n"
        "qd.qsize()\n"  # this process's consumer end is open before the thread starts
        + _BLOCKED[side]
        + f"threading.Thread(target=lambda: {call}, daemon=True).start()\n"
        "sage_zmq.testing.wait_until(blocked, 10, 'the call to block')\n"
    )
    assert "Traceback" not in stderr, stderr
