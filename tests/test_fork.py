"""A descriptor used before a fork: the child opens its own end (multiprocessing's default
start method on Linux before Python 3.14 is fork)."""

from __future__ import annotations

import multiprocessing
import sys

import pytest

from sage_zmq import QueueDescriptor
from sage_zmq.errors import DescriptorError
from sage_zmq.testing import close_quietly

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform != "linux", reason="fork start method"),
]


def _child_puts(qd: QueueDescriptor) -> None:
    try:
        for i in range(3):
            qd.put(f"child-{i}", timeout=5)
        qd.close(timeout=5)
    except DescriptorError:
        sys.exit(3)


@pytest.mark.parametrize("qtype", ["shm", "tcp"])
def test_a_forked_child_of_a_producer_delivers_its_own_records(qtype: str) -> None:
    qd = QueueDescriptor(None, qtype, {"maxsize": 100})
    try:
        qd.put("parent")  # the parent's producer is open (and bound to qd) before the fork
        assert qd.get(timeout=5) == "parent"
        child = multiprocessing.get_context("fork").Process(target=_child_puts, args=(qd,))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert [qd.get(timeout=10) for _ in range(3)] == ["child-0", "child-1", "child-2"]
    finally:
        close_quietly(qd)


def test_a_used_local_queue_is_refused_in_a_forked_child() -> None:
    qd = QueueDescriptor(None, "local", {"maxsize": 100})
    try:
        qd.put("parent")
        child = multiprocessing.get_context("fork").Process(target=_child_puts, args=(qd,))
        child.start()
        child.join(30)
        assert child.exitcode == 3  # DescriptorError: it would have used a private copy
    finally:
        close_quietly(qd)
