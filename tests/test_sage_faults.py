"""The ``sage`` queue under real faults, loopback only: SIGKILLed consumers and producers, a
proxy that cuts and stalls connections, a slow consumer, a silent peer.

Children are spawned (as a deployment's workers are) and killed by handle. What a killed
consumer handed to its application is reported through a file it writes with one ``os.write``
per record *before* asking for the next record, i.e. before that record is recorded as
consumed (see ``sage_zmq.flow.reliable``): after a SIGKILL the file holds every consumed record
plus at most one more, the one in the application's hands, which the dedup file says is not
consumed and which must come again.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from sage_zmq import Empty, EndOfStream, QueueDescriptor
from sage_zmq import testing as conf
from sage_zmq._fault_proxy import FaultProxy
from sage_zmq.flow.dedup import DedupState
from sage_zmq.flow.reliable import persist_paths

FAST = {
    "heartbeat_interval": 0.1,
    "liveness": 3,
    "ack_timeout": 0.2,
    "reconnect_initial": 0.02,
    "reconnect_max": 0.2,
}
_I64 = struct.Struct("<q")
LONG = 60.0  # bound on waits that normally take well under a second


# ------------------------------------------------------------------------------ children
def produce_ints(
    conn: Connection, qd: QueueDescriptor, n: int, pace: int = 0, counter: Any = None
) -> None:
    """Put ``0..n-1`` (pausing 5 ms every ``pace`` records), then END, close, report."""
    conn.send(("started", os.getpid()))
    for i in range(n):
        qd.put(i, timeout=LONG)
        if counter is not None:
            counter.value = i + 1  # after put returned
        if pace and i % pace == pace - 1:
            time.sleep(0.005)
    qd.put(EndOfStream(), timeout=LONG)
    stats = qd.statistics()
    qd.close(timeout=LONG)
    conn.send(("closed", stats.retransmits))


def consume_to_file(conn: Connection, qd: QueueDescriptor, path: str) -> None:
    """Write each record to ``path`` before asking for the next; report at the end."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        record: Any = qd.get_nowait()  # binds; may already return the first record
    except Empty:
        record = None
    conn.send(("ready", os.getpid()))
    count = 0
    while True:
        if record is None:
            record = qd.get(timeout=LONG)
        if isinstance(record, EndOfStream):
            break
        os.write(fd, _I64.pack(record))
        count += 1
        record = None
    os.close(fd)
    qd.close()
    conn.send(("done", count))


def produce_and_measure(conn: Connection, qd: QueueDescriptor, n: int) -> None:
    """Put ``n`` records of 200 bytes as fast as credit allows; report RSS and kept frames."""
    conn.send(("started", os.getpid()))
    pad = b"x" * 200
    samples: list[tuple[int, int, int]] = []
    producer = qd._handle().producer(qd)
    for i in range(n):
        qd.put([i, pad], timeout=LONG)
        if i % 10_000 == 0:
            kept = producer.statistics().extra["kept_records"]
            samples.append((i, _rss(), kept))
    qd.put(EndOfStream(), timeout=LONG)
    qd.close(timeout=LONG)
    conn.send(("closed", samples))


def produce_then_hang(
    conn: Connection, qd: QueueDescriptor, tag: str, n: int, counter: Any
) -> None:
    """Put ``[tag, i]`` forever-ish, counting returned puts, for the parent to SIGKILL."""
    conn.send(("started", os.getpid()))
    for i in range(n):
        qd.put([tag, i], timeout=LONG)
        counter.value = i + 1
    conn.send(("put", n))
    qd.close(timeout=LONG)
    conn.send(("closed", None))


def hold_open(conn: Connection, qd: QueueDescriptor) -> None:
    """Bind ``qd``'s consumer end and read nothing (heartbeats are answered) until killed."""
    with contextlib.suppress(Empty):
        qd.get_nowait()
    conn.send(("ready", os.getpid()))
    conn.recv()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _read_ints(path: str) -> list[int]:
    data = Path(path).read_bytes()
    assert len(data) % 8 == 0, "a record write was torn"
    return [v for (v,) in _I64.iter_unpack(data)]


@contextlib.contextmanager
def _ctx_value() -> Iterator[Any]:
    import multiprocessing

    yield multiprocessing.get_context("spawn").Value("q", 0, lock=False)


