"""Every documented config key changes behaviour as ``docs/configuration.md`` says (issue 7).

Each test sets one key (sometimes with a helper key) through ``set_config`` and checks what
the key promises, mostly on the wire: a raw ROUTER stands in for the consumer where the test
needs to see frames or to control what the producer hears.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from sage_zmq import observe, security
from sage_zmq.config import Config, current_config, reset_config, set_config
from sage_zmq.descriptor import QueueDescriptor
from sage_zmq.errors import (
    DeliveryError,
    DescriptorError,
    Empty,
    EncodeError,
    Full,
    RoutingError,
    SecurityError,
)
from sage_zmq.observe import tracing
from sage_zmq.packet import Packet
from sage_zmq.router import Connection, HashRouter, make_router
from sage_zmq.router.keys import instance_for_key
from sage_zmq.testing import drain, wait_until
from sage_zmq.wire.codec import Codec
from sage_zmq.wire.frame import FLAG_LZ4, Kind, parse_header

pytestmark = pytest.mark.timeout(60)

Use = Callable[..., Config]


@pytest.fixture
def use() -> Iterator[Use]:
    """``use(**{"performance.batch_size": 7})`` makes that the process config until the end."""

    def apply(**overrides: Any) -> Config:
        return set_config(Config().replace(**overrides))

    yield apply
    reset_config()
    observe.activate(current_config(), force=True)


class RawConsumer:
    """A bare ROUTER where producers connect: records what arrives, answers when told to."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.codec = Codec()
        self.frames: list[tuple[float, bytes, bytes]] = []  # (arrival, peer, frame)

    def pump(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        """Collect frames for ``seconds`` or until ``until()`` holds."""
        deadline = time.monotonic() + seconds
        while not until():
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    return
                continue
            peer, frame = self.sock.recv_multipart()
            self.frames.append((time.monotonic(), peer, frame))

    def of(self, kind: Kind) -> list[tuple[float, bytes, Any]]:
        """``(arrival, peer, fields)`` of every frame of ``kind`` so far."""
        out = []
        for at, peer, frame in self.frames:
            if parse_header(frame)[0] is kind:
                out.append((at, peer, self.codec.decode(frame).fields))
        return out

    def credit(self, peer: bytes, received: int = 0, limit: int = 100_000) -> None:
        body = {"session": "raw", "received": received, "acked": received, "limit": limit}
        self.sock.send_multipart([peer, self.codec.encode_control(Kind.CREDIT, body)])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def raw() -> Iterator[RawConsumer]:
    r = RawConsumer()
    yield r
    r.close()


def _producer(qd: QueueDescriptor) -> Any:
    return qd._handle().producer(qd)


def _consumer(qd: QueueDescriptor) -> Any:
    return qd._handle().consumer(qd)


def _introduce(raw: RawConsumer, qd: QueueDescriptor) -> tuple[Any, bytes]:
    """Open a reliable producer on ``qd`` and answer its HELLO, so it knows a live consumer."""
    producer = _producer(qd)
    raw.pump(5, lambda: bool(raw.of(Kind.HELLO)))
    _, peer, _ = raw.of(Kind.HELLO)[0]
    raw.credit(peer)
    wait_until(lambda: producer.statistics().extra["session"] == "raw", 5, "the credit")
    return producer, peer


# ================================================================== communication.queue
@pytest.mark.parametrize("qtype", ["tcp", "shm", "local"])
def test_default_type_is_used_when_none_is_named(use: Use, queues: Any, qtype: str) -> None:
    use(**{"communication.queue.default_type": qtype})
    qd = queues()
    assert qd.queue_type == qtype
    assert (qd.endpoint or "").startswith({"tcp": "tcp://", "shm": "ipc://", "local": ""}[qtype])
    qd.put("x")
    assert qd.get(timeout=5) == "x"


@pytest.mark.parametrize("qtype", ["local", "tcp"])
def test_max_size_bounds_a_queue_without_maxsize(use: Use, queues: Any, qtype: str) -> None:
    use(**{"communication.queue.max_size": 5, "performance.batch_size": 1})
    qd = queues(None, qtype)
    qd.qsize()  # open the consumer: its room is what credit grants
    for i in range(5):
        qd.put(i, timeout=1)
    with pytest.raises(Full):
        qd.put(5, timeout=0.1)
    assert drain(qd, 5) == list(range(5))


def test_timeout_bounds_close_without_consumer(use: Use, raw: RawConsumer, queues: Any) -> None:
    use(**{"communication.queue.timeout": 0.3})
    qd = queues(None, "tcp", {"endpoint": raw.endpoint})  # nobody ever confirms receipt
    qd.put("lost")
    start = time.monotonic()
    with pytest.raises(DeliveryError, match=r"within 0\.3 s") as info:
        qd.close()
    assert 0.25 <= time.monotonic() - start < 2.0
    assert info.value.undelivered == 1


# ================================================================== communication.router
def _local(queues: Any, n: int, **meta: Any) -> list[QueueDescriptor]:
    return [queues(None, "local", dict(meta)) for _ in range(n)]


def _connect(router: Any, qds: list[QueueDescriptor]) -> None:
    for i, qd in enumerate(qds):
        router.add_connection(Connection(0, i, f"t{i}", qd, target_input_index=i))


def _got(qd: QueueDescriptor) -> list[Any]:
    out = []
    with contextlib.suppress(Empty):
        while True:
            out.append(qd.get(timeout=0))
    return out


@pytest.mark.parametrize(("strategy", "copies"), [("broadcast", 3), ("round_robin", 1)])
def test_strategy_picks_the_router(use: Use, queues: Any, strategy: str, copies: int) -> None:
    use(**{"communication.router.strategy": strategy})
    router = make_router()
    qds = _local(queues, 3)
    _connect(router, qds)
    assert len(router.route(Packet("p"))) == copies
    assert sum(len(_got(qd)) for qd in qds) == copies


def _blocked_first(use: Use, queues: Any, **router_keys: Any) -> tuple[Any, list[QueueDescriptor]]:
    """A round-robin router whose first target is full; the queue timeout is short."""
    keys = {f"communication.router.{k}": v for k, v in router_keys.items()}
    use(**{"communication.queue.timeout": 0.05, **keys})
    (blocked,) = _local(queues, 1, maxsize=1)
    free = _local(queues, 2, maxsize=10_000)
    blocked.put("filler")
    router = make_router()
    _connect(router, [blocked, *free])
    return router, [blocked, *free]


def test_max_retries_bounds_failover(use: Use, queues: Any) -> None:
    router, _ = _blocked_first(use, queues, max_retries=0)
    with pytest.raises(RoutingError, match="no instance of group 0 took the packet"):
        router.route(Packet(0))
    router, _ = _blocked_first(use, queues, max_retries=1)
    (conn,) = router.route(Packet(0))  # one failover to the next instance
    assert conn.parallel_index == 1 and router.statistics().failovers == 1


@pytest.mark.parametrize("interval", [0.3, 0.8])
def test_health_check_interval_is_how_long_a_stalled_instance_is_skipped(
    use: Use, queues: Any, interval: float
) -> None:
    router, (blocked, *free) = _blocked_first(use, queues, health_check_interval=interval)
    router.route(Packet(0))  # the blocked one fails and is stalled
    stalled_at = time.monotonic()
    assert router.statistics().stalled == ((0, 0),)
    assert blocked.get(timeout=1) == "filler"  # it has room again, but stays skipped ...

    def burst() -> None:  # stalled instances are looked at every 256 packets
        for i in range(300):
            router.route(Packet(i))
        for qd in free:
            _got(qd)
        time.sleep(0.01)

    while time.monotonic() - stalled_at < interval * 0.7:
        burst()
    assert _got(blocked) == []
    deadline = stalled_at + interval + 1.0
    while not _got(blocked):  # ... until the interval has passed
        assert time.monotonic() < deadline, "stalled instance never came back"
        burst()
    assert time.monotonic() - stalled_at >= interval * 0.9


def test_max_parallelism_sets_the_key_groups(use: Use, queues: Any) -> None:
    keys = [f"user-{i}" for i in range(200)]
    differ = [k for k in keys if instance_for_key(k, 3, 4) != instance_for_key(k, 3, 128)]
    assert differ, "pick keys whose owner depends on max_parallelism"
    use(**{"communication.router.max_parallelism": 4})
    router = HashRouter()
    _connect(router, _local(queues, 3))
    for key in keys:
        (conn,) = router.route(Packet(key, partition_key=key))
        assert conn.parallel_index == instance_for_key(key, 3, 4)
    use(**{"communication.router.max_parallelism": 2})
    with pytest.raises(RoutingError, match="max_parallelism"):
        _connect(HashRouter(), _local(queues, 3))


# ================================================================== performance
def _data_frames(raw: RawConsumer) -> list[tuple[int, list[Any]]]:
    return [(f[1], f[2]) for _, _, f in raw.of(Kind.DATA)]


@pytest.mark.parametrize("batch_size", [7, 40])
def test_batch_size_caps_records_per_frame(
    use: Use, raw: RawConsumer, queues: Any, batch_size: int
) -> None:
    use(**{"performance.batch_size": batch_size, "performance.flush_interval": 0.05})
    qd = queues(None, "tcp", {"endpoint": raw.endpoint})
    for i in range(400):  # a tight burst: the producer switches to batching
        qd.put(i)
    qd.flush()
    raw.pump(5, lambda: sum(len(r) for _, r in _data_frames(raw)) >= 400)
    sizes = [len(records) for _, records in _data_frames(raw)]
    assert sum(sizes) == 400
    assert max(sizes) == batch_size  # full batches, never more
    assert qd.statistics().batches_sent == len(sizes)


@pytest.mark.parametrize(("setting", "lz4"), [(True, True), (False, False), ("auto", False)])
def test_compression_sets_the_lz4_flag(
    use: Use, raw: RawConsumer, queues: Any, setting: Any, lz4: bool
) -> None:
    use(**{"performance.compression": setting})
    qd = queues(None, "tcp", {"endpoint": raw.endpoint})
    qd.put("a" * 20_000)  # compressible, above compression_min_bytes
    raw.pump(5, lambda: bool(raw.of(Kind.DATA)))
    (frame,) = [f for _, _, f in raw.frames if parse_header(f)[0] is Kind.DATA]
    assert bool(parse_header(frame)[1] & FLAG_LZ4) is lz4  # "auto" on loopback: off
    assert _data_frames(raw)[0][1] == ["a" * 20_000]


@pytest.mark.parametrize(("min_bytes", "lz4"), [(0, True), (100_000, False)])
def test_compression_min_bytes(
    use: Use, raw: RawConsumer, queues: Any, min_bytes: int, lz4: bool
) -> None:
    use(**{"performance.compression": True, "performance.compression_min_bytes": min_bytes})
    qd = queues(None, "tcp", {"endpoint": raw.endpoint})
    qd.put("a" * 5_000)  # above the default 4096, below 100_000
    raw.pump(5, lambda: bool(raw.of(Kind.DATA)))
    (frame,) = [f for _, _, f in raw.frames if parse_header(f)[0] is Kind.DATA]
    assert bool(parse_header(frame)[1] & FLAG_LZ4) is lz4


@pytest.mark.parametrize("zero_copy", [True, False])
def test_zero_copy_gives_read_only_views(use: Use, queues: Any, zero_copy: bool) -> None:
    use(**{"performance.zero_copy": zero_copy})
    qd = queues(None, "tcp")
    qd.put(np.arange(100, dtype=np.int64))
    arr = qd.get(timeout=5)
    assert np.array_equal(arr, np.arange(100))
    assert arr.flags.writeable is not zero_copy  # a view of the frame, or a private copy


def _shm_stats(qd: QueueDescriptor) -> dict[str, Any]:
    extra = _producer(qd).statistics().extra
    return dict(extra["shm"])


@pytest.mark.parametrize(("threshold", "placed"), [(1024, 1), (1 << 20, 0)])
def test_shm_threshold_moves_payloads_to_shared_memory(
    use: Use, queues: Any, threshold: int, placed: int
) -> None:
    use(**{"performance.shm_threshold": threshold})
    qd = queues(None, "shm")
    payload = np.ones(8192, dtype=np.uint8)  # 8 KiB: above 1024, below 1 MiB
    qd.put(payload)
    assert np.array_equal(qd.get(timeout=5), payload)
    stats = _shm_stats(qd)
    assert stats["threshold"] == threshold and stats["placed"] == placed


@pytest.mark.parametrize("mib", [0, 2])
def test_memory_pool_size_is_the_pool_capacity(use: Use, queues: Any, mib: int) -> None:
    use(**{"performance.memory_pool_size": mib, "performance.shm_threshold": 1024})
    qd = queues(None, "shm")
    qd.put(np.ones(8192, dtype=np.uint8))
    assert qd.get(timeout=5).sum() == 8192
    stats = _shm_stats(qd)
    assert stats["capacity"] == mib << 20
    assert stats["placed"] == (1 if mib else 0)  # 0 MiB: no pool, the payload went inline
    if mib:
        big = np.ones(3 << 20, dtype=np.uint8)  # larger than the pool: inline as well
        qd.put(big)
        assert qd.get(timeout=5).size == big.size
        assert _shm_stats(qd)["inline_fallbacks"] == 1


@pytest.mark.parametrize("interval", [0.2, 0.5])
def test_flush_interval_bounds_the_wait_of_a_partial_batch(
    use: Use, raw: RawConsumer, queues: Any, interval: float
) -> None:
    use(**{"performance.flush_interval": interval, "performance.batch_size": 10_000})
    qd = queues(None, "tcp", {"endpoint": raw.endpoint})
    for i in range(200):  # a burst well below batch_size: its tail waits for the tick
        qd.put(i)
    done = time.monotonic()
    raw.pump(5, lambda: any(199 in r for _, r in _data_frames(raw)))
    tail_at = max(at for at, _, f in raw.of(Kind.DATA) if 199 in f[2])
    assert interval * 0.8 <= tail_at - done <= interval * 1.25 + 0.3


def test_a_producer_idle_for_flush_interval_sends_its_next_put_at_once(queues: Any) -> None:
    qd = queues(None, "shm", {"flush_interval": 0.3, "batch_size": 10})
    qd.qsize()  # the consumer is here
    for i in range(20):  # a burst: the producer batches
        qd.put(i)
    qd.flush()  # ... and nothing is left pending (as when a burst ends on a batch boundary)
    producer = qd._handle().producer(qd)
    assert producer._busy and not producer._pending
    # The ticker, flush_interval after the last flush with nothing put since, ends batching.
    wait_until(lambda: not producer._busy, timeout=10, what="the producer to leave batching")
    qd.put(20)
    assert not producer._pending  # sent by the put itself, not left for a tick
    assert [qd.get(timeout=5) for _ in range(21)] == list(range(21))


def test_max_message_size_rejects_bigger_frames(use: Use, queues: Any) -> None:
    use(**{"performance.max_message_size": 4096})
    qd = queues(None, "tcp")
    qd.qsize()  # the consumer is here
    # Our producer refuses the record at put, naming the limit (the receiver would drop it).
    with pytest.raises(EncodeError, match=r"more than max_message_size \(4096\)"):
        qd.put(b"x" * 10_000)
    qd.put(b"small")
    assert qd.get(timeout=5) == b"small"
    # Another peer's oversized frame: libzmq drops it (and the connection) at the consumer.
    import zmq

    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as peer:
        peer.linger = 0
        peer.connect(str(qd.endpoint))
        peer.send(b"x" * 10_000)
        with pytest.raises(Empty):
            qd.get(timeout=0.5)


@pytest.mark.parametrize("spin_wait", [0.0, 0.01])
def test_spin_wait_is_how_long_a_consumer_polls_before_it_sleeps(
    use: Use, queues: Any, spin_wait: float
) -> None:
    use(**{"performance.spin_wait": spin_wait})
    qd = queues(None, "tcp")
    qd.qsize()  # the consumer is here
    inlet = qd._handle().consumer(qd)._inlets[0]
    assert inlet.spin.limit == spin_wait
    for i in range(8):  # records that come 1 ms after each get starts: short waits
        timer = threading.Timer(0.001, qd.put, args=(i,))
        timer.start()
        try:
            assert qd.get(timeout=5) == i
        finally:
            timer.join()
    # Polling follows short waits only where it is on (tests/test_spin_wait.py has the rest).
    assert inlet.spin.wants_spin() is (spin_wait > 0)


# ================================================================== reliability
def _sage(queues: Any, raw: RawConsumer) -> QueueDescriptor:
    qd: QueueDescriptor = queues(None, "sage", {"endpoint": raw.endpoint})
    return qd


@pytest.mark.parametrize(("interval", "liveness"), [(0.1, 3), (0.1, 6), (0.25, 2)])
def test_heartbeat_interval_and_liveness_declare_a_silent_peer_dead(
    use: Use, raw: RawConsumer, queues: Any, interval: float, liveness: int
) -> None:
    use(
        **{
            "reliability.heartbeat_interval": interval,
            "reliability.liveness": liveness,
            "reliability.ack_timeout": 10,
        }
    )
    producer, _ = _introduce(raw, _sage(queues, raw))
    heard = time.monotonic()  # the credit was the last thing the producer heard
    raw.pump(interval * liveness + 2, lambda: producer.dead_event.is_set())
    dead_after = time.monotonic() - heard
    limit = interval * liveness
    assert 0.8 * limit <= dead_after <= limit + 0.4
    beats = [at - heard for at, _, _ in raw.of(Kind.HEARTBEAT)]
    assert beats and beats[0] >= 0.8 * interval  # asked for an answer once idle for interval
    assert len(beats) <= liveness


@pytest.mark.parametrize("initial", [0.1, 0.25])
def test_reconnect_initial_is_the_first_backoff(
    use: Use, raw: RawConsumer, queues: Any, initial: float
) -> None:
    use(
        **{
            "reliability.heartbeat_interval": 0.05,
            "reliability.liveness": 1,
            "reliability.reconnect_initial": initial,
            "reliability.reconnect_max": 30,
        }
    )
    producer, _ = _introduce(raw, _sage(queues, raw))
    raw.pump(2, lambda: producer.dead_event.is_set())
    dead_at = time.monotonic()
    raw.pump(initial + 1, lambda: len(raw.of(Kind.HELLO)) >= 2)
    first_retry = raw.of(Kind.HELLO)[1]  # a new socket introduces itself again
    assert first_retry[1] != raw.of(Kind.HELLO)[0][1]
    assert 0.8 * initial <= first_retry[0] - dead_at <= initial + 0.15


def test_reconnect_max_caps_the_backoff(use: Use, raw: RawConsumer, queues: Any) -> None:
    use(
        **{
            "reliability.heartbeat_interval": 0.02,
            "reliability.liveness": 1,
            "reliability.reconnect_initial": 0.04,
            "reliability.reconnect_max": 0.16,
        }
    )
    _introduce(raw, _sage(queues, raw))
    raw.pump(2.0, lambda: len(raw.of(Kind.HELLO)) >= 7)
    times = [at for at, _, _ in raw.of(Kind.HELLO)[1:]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.04, 0.08, 0.16, then reconnect_max again and again. Uncapped, the gaps would go on
    # doubling (0.32, 0.64, ...): six retries would not fit in the two seconds. The median
    # of the later gaps, not each gap, is checked: one retry a loaded machine runs late
    # makes one gap longer and the next one shorter.
    assert len(gaps) >= 5, gaps
    assert gaps[0] < 0.13 and 0.12 <= statistics.median(gaps[2:]) <= 0.26, gaps


@pytest.mark.parametrize("ack_timeout", [0.2, 0.6])
def test_ack_timeout_is_the_retransmission_delay(
    use: Use, raw: RawConsumer, queues: Any, ack_timeout: float
) -> None:
    use(**{"reliability.ack_timeout": ack_timeout, "reliability.heartbeat_interval": 0.05})
    qd = _sage(queues, raw)
    _introduce(raw, qd)

    def answer_heartbeats() -> bool:  # the consumer answers, but never reports receipt
        for _, p, _ in raw.of(Kind.HEARTBEAT)[answered[0] :]:
            raw.credit(p)
            answered[0] += 1
        return len(raw.of(Kind.DATA)) >= 2

    answered = [0]
    qd.put("r")
    raw.pump(ack_timeout + 2, answer_heartbeats)
    (first, _, f1), (second, _, f2) = raw.of(Kind.DATA)[:2]
    assert f1 == f2  # the same frame again
    assert 0.8 * ack_timeout <= second - first <= ack_timeout + 0.3


@pytest.mark.parametrize("window", [2, 5])
def test_max_in_flight_caps_frames_awaiting_receipt(
    use: Use, raw: RawConsumer, queues: Any, window: int
) -> None:
    use(**{"reliability.max_in_flight": window, "reliability.ack_timeout": 30})
    qd = _sage(queues, raw)
    producer, peer = _introduce(raw, qd)
    for i in range(20):
        qd.put(i)
        time.sleep(0.002)  # slow puts: one frame each
    raw.pump(0.3)
    seqs = [seq for seq, _ in _data_frames(raw)]
    assert len(seqs) == window, seqs  # the rest waits in the producer
    assert producer.qsize() == 20
    raw.credit(peer, received=window)  # a receipt frees the window: the rest follows
    raw.pump(5, lambda: sum(len(b) for _, b in _data_frames(raw)) >= 20)
    raw.pump(0.1)
    frames = _data_frames(raw)
    assert [r for _, batch in frames for r in batch] == list(range(20))
    assert len(frames) <= 2 * window


def _wal_fsyncs(qd: QueueDescriptor) -> int:
    wal = _producer(qd)._wal
    return int(wal.statistics().fsyncs)


@pytest.mark.parametrize(("policy", "low", "high"), [("batch", 20, 1000), ("never", 0, 0)])
def test_fsync_policy(
    use: Use, queues: Any, tmp_path: Path, policy: str, low: int, high: int
) -> None:
    use(**{"reliability.fsync": policy})
    qd = queues(None, "sage", {"persist": str(tmp_path)})
    opened = _wal_fsyncs(qd)
    for i in range(20):
        qd.put(i)
    assert low <= _wal_fsyncs(qd) - opened <= high


@pytest.mark.parametrize(("interval", "low", "high"), [(0.02, 5, 1000), (30.0, 0, 3)])
def test_fsync_interval_paces_fsyncs(
    use: Use, queues: Any, tmp_path: Path, interval: float, low: int, high: int
) -> None:
    use(
        **{
            "reliability.fsync": "interval",
            "reliability.fsync_interval": interval,
            "reliability.heartbeat_interval": 10,
            "reliability.ack_timeout": 10,
        }
    )
    qd = queues(None, "sage", {"persist": str(tmp_path)})
    opened = _wal_fsyncs(qd)
    for i in range(30):  # 0.3 s of puts
        qd.put(i)
        time.sleep(0.01)
    assert low <= _wal_fsyncs(qd) - opened <= high


# ================================================================== security
class _Custom:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Custom)


@pytest.mark.parametrize("allow", [True, False])
def test_allow_pickle(use: Use, queues: Any, allow: bool) -> None:
    use(**{"security.allow_pickle": allow})
    qd = queues(None, "shm")  # host-local: the only place pickle may be allowed without CURVE
    if allow:
        qd.put(_Custom())
        assert qd.get(timeout=5) == _Custom()
    else:
        with pytest.raises(EncodeError):
            qd.put(_Custom())
            qd.flush()


def test_allow_pickle_is_refused_on_plain_tcp(use: Use, queues: Any) -> None:
    use(**{"security.allow_pickle": True})
    with pytest.raises(SecurityError, match=r"(?i)pickle"):
        qd = queues(None, "tcp")
        qd.put(_Custom())


def test_bind_host_is_where_tcp_queues_listen(use: Use, queues: Any) -> None:
    use(**{"security.bind_host": "127.0.0.2"})
    qd = queues(None, "tcp")
    assert (qd.endpoint or "").startswith("tcp://127.0.0.2:")
    qd.put(1)
    assert qd.get(timeout=5) == 1


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[dict[str, str]]:
    kdir, auth = tmp_path / "keys", tmp_path / "authorized"
    server_pub, server_sec = security.generate_keys(kdir, "server")
    client_pub, client_sec = security.generate_keys(kdir, "client")
    other_pub, _ = security.generate_keys(tmp_path / "other", "other")
    auth.mkdir()
    shutil.copy(client_pub, auth)
    (tmp_path / "strangers").mkdir()
    shutil.copy(other_pub, tmp_path / "strangers")
    yield {
        "server_public_key": server_pub,
        "server_secret_key": server_sec,
        "client_public_key": client_pub,
        "client_secret_key": client_sec,
        "authorized_keys": str(auth),
        "strangers": str(tmp_path / "strangers"),
    }
    security.stop_authenticator()


def _curve(keys: dict[str, str], **changes: Any) -> dict[str, Any]:
    names = (
        "server_public_key",
        "server_secret_key",
        "client_public_key",
        "client_secret_key",
        "authorized_keys",
    )
    paths = {f"security.curve.{k}": keys[k] for k in names}
    return {"security.curve.enabled": True, **paths, **changes}


def _handshake_ok(endpoint: str, client: tuple[str, str] | None = None) -> bool:
    """Does a raw DEALER complete a handshake? ``client``: (its secret key, server public key)
    files for CURVE, else plain."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client is not None:
        public, secret = security.load_keypair(client[0], "client_secret_key")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = security.load_public_key(client[1], "server_public_key")
    mon = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_DISCONNECTED
    )
    try:
        sock.connect(endpoint)
        if not mon.poll(5000):
            raise AssertionError("no handshake event")
        return int(recv_monitor_message(mon)["event"]) == zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("enabled", [True, False])
def test_curve_enabled_secures_tcp_queues(
    use: Use, queues: Any, keys: dict[str, str], enabled: bool
) -> None:
    use(**_curve(keys, **{"security.curve.enabled": enabled}))
    qd = queues(None, "tcp")
    qd.put("secret")
    assert qd.get(timeout=5) == "secret"  # the configured keys work together
    assert _handshake_ok(str(qd.endpoint)) is not enabled  # a plain peer gets in only if off


@pytest.mark.parametrize(
    ("allow_list", "admitted"), [("authorized_keys", True), ("strangers", False)]
)
def test_curve_authorized_keys_decides_who_connects(
    use: Use, queues: Any, keys: dict[str, str], allow_list: str, admitted: bool
) -> None:
    use(**_curve(keys, **{"security.curve.authorized_keys": keys[allow_list]}))
    qd = queues(None, "tcp")
    qd.qsize()  # the consumer (CURVE server) is here
    client = (keys["client_secret_key"], keys["server_public_key"])
    assert _handshake_ok(str(qd.endpoint), client) is admitted


@pytest.mark.parametrize(
    "key", ["server_public_key", "server_secret_key", "client_public_key", "client_secret_key"]
)
def test_curve_key_paths_are_read(
    use: Use, queues: Any, keys: dict[str, str], tmp_path: Path, key: str
) -> None:
    """Pointing a key path elsewhere changes what happens: the file named is the one used."""
    missing = str(tmp_path / "nowhere.key")
    use(**_curve(keys, **{f"security.curve.{key}": missing}))
    with pytest.raises(Exception, match=key):
        qd = queues(None, "tcp")
        qd.put(1)
        qd.get(timeout=1)


# ================================================================== observability
def test_log_level_sets_the_sage_zmq_logger(use: Use, queues: Any) -> None:
    use(**{"observability.log_level": "debug"})
    observe.activate(force=True)
    assert logging.getLogger("sage_zmq").getEffectiveLevel() == logging.DEBUG
    use(**{"observability.log_level": "ERROR"})
    observe.activate(force=True)
    assert logging.getLogger("sage_zmq").getEffectiveLevel() == logging.ERROR


@pytest.mark.parametrize(("rate", "traced"), [(0.0, 0), (1.0, 200)])
def test_trace_sample_rate(use: Use, rate: float, traced: int) -> None:
    use(**{"observability.trace_sample_rate": rate})
    observe.activate(force=True)
    assert sum(bool(tracing.maybe_trace(Packet(i))) for i in range(200)) == traced


def test_metrics_port_starts_the_exporter(use: Use) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    use(**{"observability.metrics_port": port})
    observe.activate(force=True)
    server = observe.metrics_server()
    assert server is not None and server.port == port
    use()
    observe.activate(force=True)
    assert observe.metrics_server() is None


# ================================================================== the reference
def test_every_key_is_exercised_here_and_documented() -> None:
    """A key added to the config without a test here (or a row in the reference) fails."""
    from sage_zmq.config import _all_paths

    sections = {"communication", "performance", "reliability", "security", "observability"}
    sections |= {"communication.queue", "communication.router", "security.curve"}
    leaves = [p for p in _all_paths() if p not in sections]
    source = Path(__file__).read_text()
    assert not [p for p in leaves if p.rpartition(".")[2] not in source]
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert not [p for p in leaves if f"| `{p}` |" not in doc]


def test_descriptor_metadata_still_overrides_config(use: Use, queues: Any) -> None:
    use(**{"communication.queue.max_size": 3})
    assert queues(None, "local", {"maxsize": 9}).settings().maxsize == 9
    with pytest.raises(DescriptorError):
        queues(None, "sage", {"max_in_flight": 0})
