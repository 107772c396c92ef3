"""A producer that reached another queue's consumer (a stale endpoint, a mixed-up config).

The consumer refuses its HELLO, which names the other queue, and with it every later frame of
that connection; the producer hears ``wrong_queue`` and its ``close()`` says so at once. Before,
only the HELLO was refused: the records after it reached the wrong application, and the
producer's ``close()`` reported them delivered.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from sage_zmq import Empty, QueueDescriptor
from sage_zmq.testing import close_quietly

_PRODUCER = """
import sys, time
from sage_zmq import DeliveryError, QueueDescriptor
qd = QueueDescriptor("mine", sys.argv[2], {"endpoint": sys.argv[1], "maxsize": 100})
for i in range(5):
    qd.put({"for": "mine", "i": i}, timeout=5)
started = time.monotonic()
try:
    qd.close(timeout=20)
except DeliveryError as exc:
    print(f"{time.monotonic() - started:.1f} {exc.undelivered} {exc}")
else:
    print("confirmed")
"""


@pytest.mark.parametrize("queue_type", ["tcp", "shm", "sage"])
def test_records_for_another_queue_are_refused_and_the_producer_told(queue_type: str) -> None:
    theirs = QueueDescriptor("theirs", queue_type)
    try:
        with pytest.raises(Empty):
            theirs.get(timeout=0)  # bound
        done = subprocess.run(
            [sys.executable, "-c", _PRODUCER, str(theirs.endpoint), queue_type],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        seconds, undelivered, message = done.stdout.strip().split(" ", 2)
        assert int(undelivered) == 5, done.stdout
        assert "serves another queue" in message and "'theirs'" in message, message
        assert float(seconds) < 10  # told, not left to wait out its 20 s
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            with pytest.raises(Empty):
                theirs.get(timeout=0.1)  # nothing of 'mine' reached this application
        assert theirs.statistics().rejected >= 1
    finally:
        close_quietly(theirs)


def test_a_foreign_connections_frames_are_refused_undecoded() -> None:
    # Decoding a foreign DATA frame would map its shm references and release them, as this
    # queue's, to whichever producer the previous frame came from.
    from types import SimpleNamespace

    from sage_zmq.queues._zmq import RouterInlet
    from sage_zmq.wire.codec import Codec
    from sage_zmq.wire.frame import Kind

    decoded: list[bytes] = []
    codec = Codec()
    real = codec.decode
    codec.decode = lambda frame: decoded.append(frame) or real(frame)  # type: ignore[method-assign]
    inlet: Any = SimpleNamespace(codec=codec, queue_id="theirs", _foreign={b"peer": "mine"})
    data, _, _ = Codec().encode_batch("p", 0, [1, 2])
    assert RouterInlet._corrects_queue(inlet, b"peer", data) is False
    assert decoded == []
    hello = Codec().encode_control(
        Kind.HELLO, {"producer": "p", "epoch": 0, "next_seq": 0, "queue": "theirs"}
    )
    assert RouterInlet._corrects_queue(inlet, b"peer", hello) is True  # it is ours after all
    assert inlet._foreign == {}
