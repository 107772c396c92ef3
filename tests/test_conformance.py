"""The contract every queue type keeps (see ``sage_zmq.testing`` for the checks themselves)."""

from __future__ import annotations

import os
import threading

import pytest

from sage_zmq import QueueDescriptor, _runtime
from sage_zmq import testing as conf
from sage_zmq.testing import DescriptorFactory


def test_fifo_per_producer_threads(make_descriptor: DescriptorFactory) -> None:
    conf.check_fifo_per_producer(make_descriptor)


def test_timeouts_raise_on_time(make_descriptor: DescriptorFactory) -> None:
    conf.check_timeouts(make_descriptor)


def test_a_stage_that_waits_for_input_ships_its_tail(make_descriptor: DescriptorFactory) -> None:
    conf.check_waiting_stage_ships_its_tail(make_descriptor)


def test_close_wakes_blocked_callers(make_descriptor: DescriptorFactory) -> None:
    conf.check_close_wakes_blocked_callers(make_descriptor)


def test_maxsize_backpressure(make_descriptor: DescriptorFactory) -> None:
    conf.check_backpressure(make_descriptor)


def test_end_of_stream_after_every_upstream(make_descriptor: DescriptorFactory) -> None:
    conf.check_end_of_stream(make_descriptor)


def test_descriptor_round_trips(make_descriptor: DescriptorFactory) -> None:
    conf.check_round_trips(make_descriptor)


def test_records_of_every_kind(make_descriptor: DescriptorFactory) -> None:
    conf.check_records(make_descriptor)


def test_large_payloads(make_descriptor: DescriptorFactory) -> None:
    conf.check_large_payloads(make_descriptor)


def test_unencodable_record(make_descriptor: DescriptorFactory) -> None:
    conf.check_unencodable_record(make_descriptor)


def test_inspection_and_statistics(make_descriptor: DescriptorFactory) -> None:
    conf.check_inspection(make_descriptor)


def test_close_without_consumer_reports_delivery_error(
    make_descriptor: DescriptorFactory,
) -> None:
    conf.check_delivery_error(make_descriptor)


def test_closing_with_unread_records_says_so(
    make_descriptor: DescriptorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sage_zmq.queue")
    qd = make_descriptor(maxsize=100)
    reliable = qd.queue_type == "sage"
    for i in range(10):
        qd.put(i, timeout=conf.GET_TIMEOUT)
    qd.flush()
    assert [qd.get(timeout=conf.GET_TIMEOUT) for _ in range(3)] == [0, 1, 2]
    conf.wait_until(lambda: qd.qsize() == 7, what="the other records to arrive")
    qd.close()
    told = [r for r in caplog.records if "never read" in r.getMessage()]
    assert len(told) == 1 and "7 records" in told[0].getMessage(), told
    # Unacknowledged records of a reliable queue go to the next consumer; others are gone.
    assert told[0].levelname == ("INFO" if reliable else "WARNING")
    assert ("send them again" if reliable else "they are gone") in told[0].getMessage()


# ------------------------------------------------------------------ across processes
def test_spawned_producers_fifo(make_remote_descriptor: DescriptorFactory) -> None:
    conf.check_process_producers(make_remote_descriptor)


def test_spawned_upstreams_end_of_stream(make_remote_descriptor: DescriptorFactory) -> None:
    conf.check_end_of_stream_processes(make_remote_descriptor)


def test_spawned_producer_tail_is_delivered(make_remote_descriptor: DescriptorFactory) -> None:
    conf.check_producer_tail(make_remote_descriptor)


def test_spawned_consumer() -> None:
    # tcp without an endpoint binds in the creating process, so only shm can move its consumer.
    conf.check_spawned_consumer(conf.descriptor_factory("shm"))


def test_local_from_another_process_is_a_descriptor_error() -> None:
    conf.check_local_rejects_other_process(conf.descriptor_factory("local"))


@pytest.mark.parametrize("to", ["shm", "tcp"])
def test_local_promotion(to: str) -> None:
    conf.check_local_promotion(conf.descriptor_factory("local"), to=to)


# ------------------------------------------------------------------ endpoints and cleanup
def test_tcp_without_endpoint_binds_at_once() -> None:
    import re
    import socket

    qd = QueueDescriptor("tcp-auto", "tcp")
    try:
        m = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", qd.endpoint or "")
        assert m and int(m.group(1)) > 0, qd.endpoint
        # Something already listens there: the descriptor is connectable before any get().
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=5):
            pass
        clone = QueueDescriptor.from_json(qd.to_json())
        assert clone.endpoint == qd.endpoint, "a restored descriptor must not bind again"
        clone.put("hello", timeout=conf.GET_TIMEOUT)
        assert qd.get(timeout=conf.GET_TIMEOUT) == "hello"
    finally:
        conf.close_quietly(qd)


