"""The ``sage`` queue (and ``ack``/``persist`` on ``shm``/``tcp``): the queue contract, options,
persistence in one process, and the failover hooks."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sage_zmq import DescriptorError, Empty, QueueDescriptor
from sage_zmq import testing as conf
from sage_zmq.flow.reliable import ReliableConsumer, ReliableProducer, persist_paths
from sage_zmq.flow.wal import WalCorruptionError
from sage_zmq.packet import EndOfStream
from sage_zmq.queues._consumer import Consumer
from sage_zmq.queues._producer import Producer

FAST = {
    "heartbeat_interval": 0.1,
    "liveness": 3,
    "ack_timeout": 0.2,
    "reconnect_initial": 0.02,
    "reconnect_max": 0.2,
}
FLAVOURS: dict[str, tuple[str, dict[str, Any]]] = {
    "sage-ipc": ("sage", {}),
    "sage-tcp": ("sage", {"transport": "tcp"}),
    "shm-ack": ("shm", {"ack": True}),
    "tcp-ack": ("tcp", {"ack": True}),
}


@pytest.fixture(params=sorted(FLAVOURS))
def make(request: pytest.FixtureRequest) -> conf.DescriptorFactory:
    qtype, meta = FLAVOURS[request.param]
    return conf.descriptor_factory(qtype, **FAST, **meta)


def _producer(qd: QueueDescriptor) -> Any:
    return qd._handle().producer(qd)


def _consumer(qd: QueueDescriptor) -> Any:
    return qd._handle().consumer(qd)


# ------------------------------------------------------------------------------ the contract
def test_fifo_per_producer(make: conf.DescriptorFactory) -> None:
    conf.check_fifo_per_producer(make, producers=3, n=2000)


def test_backpressure(make: conf.DescriptorFactory) -> None:
    conf.check_backpressure(make)


def test_timeouts(make: conf.DescriptorFactory) -> None:
    conf.check_timeouts(make)


def test_end_of_stream(make: conf.DescriptorFactory) -> None:
    conf.check_end_of_stream(make, n=300)


def test_records_of_every_kind(make: conf.DescriptorFactory) -> None:
    conf.check_records(make)


def test_inspection(make: conf.DescriptorFactory) -> None:
    conf.check_inspection(make)


def test_close_without_consumer_is_a_delivery_error(make: conf.DescriptorFactory) -> None:
    conf.check_delivery_error(make)


def test_unencodable_record() -> None:
    conf.check_unencodable_record(conf.descriptor_factory("sage", **FAST), n=300)


def test_spawned_producers() -> None:
    conf.check_process_producers(conf.descriptor_factory("sage", **FAST), n=3000)


def test_spawned_consumer() -> None:
    conf.check_spawned_consumer(conf.descriptor_factory("sage", **FAST), n=2000)


@pytest.mark.parametrize(
    ("qtype", "meta", "reliable"),
    [
        ("sage", {}, True),
        ("sage", {"transport": "tcp"}, True),
        ("tcp", {"ack": True}, True),
        ("shm", {"ack": True}, True),
        ("shm", {}, False),
        ("tcp", {}, False),
    ],
)
def test_ends_are_reliable_and_plain_queues_are_not(
    qtype: str, meta: dict[str, Any], reliable: bool
) -> None:
    qd = QueueDescriptor(None, qtype, {**FAST, **meta, "maxsize": 10})
    try:
        qd.put(1, timeout=conf.GET_TIMEOUT)
        assert qd.get(timeout=conf.GET_TIMEOUT) == 1
        p, c = _producer(qd), _consumer(qd)
        assert isinstance(p, Producer) and isinstance(c, Consumer)
        assert isinstance(c, ReliableConsumer) is reliable, (qtype, meta)
        assert isinstance(p, ReliableProducer) is reliable, (qtype, meta)
    finally:
        qd.close()


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"transport": "udp"}, "'ipc' or 'tcp'"),
        ({"endpoint": "http://x"}, "ipc:// or tcp://"),
        ({"endpoint": "tcp://127.0.0.1:0", "transport": "ipc"}, "drop one"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"liveness": "3"}, "liveness"),
        ({"fsync": "sometimes"}, "fsync"),
        ({"ack": "yes"}, "ack"),
        ({"persist": 3}, "persist"),
        ({"producer_id": "a/b"}, "producer_id"),
        ({"reconnect_initial": 5, "reconnect_max": 1}, "reconnect_max"),
    ],
)
def test_bad_options_are_named(meta: dict[str, Any], words: str) -> None:
    with pytest.raises(DescriptorError, match=words):
        QueueDescriptor(None, "sage", meta)


def test_ack_option_on_shm_is_checked_at_creation() -> None:
    with pytest.raises(DescriptorError, match="ack"):
        QueueDescriptor(None, "shm", {"ack": "yes"})


def test_explicit_endpoints() -> None:
    ipc = QueueDescriptor(
        None, "sage", {**FAST, "endpoint": conf.descriptor_factory("shm")().endpoint}
    )
    assert ipc.endpoint and ipc.endpoint.startswith("ipc://")
    tcp = QueueDescriptor(None, "sage", {**FAST, "transport": "tcp"})
    assert tcp.endpoint and tcp.endpoint.startswith("tcp://127.0.0.1:")
    for qd in (ipc, tcp):
        try:
            qd.put("x", timeout=conf.GET_TIMEOUT)
            assert qd.get(timeout=conf.GET_TIMEOUT) == "x"
        finally:
            qd.close()


# ------------------------------------------------------------------------------ persistence
@pytest.fixture
def persist(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "persist")


def _round_trip(qd: QueueDescriptor, n: int) -> Any:
    """Put 0..n-1 and take them back in order; returns the producer's statistics."""
    for i in range(n):
        qd.put(i, timeout=conf.GET_TIMEOUT)
    assert conf.drain(qd, n) == list(range(n))
    return _producer(qd).statistics()


