"""Tests for sage_zmq.router: connections, routers over local/shm/tcp queues, end of stream."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator
from multiprocessing.connection import Connection as Pipe
from typing import Any

import pytest

import sage_zmq
from sage_zmq import EndOfStream, Packet, QueueDescriptor
from sage_zmq.config import load_config
from sage_zmq.errors import Empty, RoutingError
from sage_zmq.router import (
    BaseRouter,
    BroadcastRouter,
    Connection,
    HashRouter,
    LoadBalanceRouter,
    NotDelivered,
    RoundRobinRouter,
    RouterStatistics,
    make_router,
)
from sage_zmq.router.keys import instance_for_key
from sage_zmq.testing import close_quietly, spawn_worker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def local_queues() -> Iterator[list[QueueDescriptor]]:
    made: list[QueueDescriptor] = []

    def make(n: int, **meta: Any) -> list[QueueDescriptor]:
        new = [QueueDescriptor(queue_type="local", **meta) for _ in range(n)]
        made.extend(new)
        return new

    yield make  # type: ignore[misc]
    close_quietly(*made)


def _drain(qd: QueueDescriptor) -> list[Any]:
    """Everything routed to ``qd`` so far (ships partial batches first)."""
    qd.flush()
    out = []
    while True:
        try:
            item = qd.get(timeout=0)
        except Empty:
            return out
        out.append(item)
        if isinstance(item, EndOfStream):
            return out  # from now on get() returns EndOfStream at once


def _router(cls: type[BaseRouter], qds: list[QueueDescriptor], **kw: Any) -> BaseRouter:
    router = cls(**kw)
    for i, qd in enumerate(qds):
        router.add_connection(Connection(0, i, f"t{i}", qd, target_input_index=i))
    return router


# -- connections ---------------------------------------------------------------------------------


def test_connection_resolves_descriptor_from_handles(local_queues: Any) -> None:
    (qd,) = local_queues(1)

    class Task:
        input_qd = qd

    class Other:
        queue_descriptor = qd

    assert Connection(0, 0, "a", qd).queue_descriptor is qd
    assert Connection(0, 0, "a", Task()).queue_descriptor is qd
    assert Connection(0, 0, "a", Other()).queue_descriptor is qd
    assert Connection(0, 0, "a", queue_descriptor=qd).queue_descriptor is qd
    assert sage_zmq.Connection is Connection
    with pytest.raises(RoutingError, match="input_qd"):
        Connection(0, 0, "a", object())
    with pytest.raises(RoutingError, match="target_handle"):
        Connection(0, 0, "a")
    with pytest.raises(RoutingError, match="parallel_index"):
        Connection(0, -1, "a", qd)
    with pytest.raises(RoutingError, match="broadcast_index"):
        Connection(True, 0, "a", qd)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Connection(0, 0, "a", qd).parallel_index = 3  # type: ignore[misc]


def test_router_statistics_add_up_its_target_queues() -> None:
    # Issue 7: a router's statistics carry bytes, depth and utilisation, rates (uptime).
    qds = [QueueDescriptor(queue_type="tcp", metadata={"maxsize": 50}) for _ in range(2)]
    try:
        router = _router(RoundRobinRouter, qds)
        for i in range(6):
            router.route(Packet({"i": i}))
        stats = router.statistics()
        per_queue = [qd.statistics() for qd in qds]
        assert stats.bytes_sent == sum(q.bytes_sent for q in per_queue) > 0, stats
        assert stats.maxsize == 100 and stats.depth == sum(q.depth for q in per_queue)
        assert stats.utilisation == stats.depth / 100
        assert stats.uptime > 0 and stats.route_rate == stats.routed / stats.uptime
        for qd in qds:
            assert [qd.get(timeout=10).payload["i"] % 2 for _ in range(3)] in ([0] * 3, [1] * 3)
        wait_until(lambda: router.statistics().depth == 0, what="the targets' depth to drain")
        router.close()
    finally:
        close_quietly(*qds)


# -- strategies through routers ------------------------------------------------------------------


def test_round_robin_spreads_and_sets_input_index(local_queues: Any) -> None:
    qds = local_queues(3)
    router = _router(RoundRobinRouter, qds)
    for i in range(9):
        (conn,) = router.route(Packet(i))
        assert conn.parallel_index == i % 3
    for i, qd in enumerate(qds):
        got = _drain(qd)
        assert [p.payload for p in got] == [i, i + 3, i + 6]
        assert {p.input_index for p in got} == {i}
    stats = router.statistics()
    assert isinstance(stats, RouterStatistics)
    assert stats.routed == 9 and dict(stats.delivered) == {(0, 0): 3, (0, 1): 3, (0, 2): 3}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.routed = 0  # type: ignore[misc]


def test_single_target_reuses_packet_only_when_index_matches(local_queues: Any) -> None:
    (qd,) = local_queues(1)
    router = RoundRobinRouter()
    router.add_connection(Connection(0, 0, "t", qd, target_input_index=0))
    same, other = Packet("a"), Packet("b", input_index=5)
    router.route(same)
    router.route(other)
    got = _drain(qd)
    assert got[0] is same  # local queues pass by reference: no copy was made
    assert got[1] is not other and got[1].input_index == 0 and other.input_index == 5


def test_hash_is_stable_and_matches_key_groups(local_queues: Any) -> None:
    qds = local_queues(3)
    router = HashRouter()
    parallel = [2, 5, 9]  # not 0..n-1: positions index the sorted configured instances
    for p, qd in zip(parallel, qds, strict=True):
        router.add_connection(Connection(0, p, f"t{p}", qd))
    keys = ["user-1", "user-2", 0, "", b"", 0.0, False, 12345, "ü"]
    for key in keys * 3:
        (conn,) = router.route(Packet(key, partition_key=key))
        assert conn.parallel_index == parallel[instance_for_key(key, 3)]
    for qd in qds:
        got = _drain(qd)
        assert len(got) % 3 == 0  # each key landed on one instance, all three times
    with pytest.raises(RoutingError, match="partition_key"):
        router.route(Packet("no key"))


def test_hash_owner_removed_raises_naming_it_unless_rescaled(local_queues: Any) -> None:
    qds = local_queues(2)
    router = HashRouter()
    conns = [Connection(0, i, f"t{i}", qd) for i, qd in enumerate(qds)]
    for c in conns:
        router.add_connection(c)
    key = next(k for k in range(100) if instance_for_key(k, 2) == 1)
    assert router.route(Packet(1, partition_key=key)) == [conns[1]]
    assert router.remove_connection(conns[1]) == 1  # one record not yet consumed
    with pytest.raises(RoutingError, match=r"instance 1 of group 0.*removed"):
        router.route(Packet(2, partition_key=key))
    assert router.statistics().failures == 1
    # What the error advises works as it says: a second removal, with rescale.
    assert router.remove_connection(conns[1], rescale=True) == 0
    assert router.route(Packet(3, partition_key=key)) == [conns[0]]
    with pytest.raises(RoutingError, match="is not connected"):
        router.remove_connection(conns[1], rescale=True)  # nothing of it is left to remove
    assert [p.payload for p in _drain(qds[1])] == [1]
    assert [p.payload for p in _drain(qds[0])] == [3]


def test_broadcast_gives_every_target_its_own_packet(local_queues: Any) -> None:
    qds = local_queues(4)
    router = BroadcastRouter()
    for i, qd in enumerate(qds[:2]):
        router.add_connection(Connection(0, i, "a", qd, target_input_index=0))
    for i, qd in enumerate(qds[2:]):
        router.add_connection(Connection(1, i, "b", qd, target_input_index=1))
    packet = Packet({"v": 1}, headers={"h": 1})
    assert len(router.route(packet)) == 4
    got = [_drain(qd)[0] for qd in qds]
    assert [p.input_index for p in got] == [0, 0, 1, 1]
    assert len({id(p) for p in got} | {id(packet)}) == 5
    got[0].headers["h"] = 2
    assert got[1].headers == {"h": 1} and packet.headers == {"h": 1}


def test_groups_each_get_the_packet_once_by_their_strategy(local_queues: Any) -> None:
    qds = local_queues(4)
    router = RoundRobinRouter()
    for b in (0, 1):
        for p in (0, 1):
            router.add_connection(Connection(b, p, f"g{b}", qds[2 * b + p], target_input_index=b))
    for i in range(4):
        delivered = router.route(i)  # not a Packet: wrapped
        assert sorted(c.broadcast_index for c in delivered) == [0, 1]
    counts = [len(_drain(qd)) for qd in qds]
    assert counts == [2, 2, 2, 2]


def test_packet_strategy_overrides_router(local_queues: Any) -> None:
    qds = local_queues(3)
    router = _router(RoundRobinRouter, qds)
    assert len(router.route(Packet("all", partition_strategy="broadcast"))) == 3
    assert len(router.route(Packet("k", partition_key="k", partition_strategy="hash"))) == 1
    router.route(Packet("rr"))
    with pytest.raises(RoutingError, match="did you mean 'broadcast'"):
        router.route(Packet("x", partition_strategy="brodcast"))
    stats = router.statistics()
    assert dict(stats.by_strategy) == {"round_robin": 1, "broadcast": 1, "hash": 1}
    assert sum(len(_drain(qd)) for qd in qds) == 5


# -- failures ------------------------------------------------------------------------------------


def test_full_instance_is_skipped_and_packets_never_vanish(
    local_queues: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sage_zmq.connection")
    blocked, *free = local_queues(3, maxsize=2)
    router = RoundRobinRouter(timeout=0.05, retry_interval=60.0)
    router.add_connection(Connection(0, 0, "blocked", blocked))
    for i, qd in enumerate(free, 1):
        router.add_connection(Connection(0, i, f"free{i}", qd))
    received: list[Any] = []
    for i in range(30):
        router.route(Packet(i))
        for qd in free:
            received += _drain(qd)
    stats = router.statistics()
    assert stats.stalled == ((0, 0),) and stats.failovers == 1
    # One WARNING when traffic moved away, naming the instance (not one per packet).
    (event,) = [r for r in caplog.records if getattr(r, "sage_event", "") == "failover"]
    assert event.levelname == "WARNING" and "'blocked' [0.0]" in event.getMessage()
    received += _drain(blocked)
    assert sorted(p.payload for p in received) == list(range(30))


def test_hash_to_full_owner_raises_after_timeout(
    local_queues: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sage_zmq.connection")
    (qd,) = local_queues(1, maxsize=1)
    router = HashRouter(timeout=0.05)
    router.add_connection(Connection(0, 0, "only", qd))
    router.route(Packet(0, partition_key="k"))
    with pytest.raises(RoutingError, match=r"'only' \[0.0\] could not take the packet"):
        router.route(Packet(1, partition_key="k"))
    with pytest.raises(RoutingError, match="probed without waiting"):
        router.route(Packet(2, partition_key="k"))
    assert [p.payload for p in _drain(qd)] == [0]
    router.route(Packet(3, partition_key="k"))  # room again: the probe succeeds
    assert router.statistics().stalled == ()
    assert [p.payload for p in _drain(qd)] == [3]
    # The log says what hash routing does: the key's packets do not go elsewhere.
    (event,) = [r for r in caplog.records if getattr(r, "sage_event", "") == "failover"]
    assert "never sent to another instance" in event.getMessage()
    assert "other instances take" not in event.getMessage()


def test_removed_instance_gets_an_end_of_stream_only_when_asked(local_queues: Any) -> None:
    kept, paused, retired = local_queues(3)
    router = RoundRobinRouter()
    conns = [
        Connection(0, i, name, qd)
        for i, (name, qd) in enumerate((("kept", kept), ("paused", paused), ("retired", retired)))
    ]
    for conn in conns:
        router.add_connection(conn)
    for i in range(6):
        router.route(Packet(i))
    assert router.remove_connection(conns[1]) == 2  # two records wait in its queue
    assert router.remove_connection(conns[2], end_stream=True) == 2
    assert router.send_stop_signal() == 1  # the retired one was ended already: not twice
    assert isinstance(_drain(kept)[-1], EndOfStream)
    assert not any(isinstance(x, EndOfStream) for x in _drain(paused))
    ended = _drain(retired)
    assert [p.payload for p in ended[:-1]] == [2, 5] and isinstance(ended[-1], EndOfStream)
    assert router.statistics().stop_signals == 2


def test_broadcast_partial_failure_names_the_target(local_queues: Any) -> None:
    ok, full = local_queues(2, maxsize=1)
    router = BroadcastRouter(timeout=0.05)
    router.add_connection(Connection(0, 0, "ok", ok))
    router.add_connection(Connection(0, 1, "full", full))
    router.route(Packet(0))
    _drain(ok)
    with pytest.raises(NotDelivered, match=r"reached 1 of 2.*'full'") as info:
        router.route(Packet(1))
    assert [c.target_name for c in info.value.delivered] == ["ok"]
    _drain(ok), _drain(full)


def test_route_without_connections_or_after_end_raises(local_queues: Any) -> None:
    (qd,) = local_queues(1)
    router = RoundRobinRouter()
    with pytest.raises(RoutingError, match="no connections"):
        router.route(1)
    router.add_connection(Connection(0, 0, "t", qd))
    with pytest.raises(RoutingError, match="slot"):
        router.add_connection(Connection(0, 0, "again", qd))
    with pytest.raises(RoutingError, match="not connected"):
        router.remove_connection(Connection(0, 3, "t", qd))
    router.send_stop_signal()
    with pytest.raises(RoutingError, match="send_stop_signal"):
        router.route(2)
    assert _drain(qd) == [EndOfStream()]


def test_load_balance_prefers_the_instance_that_consumes(local_queues: Any) -> None:
    stuck, busy = local_queues(2, maxsize=64)
    router = LoadBalanceRouter(load_interval=1e-6)
    router.add_connection(Connection(0, 0, "stuck", stuck))
    router.add_connection(Connection(0, 1, "busy", busy))
    for i in range(200):
        router.route(Packet(i))
        _drain(busy)  # the receiver consumes; its credits report the progress
    delivered = router.statistics().delivered
    assert delivered[(0, 1)] > 5 * delivered[(0, 0)], dict(delivered)
    assert len(_drain(stuck)) == delivered[(0, 0)]


def test_remove_and_add_while_packets_flow(local_queues: Any) -> None:
    qds = local_queues(3, maxsize=100_000)
    router = RoundRobinRouter()
    conns = [Connection(0, i, f"t{i}", qd) for i, qd in enumerate(qds)]
    router.add_connection(conns[0])
    router.add_connection(conns[1])
    stop = threading.Event()
    routed: list[int] = []
    errors: list[BaseException] = []

    def pump() -> None:
        i = 0
        try:
            while not stop.is_set() or i < 3000:
                router.route(Packet(i))
                routed.append(i)
                i += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=pump)
    thread.start()
    try:
        wait_until(lambda: len(routed) > 500, what="packets flowing")
        router.add_connection(conns[2])
        wait_until(lambda: router.statistics().delivered.get((0, 2), 0) > 50, what="new instance")
        router.remove_connection(conns[0])
        n0 = router.statistics().delivered[(0, 0)]
        wait_until(lambda: len(routed) > 2000, what="more packets")
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors
    got = [p.payload for qd in qds for p in _drain(qd)]
    assert sorted(got) == routed
    stats = router.statistics()
    assert stats.delivered[(0, 0)] == n0 and stats.connections == 2


def test_stop_signal_once_per_distinct_queue(local_queues: Any) -> None:
    qd, other = local_queues(2)
    twin = QueueDescriptor.from_dict(qd.to_dict())  # another descriptor, same queue
    router = BroadcastRouter()
    router.add_connection(Connection(0, 0, "a", qd, target_input_index=0))
    router.add_connection(Connection(1, 0, "a", twin, target_input_index=1))
    router.add_connection(Connection(2, 0, "b", other))
    assert len(router.route("x")) == 3
    assert router.send_stop_signal() == 2
    assert router.send_stop_signal() == 0  # idempotent: a second END would count twice
    got = _drain(qd)
    assert [p.input_index for p in got[:2]] == [0, 1] and got[2:] == [EndOfStream()]
    assert _drain(other)[1:] == [EndOfStream()]
    assert router.statistics().stop_signals == 2


def test_close_flushes_but_leaves_descriptors_open(local_queues: Any) -> None:
    (qd,) = local_queues(1)
    with RoundRobinRouter() as router:
        router.add_connection(Connection(0, 0, "t", qd))
        router.route("a")
    with pytest.raises(RoutingError, match="closed"):
        router.route("b")
    qd.put("direct")
    assert [getattr(x, "payload", x) for x in _drain(qd)] == ["a", "direct"]


# -- construction --------------------------------------------------------------------------------


def test_make_router_by_name_config_and_dict() -> None:
    assert isinstance(make_router("hash"), HashRouter)
    assert isinstance(make_router("Round-Robin"), RoundRobinRouter)
    cfg = load_config({"communication": {"router": {"strategy": "broadcast"}}})
    assert isinstance(make_router(cfg), BroadcastRouter)
    r = make_router({"strategy": "hash", "max_parallelism": 256})
    assert isinstance(r, HashRouter) and r.max_parallelism == 256
    assert isinstance(
        make_router({"communication": {"router": {"strategy": "load_balance"}}}), LoadBalanceRouter
    )
    with pytest.raises(RoutingError, match="did you mean 'hash'"):
        make_router("hsah")
    with pytest.raises(RoutingError, match="always routes by 'hash'"):
        HashRouter(strategy="broadcast")
    with pytest.raises(RoutingError, match="timeout"):
        RoundRobinRouter(timeout=0)
    with pytest.raises(RoutingError, match="load_tracking"):
        LoadBalanceRouter(load_tracking={"nope": 1})
    assert BaseRouter(strategy="broadcast").strategy == "broadcast"


# -- mixed transports and processes ----------------------------------------------------------------


def test_mixed_local_shm_tcp_targets_share_one_socket_per_endpoint() -> None:
    qds = [QueueDescriptor(queue_type=t) for t in ("local", "shm", "tcp")]
    try:
        router = RoundRobinRouter()
        for i, qd in enumerate(qds):
            router.add_connection(Connection(0, i, qd.queue_type, qd))
        # a second group names the tcp queue again: same endpoint, same producer
        router.add_connection(
            Connection(1, 0, "tcp-again", QueueDescriptor.from_json(qds[2].to_json()))
        )
        for i in range(30):
            router.route(Packet(i))
        router.close()
        got = {
            qd.queue_type: [p.payload for p in _take(qd, n)]
            for qd, n in zip(qds, (10, 10, 40), strict=True)
        }
        assert got["local"] == list(range(0, 30, 3)) and got["shm"] == list(range(1, 30, 3))
        assert sorted(got["tcp"]) == sorted([*range(2, 30, 3), *range(30)])
        assert qds[2].statistics().producers == 1
    finally:
        close_quietly(*qds)


def _take(qd: QueueDescriptor, n: int) -> list[Any]:
    return [qd.get(timeout=10) for _ in range(n)]


def upstream_worker(pipe: Pipe, targets: list[QueueDescriptor], tag: str, n: int) -> None:
    """Spawned: hash-route ``n`` keyed records to ``targets``, end the stream, report."""
    router = HashRouter()
    for i, qd in enumerate(targets):
        router.add_connection(Connection(0, i, f"down{i}", qd))
    for i in range(n):
        router.route(Packet([tag, i], partition_key=f"key-{i % 50}"))
    router.send_stop_signal()
    router.close()
    for qd in targets:
        qd.close()
    pipe.send(("done", router.statistics().routed))


def test_processes_hash_route_over_shm_and_end_cleanly() -> None:
    downs = [QueueDescriptor(queue_type="shm", upstreams=2) for _ in range(2)]
    try:
        for qd in downs:
            with pytest.raises(Empty):
                qd.get(timeout=0.001)  # bind before the upstreams connect
        with (
            spawn_worker(upstream_worker, downs, "a", 500) as a,
            spawn_worker(upstream_worker, downs, "b", 500) as b,
        ):
            seen: list[list[Any]] = [[], []]
            for i, qd in enumerate(downs):
                for item in qd:  # iteration ends at EndOfStream from both upstreams
                    seen[i].append(item)
            assert a.recv() == ("done", 500) and b.recv() == ("done", 500)
        for i, records in enumerate(seen):
            keys = {p.partition_key for p in records}
            assert all(instance_for_key(k, 2) == i for k in keys)
            per_tag = Counter(p.payload[0] for p in records)
            assert sum(per_tag.values()) == len(records)
        assert sum(len(s) for s in seen) == 1000
        for tag in "ab":  # FIFO per upstream per instance
            for records in seen:
                idx = [p.payload[1] for p in records if p.payload[0] == tag]
                assert idx == sorted(idx)
    finally:
        close_quietly(*downs)


def test_get_nowait_right_after_routing_sees_every_packet_routed_in_this_thread(
    local_queues: Any,
) -> None:
    """A burst switches the producers to batching; the thread that routed it and then asks
    (get_nowait, empty) must not miss the last partial batch until a flush interval later."""
    queues = local_queues(3, metadata={"maxsize": 100_000})
    router = HashRouter()
    for i, q in enumerate(queues):
        router.add_connection(Connection(0, i, "w", q))
    for k in range(400):
        router.route(Packet(payload=k, partition_key=f"key-{k}"))
    got = 0
    for q in queues:
        while not q.empty():
            q.get_nowait()
            got += 1
    assert got == 400


def test_an_end_asked_at_removal_waits_for_the_queues_last_connection(local_queues: Any) -> None:
    (shared,) = local_queues(1)
    router = BroadcastRouter()
    first, second = Connection(0, 0, "a", shared), Connection(1, 0, "b", shared)
    router.add_connection(first)
    router.add_connection(second)
    router.route(Packet("x"))
    router.remove_connection(first, end_stream=True)  # the queue is still fed through second
    assert not any(isinstance(x, EndOfStream) for x in _drain(shared))
    router.remove_connection(second)  # its last connection: the end asked for goes now
    assert isinstance(_drain(shared)[-1], EndOfStream)


def test_an_end_that_failed_at_removal_is_sent_by_send_stop_signal(
    local_queues: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept, retired = local_queues(2)
    router = RoundRobinRouter(timeout=0.05)
    conns = [Connection(0, 0, "kept", kept), Connection(0, 1, "retired", retired)]
    for conn in conns:
        router.add_connection(conn)
    router.route(Packet(0))
    router.route(Packet(1))
    real_put = router._put_to
    failures = iter([sage_zmq.DeliveryError("the consumer is away")])

    def put_once_failing(target: Any, item: Any, wait: float) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real_put(target, item, wait)

    monkeypatch.setattr(router, "_put_to", put_once_failing)
    with pytest.raises(NotDelivered, match="send_stop_signal tries again"):
        router.remove_connection(conns[1], end_stream=True)
    assert router.send_stop_signal() == 2  # the retired one's end, then the kept one's
    ended = _drain(retired)
    assert [p.payload for p in ended[:-1]] == [1] and isinstance(ended[-1], EndOfStream)
    assert isinstance(_drain(kept)[-1], EndOfStream)
    assert router.statistics().stop_signals == 2