def test_tcp_descriptor_closed_unused_releases_its_socket() -> None:
    before = _open_socket_count()
    qd = QueueDescriptor("tcp-unused", "tcp")
    try:
        assert _open_socket_count() == before + 1  # bound early, see above
        qd.close()
        assert _open_socket_count() == before, "close() of an unused tcp descriptor leaked"
    finally:
        qd.close()  # releases the early socket even when an assertion above failed


def test_shm_long_queue_id_gets_short_ipc_path() -> None:
    qd = QueueDescriptor("q" * 200, "shm")
    try:
        assert qd.endpoint is not None and qd.endpoint.startswith("ipc://")
        assert len(qd.endpoint[len("ipc://") :].encode()) <= 107, qd.endpoint
        qd.put({"ok": True}, timeout=conf.GET_TIMEOUT)
        assert qd.get(timeout=conf.GET_TIMEOUT) == {"ok": True}
    finally:
        conf.close_quietly(qd)


def test_close_releases_everything(queue_type: str) -> None:
    sockets = _open_socket_count()
    qd = conf.descriptor_factory(queue_type)()
    for i in range(100):
        qd.put(i, timeout=conf.GET_TIMEOUT)
    assert conf.drain(qd, 100) == list(range(100))
    qd.close()
    assert _open_socket_count() == sockets
    key = (qd.queue_type, str(qd.endpoint))
    assert key not in _runtime._handles, "the queue handle survived close()"


def test_local_channel_released_on_close() -> None:
    qd = conf.descriptor_factory("local")()
    qd.put(1, timeout=conf.GET_TIMEOUT)
    assert qd.get(timeout=conf.GET_TIMEOUT) == 1
    qd.close()
    leftover = [k for k in _runtime._handles if str(qd.endpoint) in k[1]]
    assert not leftover, f"close() left {leftover} in the process-wide handle table"


def test_ipc_file_removed_on_close() -> None:
    import os

    qd = conf.descriptor_factory("shm")()
    qd.put(1, timeout=conf.GET_TIMEOUT)
    assert qd.get(timeout=conf.GET_TIMEOUT) == 1
    path = str(qd.endpoint)[len("ipc://") :]
    assert os.path.exists(path)
    qd.close()
    assert not os.path.exists(path), f"{path} outlived the consumer"


def _open_socket_count() -> int:
    ctx = _runtime._context
    return 0 if ctx is None else sum(1 for s in list(ctx._sockets) if not s.closed)


def test_a_forked_child_forgets_the_parents_batching_producers() -> None:
    # The forking thread and the child's main thread share an ident: without the reset, a
    # child's get() would ship a parent producer's batch on the parent's socket.
    class Batching:
        putter = threading.get_ident()

        def ship_partial(self) -> None:
            raise AssertionError("not in a child")

    parents = Batching()
    _runtime.batching(parents, True)
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: answer and leave at once, no cleanup of the parent's state
            os.write(write, b"forgot" if not _runtime.batching_in_this_thread() else b"kept")
            os._exit(0)
        os.close(write)
        try:
            answer = os.read(read, 16)
        finally:
            os.close(read)
            os.waitpid(pid, 0)
        assert answer == b"forgot"
        assert parents in _runtime.batching_in_this_thread()  # the parent still has it
    finally:
        _runtime.batching(parents, False)


@pytest.mark.parametrize("queue_type", ["tcp", "sage"])
def test_ipv6_loopback_endpoints_work(queue_type: str) -> None:
    # libzmq is IPv4-only unless told; an IPv6 literal turns IPv6 on for that socket.
    qd = QueueDescriptor(None, queue_type, {"endpoint": "tcp://[::1]:0"})
    try:
        assert (qd.endpoint or "").startswith("tcp://[::1]:") and not qd.endpoint.endswith(":0")
        clone = QueueDescriptor.from_json(qd.to_json())
        clone.put("over ::1", timeout=conf.GET_TIMEOUT)
        assert qd.get(timeout=conf.GET_TIMEOUT) == "over ::1"
    finally:
        conf.close_quietly(qd)