# ------------------------------------------------------------------------------ consumer kills
def test_consumer_sigkilled_five_times_sees_every_record_once_in_order(tmp_path: Path) -> None:
    n, kills = 200_000, 5
    persist = str(tmp_path / "consumer-state")
    qd = QueueDescriptor(
        "kill-consumer",
        "sage",
        {**FAST, "maxsize": 2000, "persist": persist, "producer_id": "p0"},
    )
    producer_qd = qd.with_options(persist=None)  # only the consumer keeps state here
    _, dedup_path = persist_paths(persist, qd.queue_id)
    consumed: list[int] = []
    with conf.spawn_worker(produce_ints, producer_qd, n) as producer:
        assert producer.recv()[0] == "started"
        for life in range(kills + 1):
            out = str(tmp_path / f"life-{life}.bin")
            with conf.spawn_worker(consume_to_file, qd, out) as consumer:
                assert consumer.recv(LONG)[0] == "ready"
                if life < kills:
                    # Kill once this life has taken its share of the stream.
                    target = len(consumed) + n // (kills + 2)
                    deadline = time.monotonic() + LONG
                    while os.path.getsize(out) // 8 < target - len(consumed):
                        assert time.monotonic() < deadline, f"life {life} stalled"
                        time.sleep(0.002)
                    consumer.process.kill()
                    consumer.process.join(LONG)
                else:
                    assert consumer.recv(LONG)[0] == "done"
                    assert consumer.join() == 0
            got = _read_ints(out)
            with DedupState(dedup_path) as dedup:
                last = dedup.last("p0")
            if life < kills:
                assert last is not None
                # Reported but not consumed: at most the record in the application's hands.
                pending = [v for v in got if v > last]
                assert pending in ([], [got[-1]]), (life, last, got[-3:])
                got = got[: len(got) - len(pending)]
            assert got[:1] == [len(consumed)] or not got, f"life {life} did not resume in order"
            consumed.extend(got)
            assert 0 < len(consumed) < n or life == kills
        kind, retransmits = producer.recv(LONG)
        assert kind == "closed" and producer.join() == 0
    assert len(consumed) == n, f"{len(consumed)} of {n} records"
    assert consumed == list(range(n)), "a record was lost, repeated or reordered"
    assert retransmits > 0, "the consumer restarts caused no retransmission?"


# ------------------------------------------------------------------------------ producer kill
def test_producer_sigkilled_with_persistence_loses_nothing(tmp_path: Path) -> None:
    persist = str(tmp_path / "producer-state")
    qd = QueueDescriptor(
        "kill-producer",
        "sage",
        {**FAST, "maxsize": 5000, "persist": persist, "producer_id": "pp", "fsync": "never"},
    )
    consumer_qd = qd.with_options(persist=None)
    records: list[Any] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            with contextlib.suppress(Empty):
                records.append(consumer_qd.get(timeout=0.05))

    with contextlib.suppress(Empty):
        consumer_qd.get_nowait()  # bound before any producer starts
    reader = threading.Thread(target=consume)
    reader.start()
    try:
        with _ctx_value() as counter:
            with conf.spawn_worker(produce_then_hang, qd, "a", 10**9, counter) as first:
                assert first.recv()[0] == "started"
                deadline = time.monotonic() + LONG
                while counter.value < 20_000:
                    assert time.monotonic() < deadline, "the first producer stalled"
                    time.sleep(0.001)
                first.process.kill()  # mid-stream, some puts not yet sent or acked
                first.process.join(LONG)
                returned = counter.value
            with conf.spawn_worker(produce_then_hang, qd, "b", 1000, counter) as second:
                assert second.recv()[0] == "started"
                assert second.recv(LONG) == ("put", 1000)
                assert second.recv(LONG) == ("closed", None)
                assert second.join() == 0
        conf.wait_until(lambda: bool(records) and records[-1] == ["b", 999], LONG, "the run")
    finally:
        stop.set()
        reader.join()
        consumer_qd.close()
    a = [i for tag, i in records if tag == "a"]
    b = [i for tag, i in records if tag == "b"]
    # Every put that returned is delivered once; the put in progress at the kill may be too.
    assert a in (list(range(returned)), list(range(returned + 1))), (returned, len(a), a[-3:])
    assert b == list(range(1000))
    assert records == [["a", i] for i in a] + [["b", i] for i in b], "out of order"


