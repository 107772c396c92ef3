"""What a process that exits without ``close()`` is told (``sage_zmq.shutdown`` at exit).

At exit the runtime closes every queue with a 0 s timeout. A producer waits there for no
CREDIT, so it used to warn that records were "not confirmed" even when the consumer in the
same process had already returned them from ``get``: every short script that put and got its
own records printed one warning per queue. It now asks that consumer directly; records that
nobody read are still reported.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


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
    assert "1 records put were not confirmed" in stderr, stderr
    assert stderr.count("not confirmed") == 1, stderr
