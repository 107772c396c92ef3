"""With ``persist``, a record counts as consumed once the next is asked for, or the queue
closes: never a whole batch at once. Two ways lost the rest of a batch being read: a close
that counted the whole batch, and a look by a producer in the same process (``assist``)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from sage_zmq import Empty, QueueDescriptor
from sage_zmq.testing import close_quietly

_PRODUCER = """
import sys
from sage_zmq import QueueDescriptor
qd = QueueDescriptor.from_json(sys.argv[1])
for i in range(100):
    qd.put(i, timeout=10)
qd.close(timeout=30)
print("confirmed", flush=True)
"""


def _drain(qd: QueueDescriptor, want: int, seconds: float = 10.0) -> list[int]:
    got: list[int] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        with contextlib.suppress(Empty):
            got.append(qd.get(timeout=0.5))
    return got


def test_close_counts_only_what_was_taken_of_the_batch(tmp_path: Path) -> None:
    qd = QueueDescriptor("pq", "sage", {"persist": str(tmp_path), "batch_size": 1000})
    again = None
    try:
        with contextlib.suppress(Empty):
            qd.get(timeout=0.05)  # bound before the producer starts
        producer = subprocess.Popen(
            [sys.executable, "-c", _PRODUCER, qd.to_json()], stdout=subprocess.PIPE, text=True
        )
        try:
            first = [qd.get(timeout=10) for _ in range(5)]
            consumer = qd._handle().consumer(qd)
            assert consumer._cur_end > 5, "the test needs a batch larger than what was read"
            qd.close()
            again = QueueDescriptor.from_json(qd.to_json())
            rest = _drain(again, 95)
            again.close()  # closing counts the record in hand: the producer may finish
            out, _ = producer.communicate(timeout=60)
        finally:
            if producer.poll() is None:
                producer.kill()
                producer.wait()
        assert first == [0, 1, 2, 3, 4]
        assert rest == list(range(5, 100))  # nothing of the batch was counted consumed unread
        assert out.strip() == "confirmed"
    finally:
        close_quietly(*(q for q in (qd, again) if q is not None))


def test_a_look_from_a_producer_beside_the_consumer_keeps_the_batch(tmp_path: Path) -> None:
    qd = QueueDescriptor(None, "sage", {"persist": str(tmp_path)})
    try:
        for i in range(50):
            qd.put(i)
        qd.flush()
        consumer = qd._handle().consumer(qd)
        taken = [qd.get(timeout=5)]
        while consumer._cur_end <= len(taken):
            taken.append(qd.get(timeout=5))
        consumer.assist()  # what a producer waiting in this process does
        assert qd.qsize() == 50 - len(taken)  # the rest of the batch counts as waiting
        assert taken + _drain(qd, 50 - len(taken)) == list(range(50))
    finally:
        close_quietly(qd)