def test_a_restarted_persistent_consumer_remembers_which_upstreams_ended(tmp_path: Path) -> None:
    # Upstream a ends and closes, the consumer restarts, upstream b ends: the stream ends. The
    # restarted consumer used to wait forever for a's end, which a never sends again.
    qd = QueueDescriptor(
        None, "sage", {**FAST, "maxsize": 100, "upstreams": 2, "persist": str(tmp_path)}
    )
    producer_qd = qd.with_options(persist=None)
    with contextlib.suppress(Empty):
        qd.get_nowait()
    try:
        with conf.spawn_worker(conf.produce_worker, producer_qd, "a", 20, True) as a:
            assert a.recv()[0] == "started"
            assert conf.drain(qd, 20) == [["a", i] for i in range(20)]
            with pytest.raises(Empty):
                qd.get(timeout=0.5)  # takes a's end: one of two upstreams ended
            assert a.recv() == ("closed", None)
        qd.close()  # the consumer goes (the stream has not ended) ...
        again = QueueDescriptor.from_dict(qd.to_dict())  # ... and comes back
        with conf.spawn_worker(conf.produce_worker, producer_qd, "b", 20, True) as b:
            assert b.recv()[0] == "started"
            got = conf.drain(again, 21)
            assert b.recv() == ("closed", None)
        assert got[:-1] == [["b", i] for i in range(20)] and isinstance(got[-1], EndOfStream)
        again.close()
        assert not list(tmp_path.rglob("*.ends")), "a finished stream leaves no ends behind"
    finally:
        conf.close_quietly(qd)


# ------------------------------------------------------------------------------ network faults
def test_proxy_cutting_every_half_second_loses_and_doubles_nothing() -> None:
    n = 150_000
    qd = QueueDescriptor("cut", "sage", {**FAST, "transport": "tcp", "maxsize": 2000})
    port = int(str(qd.endpoint).rsplit(":", 1)[1])
    got: list[int] = []
    with FaultProxy(port, cut_every=0.5, stall_chance=0.5, stall_for=0.15, seed=7) as proxy:
        producer_qd = qd.with_options(endpoint=proxy.endpoint)
        try:
            with contextlib.suppress(Empty):
                qd.get_nowait()
            with conf.spawn_worker(produce_ints, producer_qd, n, 500) as w:
                assert w.recv()[0] == "started"
                while True:
                    record = qd.get(timeout=LONG)
                    if isinstance(record, EndOfStream):
                        break
                    got.append(record)
                kind, retransmits = w.recv(LONG)
                assert kind == "closed" and w.join() == 0
        finally:
            qd.close()
        stats = proxy.stats
    assert stats.cuts >= 2, f"the stream outran the faults: {stats}"
    assert len(got) == n and got == list(range(n)), (
        f"{len(got)} records, {n - len(set(got))} lost, {len(got) - len(set(got))} doubled"
    )
    assert retransmits > 0


def test_heartbeat_loss_on_a_real_socket_is_detected_in_time() -> None:
    interval, liveness = 0.1, 3
    qd = QueueDescriptor("silent", "sage", {**FAST, "transport": "tcp", "maxsize": 100})
    port = int(str(qd.endpoint).rsplit(":", 1)[1])
    with FaultProxy(port) as proxy:
        producer_qd = qd.with_options(endpoint=proxy.endpoint)
        try:
            producer_qd.put("hello", timeout=conf.GET_TIMEOUT)
            assert qd.get(timeout=conf.GET_TIMEOUT) == "hello"
            producer = producer_qd._handle().producer(producer_qd)
            deaths: list[float] = []
            producer.add_dead_callback(lambda p: deaths.append(time.monotonic()))
            # A live, idle peer answers heartbeats: no false alarm over many intervals.
            assert not producer.dead_event.wait(8 * interval)
            silent_from = time.monotonic()
            proxy.stall(30)
            assert producer.dead_event.wait(5.0), "a silent consumer was never declared dead"
            took = deaths[0] - silent_from
            # Within interval * liveness of the last frame heard (which precedes the stall),
            # plus one tick, plus scheduling delay on a loaded machine.
            assert took <= interval * liveness + 0.4, f"dead after {took:.3f} s"
            assert took >= interval, f"declared dead at once ({took:.3f} s)"
            assert deaths[0] - producer._live.dead_since < 0.05  # the callback came at once
            for i in range(5):
                producer_qd.put(i, timeout=conf.GET_TIMEOUT)  # while partitioned
            proxy.resume()
            assert conf.drain(qd, 5) == list(range(5)), "records put while partitioned were lost"
            conf.wait_until(lambda: producer.peer_alive, what="revival")
        finally:
            producer_qd.close(timeout=5)
            qd.close()