def _close_consumed(qd: QueueDescriptor) -> None:
    with contextlib.suppress(Empty):
        qd.get(timeout=0.05)  # consumes the last record, so close() sees it acked
    qd.close()


def test_persistent_queue_round_trip_and_restart_numbering(persist: str) -> None:
    meta = {**FAST, "persist": persist, "fsync": "never", "maxsize": 100}
    qd = QueueDescriptor("persisted", "sage", meta)
    try:
        stats = _round_trip(qd, 50)
        pid, epoch = stats.extra["producer_id"], stats.extra["epoch"]
    finally:
        _close_consumed(qd)
    qd2 = QueueDescriptor._restore("persisted", "sage", dict(qd.metadata))
    try:
        qd2.put("again", timeout=conf.GET_TIMEOUT)
        assert qd2.get(timeout=conf.GET_TIMEOUT) == "again"
        stats = _producer(qd2).statistics()
        assert stats.extra["producer_id"] == pid  # the same log, taken over
        assert stats.extra["epoch"] == epoch + 1
    finally:
        _close_consumed(qd2)


def test_a_busy_producer_batches_although_each_log_write_is_slow(
    persist: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each put writes its record to the log before it returns; on a slow disk that write
    # used to count as the caller's pause, so the producer never looked busy and sent one
    # frame per record. A log that takes 0.2 ms per append stands in for that disk.
    from sage_zmq.flow import wal as wal_mod

    append = wal_mod.WriteAheadLog.append

    def slow_append(self: Any, first_seq: int, count: int, payload: Any) -> None:
        deadline = time.perf_counter() + 2e-4
        while time.perf_counter() < deadline:
            pass
        append(self, first_seq, count, payload)

    monkeypatch.setattr(wal_mod.WriteAheadLog, "append", slow_append)
    meta = {**FAST, "persist": persist, "fsync": "never", "maxsize": 1000}
    qd = QueueDescriptor("slow-log", "sage", meta)
    try:
        stats = _round_trip(qd, 400)
        assert stats.sent == 400
        assert stats.batches_sent <= 400 / 3, stats  # before: 400 frames of one record
    finally:
        _close_consumed(qd)


def test_corrupt_log_is_reported_and_torn_tail_is_cut(persist: str) -> None:
    meta = {**FAST, "persist": persist, "fsync": "never", "maxsize": 100}
    qd = QueueDescriptor("corrupt", "sage", meta)
    for i in range(5):
        qd.put(i, timeout=conf.GET_TIMEOUT)
    with contextlib.suppress(Exception):
        qd.close(timeout=0.1)  # nobody consumed: the five stay in the log
    wal_root, _ = persist_paths(persist, "corrupt")
    (pid,) = os.listdir(wal_root)
    (segment,) = [p for p in Path(wal_root, pid).iterdir() if p.suffix == ".seg"]
    with open(segment, "ab") as f:
        f.write(b"SGW1\x07\x00")  # a torn entry, as a kill during a write leaves
    qd = QueueDescriptor._restore("corrupt", "sage", dict(qd.metadata))
    try:
        got = conf.drain(qd, 5)  # replayed
        assert got == list(range(5))
        stats = _producer(qd).statistics()
        assert stats.extra["wal_corrupt_tail_bytes"] == 6
    finally:
        with contextlib.suppress(Empty):
            qd.get(timeout=0.05)
        qd.close()
    # Damage in the middle (a valid entry follows): refused, not skipped.
    data = bytearray(segment.read_bytes())
    data[30] ^= 0xFF  # inside the first of several entries
    segment.write_bytes(bytes(data))
    qd = QueueDescriptor._restore("corrupt", "sage", dict(qd.metadata))
    try:
        with pytest.raises(WalCorruptionError, match="refusing to skip"):
            qd.put("x", timeout=conf.GET_TIMEOUT)
    finally:
        qd.close()


# ------------------------------------------------------------------------------ failover hooks
def test_take_unacked_returns_what_no_consumer_took(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sage_zmq.connection")
    qd = QueueDescriptor(None, "sage", {**FAST, "maxsize": 100})
    try:
        for i in range(30):
            qd.put(i, timeout=conf.GET_TIMEOUT)
        qd.put(EndOfStream(), timeout=conf.GET_TIMEOUT)
        p = _producer(qd)
        conf.wait_until(lambda: p.dead, timeout=5.0, what="the absent consumer declared dead")
        assert p.dead_event.is_set() and not p.peer_alive
        taken = p.take_unacked()
        assert taken[:-1] == list(range(30)) and isinstance(taken[-1], EndOfStream)
        assert p.take_unacked() == []
        assert p.qsize() == 0
        # A consumer that appears now gets only what comes next.
        qd.put("after", timeout=conf.GET_TIMEOUT)
        assert qd.get(timeout=conf.GET_TIMEOUT) == "after"
        conf.wait_until(lambda: p.peer_alive, what="the consumer alive again")
    finally:
        qd.close()
    # Death and return are connection events, with the peer, for structured handlers.
    events = {
        r.sage_event: r  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "sage_zmq.connection" and r.sage_queue == qd.queue_id  # type: ignore[attr-defined]
    }
    dead = events["peer_dead"]
    assert dead.levelname == "WARNING" and dead.sage_peer == p._keeping.endpoint  # type: ignore[attr-defined]
    assert "declared dead" in dead.getMessage()
    assert events["peer_alive"].levelname == "INFO"


def test_dead_callback_fires_once_per_death() -> None:
    qd = QueueDescriptor(None, "sage", {**FAST, "maxsize": 100})
    try:
        qd.put(0, timeout=conf.GET_TIMEOUT)
        p = _producer(qd)
        fired = threading.Event()
        calls: list[Any] = []

        def on_dead(prod: Any) -> None:
            calls.append(prod)
            fired.set()

        p.add_dead_callback(on_dead)
        assert fired.wait(5.0), "no dead-consumer callback"
        assert calls == [p]
        assert qd.get(timeout=conf.GET_TIMEOUT) == 0  # the consumer appears: revived
        conf.wait_until(lambda: p.peer_alive and not p.dead_event.is_set(), what="revival")
        assert calls == [p]
    finally:
        with contextlib.suppress(Empty):
            qd.get(timeout=0.05)
        qd.close()
