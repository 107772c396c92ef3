"""Producers that die without CLOSE stop counting, and an idle consumer's background tick
slows down: what a long-lived consumer in a big pipeline needs."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from sage_zmq import Empty, QueueDescriptor
from sage_zmq.testing import close_quietly, wait_until

pytestmark = pytest.mark.timeout(120)

_PUT_AND_DIE = (
    "import os, signal, sys, time, sage_zmq\n"
    "qd = sage_zmq.QueueDescriptor.from_json(sys.argv[1])\n"
    "qd.put('from a producer about to die')\n"
    "started = time.monotonic()\n"
    "qd._handle().producer(qd).close(timeout=10)  # delivered; the CLOSE goes too\n"
    "print(time.monotonic() - started, flush=True)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)
_PUT_AND_DIE_UNCLOSED = (
    "import os, signal, sys, sage_zmq\n"
    "qd = sage_zmq.QueueDescriptor.from_json(sys.argv[1])\n"
    "qd.put('from a producer about to die')\n"
    "sys.stdin.readline()  # the parent has the record: now die without CLOSE\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)


def _consumer(qd: QueueDescriptor) -> Any:
    return qd._handle().consumer(qd)


@pytest.mark.parametrize("queue_type", ["shm", "tcp", "sage"])
def test_producers_killed_without_close_stop_shrinking_the_live_ones_window(
    queue_type: str,
) -> None:
    # The share of the window is maxsize // producers still there; a producer SIGKILLed
    # never sends CLOSE, and used to count for good (60 dead producers cut a live one from
    # 56k to 4k records/s, permanently).
    qd = QueueDescriptor(None, queue_type, {"maxsize": 60})
    try:
        with contextlib.suppress(Empty):
            qd.get_nowait()  # bound before the producers start
        for _ in range(3):
            proc = subprocess.Popen(
                [sys.executable, "-c", _PUT_AND_DIE_UNCLOSED, qd.to_json()],
                stdin=subprocess.PIPE,
                text=True,
            )
            try:
                assert qd.get(timeout=30) == "from a producer about to die"
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.communicate("die\n", timeout=30)
            assert proc.returncode == -signal.SIGKILL
        # A producer that stays (this process) and runs beyond its share: the consumer
        # looks for gone producers only while one waits for the share they hold.
        for i in range(20):
            qd.put(i, timeout=30)
        consumer = _consumer(qd)
        wait_until(
            lambda: consumer._share() == 60,
            timeout=15,
            what="the live producer's share to be the whole window again",
        )
        gone = [u.gone for u in consumer._ups.values()]
        assert sorted(gone) == [False, True, True, True], gone
        assert qd.statistics().producers == 4  # still known: they were there
        assert [qd.get(timeout=30) for _ in range(20)] == list(range(20))
    finally:
        close_quietly(qd)


def test_an_idle_consumer_ticks_less_often_and_a_get_restores_the_pace() -> None:
    qd = QueueDescriptor(None, "shm")
    try:
        with contextlib.suppress(Empty):
            qd.get_nowait()
        consumer = _consumer(qd)
        wait_until(lambda: consumer._idle_ticks >= 4, timeout=10, what="ticks with nothing to do")
        qd.put("x")
        assert qd.get(timeout=10) == "x"
        assert consumer._idle_ticks <= 1  # the get brought the background tick back
    finally:
        close_quietly(qd)


@pytest.mark.parametrize("queue_type", ["shm", "sage"])
def test_a_consumer_blocked_in_get_counts_as_idle(queue_type: str) -> None:
    # The usual idle state of a pipeline stage: its thread waits in get() (holding the lock
    # the tick would take). The tick must back off then too.
    qd = QueueDescriptor(None, queue_type)
    try:
        with contextlib.suppress(Empty):
            qd.get_nowait()
        consumer = _consumer(qd)
        waiter = threading.Thread(target=lambda: qd.get(timeout=30))
        waiter.start()
        try:
            wait_until(lambda: consumer._idle_ticks >= 4, timeout=10, what="an idle tick pace")
        finally:
            qd.put("wake")
            waiter.join(30)
        assert not waiter.is_alive()
    finally:
        close_quietly(qd)


@pytest.mark.parametrize("queue_type", ["shm", "tcp"])  # sage's close waits for consumption
def test_a_closing_producer_gets_its_receipt_from_an_idle_consumer(queue_type: str) -> None:
    # The receipt comes from the consumer's background tick (the application is not in
    # get): backing off while idle must not cost a producer's close more than a tick or two.
    qd = QueueDescriptor(None, queue_type)
    try:
        with contextlib.suppress(Empty):
            qd.get_nowait()
        wait_until(lambda: _consumer(qd)._idle_ticks >= 5, timeout=10, what="an idle consumer")
        done = subprocess.run(
            [sys.executable, "-c", _PUT_AND_DIE, qd.to_json()],
            timeout=60,
            capture_output=True,
            text=True,
        )
        assert done.returncode == -signal.SIGKILL, done.stderr
        # The receipt came within a few ticks of the slowest pace (0.16 s), not at the
        # close's timeout.
        assert float(done.stdout) < 2.0, done.stdout
        assert qd.get(timeout=10) == "from a producer about to die"
    finally:
        close_quietly(qd)


def test_a_consumer_that_binds_late_gets_what_was_put_without_waiting_out_a_backoff() -> None:
    # The producer's connect fails until the consumer binds (at its first get); libzmq's
    # retries backed off to 2 s, so a get long after the put waited up to 2 s for the next.
    qd = QueueDescriptor(None, "shm")
    try:
        qd.put("early")
        time.sleep(3.2)  # the scenario, not a handshake: the consumer comes this late
        started = time.monotonic()
        assert qd.get(timeout=10) == "early"
        assert time.monotonic() - started < 1.5  # retries every 0.25 s on ipc (was ~1.9 s)
    finally:
        close_quietly(qd)
