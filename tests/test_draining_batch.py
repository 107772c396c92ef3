"""A consumer reads a :class:`DrainingBatch` as it reads a list, letting go of each record."""

from __future__ import annotations

import gc
import weakref
from operator import length_hint
from typing import Any

from sage_zmq.packet import EndOfStream
from sage_zmq.queues._consumer import Consumer
from sage_zmq.queues.base import Credit, DrainingBatch


class _Record:
    def __init__(self, n: int) -> None:
        self.n = n


class _ScriptedInlet:
    """Hands the consumer the events it was given, then nothing."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.events = events
        self.credits: list[Credit] = []

    def recv(self, timeout: float) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        return events

    def send_credit(self, peer: Any, credit: Credit) -> bool:
        self.credits.append(credit)
        return False

    def close(self) -> None:
        pass


def test_the_batch_behaves_as_the_consumer_needs() -> None:
    batch = DrainingBatch([1, 2, 3, 4])
    assert len(batch) == 4 and batch[0] == 1
    tail = batch[2:]
    assert isinstance(tail, DrainingBatch) and list(tail) == [3, 4] and len(tail) == 0
    it = iter(batch)
    assert next(it) == 1 and length_hint(it) == 3 and len(batch) == 3
    assert list(it) == [2, 3, 4] and next(it, None) is None


def test_a_consumer_lets_go_of_each_record_as_it_is_taken() -> None:
    records = [_Record(i) for i in range(4)]
    alive = [weakref.ref(r) for r in records]
    inlet = _ScriptedInlet([])
    inlet.events = [
        ("hello", inlet, b"p", {"producer": "up", "next_seq": 0}),
        ("data", inlet, b"p", "up", 0, DrainingBatch(records[:3]), 30),
        # Resent from seq 1: the consumer keeps only what it has not seen (records[3]).
        ("data", inlet, b"p", "up", 1, DrainingBatch(records[1:]), 30),
        ("end", inlet, b"p", "up", 4),
    ]
    del records
    consumer = Consumer([inlet], queue_id="q", queue_type="test", maxsize=10)
    try:
        taken = [consumer.get(timeout=1).n]
        gc.collect()
        assert alive[0]() is None  # dropped by the application: not held by the batch
        assert consumer.qsize() == 3
        taken += [consumer.get(timeout=1).n for _ in range(3)]
        assert taken == [0, 1, 2, 3]
        assert consumer.get(timeout=1) == EndOfStream()
        assert consumer.statistics().extra["gaps"] == 0
    finally:
        consumer.close()