# ------------------------------------------------------------------------------ router failover
def test_router_moves_a_dead_instances_unacked_packets_to_a_live_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sage_zmq import Packet
    from sage_zmq.router import Connection as Conn
    from sage_zmq.router import RoundRobinRouter

    caplog.set_level("INFO", logger="sage_zmq.connection")
    meta = {**FAST, "maxsize": 50}
    doomed = QueueDescriptor(None, "sage", meta)
    healthy = QueueDescriptor(None, "sage", meta)
    with contextlib.suppress(Empty):
        healthy.get_nowait()  # this process consumes the healthy instance
    router = RoundRobinRouter(timeout=LONG)  # a wait that would show as a stall
    router.add_connection(Conn(0, 0, "w", doomed))
    router.add_connection(Conn(0, 1, "w", healthy))
    n = 300
    got: list[Any] = []

    def consume_healthy() -> None:
        while not isinstance(item := healthy.get(timeout=LONG), EndOfStream):
            got.append(item.payload)

    reader = threading.Thread(target=consume_healthy)
    reader.start()
    try:
        with conf.spawn_worker(hold_open, doomed) as holder:
            holder.recv()
            for i in range(40):  # 20 each; the holder reads none of its share
                router.route(Packet(i))
            holder.process.kill()
            holder.join()
            t0 = time.monotonic()
            for i in range(40, n):
                router.route(Packet(i))
            took = time.monotonic() - t0
        # The dead instance's producer keeps its end of stream, to resend on its return.
        assert router.send_stop_signal() == 2
        reader.join(LONG)
    finally:
        router.close()
        with contextlib.suppress(Exception):
            doomed.close(timeout=0.5)  # holds the dead instance's end of stream
        with contextlib.suppress(FileNotFoundError):  # the killed consumer's socket file
            os.unlink(str(doomed.endpoint).removeprefix("ipc://"))
        if reader.is_alive():
            healthy.put(EndOfStream())
            reader.join(LONG)
        healthy.close()
    # Everything reached the live instance once, in spite of the death; route() never waited
    # out its timeout on the dead instance: death (3 heartbeats of 0.1 s) ended the wait.
    assert sorted(got) == list(range(n)), (len(got), len(set(got)))
    assert took < LONG / 4, f"route() stalled {took:.1f} s on the dead instance"
    (moved,) = [r for r in caplog.records if getattr(r, "sage_moved", 0)]
    assert moved.levelname == "WARNING" and moved.sage_event == "failover"  # type: ignore[attr-defined]
    assert router.statistics().stalled == ((0, 0),)


# ------------------------------------------------------------------------------ slow consumer
def test_slow_consumer_keeps_producer_memory_bounded() -> None:
    n = 1_000_000  # the figure; the consumer sleeps 0.8 ms per 100 records
    qd = QueueDescriptor("slow", "sage", {**FAST, "maxsize": 1000})
    with contextlib.suppress(Empty):
        qd.get_nowait()
    count = 0
    try:
        with conf.spawn_worker(produce_and_measure, qd, n) as w:
            assert w.recv()[0] == "started"
            while True:
                record = qd.get(timeout=LONG)
                if isinstance(record, EndOfStream):
                    break
                assert record[0] == count
                count += 1
                if count % 100 == 0:
                    time.sleep(0.0008)  # ~10 us per record: 10x a free-running producer
            kind, samples = w.recv(LONG)
            assert kind == "closed" and w.join() == 0
    finally:
        qd.close()
    assert count == n
    # Records kept for retransmission stay within the credit window (maxsize, + one batch).
    assert max(kept for _, _, kept in samples) <= 1000 + 100
    warm = next(rss for i, rss, _ in samples if i >= 20_000)
    growth = max(rss for _, rss, _ in samples) - warm
    # Unbounded buffering of 980k * 200-byte records would add > 190 MB.
    assert growth < 15 * 2**20, f"producer RSS grew {growth / 2**20:.1f} MiB"


@pytest.fixture(autouse=True)
def _quiet_reliability_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="sage_zmq.reliable")
