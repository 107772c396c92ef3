"""Conformance checks every queue type must pass, and helpers for tests that use queues.

A queue type's author (or a user checking a deployment) calls the ``check_*`` functions with a
*descriptor factory*: ``make(**metadata) -> QueueDescriptor`` returning a fresh queue each call
(see :func:`descriptor_factory`). Each check creates what it needs, asserts the contract, and
closes everything it opened, also when it fails. Child processes are started with the
``spawn`` method (like a real deployment's workers) and receive the descriptor as an argument;
their entry points live here so that any process can import them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue as stdlib_queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import FrozenInstanceError
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from sage_zmq.descriptor import QueueDescriptor, lookup_queue_type
from sage_zmq.errors import (
    DeliveryError,
    Empty,
    EncodeError,
    Full,
    QueueClosed,
    SageZmqError,
)
from sage_zmq.flow.clock import FakeClock
from sage_zmq.packet import EndOfStream, Packet

__all__ = [
    "GET_TIMEOUT",
    "DescriptorFactory",
    "FakeClock",
    "Worker",
    "assert_same_record",
    "check_backpressure",
    "check_close_wakes_blocked_callers",
    "check_delivery_error",
    "check_end_of_stream",
    "check_end_of_stream_processes",
    "check_fifo_per_producer",
    "check_inspection",
    "check_large_payloads",
    "check_local_promotion",
    "check_local_rejects_other_process",
    "check_process_producers",
    "check_producer_tail",
    "check_records",
    "check_round_trips",
    "check_spawned_consumer",
    "check_timeouts",
    "check_unencodable_record",
    "check_waiting_stage_ships_its_tail",
    "close_quietly",
    "consume_worker",
    "descriptor_factory",
    "drain",
    "produce_worker",
    "sample_records",
    "spawn_worker",
    "try_use_worker",
    "wait_until",
]

GET_TIMEOUT = 10.0
"""Bound on every blocking call in the checks: a hang fails instead of stalling a suite."""

DescriptorFactory = Callable[..., QueueDescriptor]


def descriptor_factory(queue_type: str, **defaults: Any) -> DescriptorFactory:
    """``make(**metadata)``: a new queue of ``queue_type`` with a unique id per call."""

    def make(queue_id: str | None = None, **metadata: Any) -> QueueDescriptor:
        qid = queue_id or f"conf-{queue_type}-{os.urandom(4).hex()}"
        return QueueDescriptor(qid, queue_type, {**defaults, **metadata})

    return make


# ------------------------------------------------------------------------------ small helpers
def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``condition`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def close_quietly(*descriptors: QueueDescriptor, timeout: float = 1.0) -> None:
    """Close ends without raising (cleanup after a failure must not mask it)."""
    for qd in descriptors:
        with contextlib.suppress(Exception):
            qd.close(timeout=timeout)


@contextlib.contextmanager
def released(qd: QueueDescriptor) -> Iterator[QueueDescriptor]:
    """Yield ``qd``; then end whatever it opened (a tcp descriptor binds on creation)."""
    try:
        yield qd
    finally:
        with contextlib.suppress(Empty):
            qd.get_nowait()
        qd.close()


@contextlib.contextmanager
def _closing(*descriptors: QueueDescriptor) -> Iterator[None]:
    try:
        yield
    except BaseException:
        close_quietly(*descriptors)
        raise
    for qd in descriptors:
        qd.close()


def drain(qd: QueueDescriptor, n: int, timeout: float = GET_TIMEOUT) -> list[Any]:
    """Get exactly ``n`` records, each within ``timeout`` seconds."""
    out = []
    for _ in range(n):
        try:
            out.append(qd.get(timeout=timeout))
        except Empty:
            raise AssertionError(
                f"queue {qd.queue_id!r}: only {len(out)} of {n} records arrived"
            ) from None
    return out


def _by_reference(qd: QueueDescriptor) -> bool:
    return bool(lookup_queue_type(qd.queue_type).capabilities.by_reference)


def _cross_process(qd: QueueDescriptor) -> bool:
    return bool(lookup_queue_type(qd.queue_type).capabilities.cross_process)


def _check_per_producer(records: list[Any], expected: dict[str, int]) -> None:
    """Records are ``[tag, i]``: each tag's ``i`` must run 0..n-1 in order, each exactly once."""
    seen: dict[str, list[int]] = {}
    for record in records:
        assert isinstance(record, list | tuple) and len(record) == 2, f"odd record {record!r}"
        seen.setdefault(record[0], []).append(record[1])
    assert set(seen) == set(expected), f"producers seen {sorted(seen)}, expected {sorted(expected)}"
    for tag, n in expected.items():
        got = seen[tag]
        if got != list(range(n)):
            dupes = len(got) - len(set(got))
            missing = n - len(set(got) & set(range(n)))
            raise AssertionError(
                f"producer {tag!r}: {len(got)} records, {missing} missing, {dupes} duplicated, "
                f"in order: {got == sorted(got)}"
            )


# ------------------------------------------------------------------------------ processes
class Worker:
    """A spawned child process plus the parent's end of a pipe to it."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    def recv(self, timeout: float = GET_TIMEOUT) -> Any:
        """The child's next message; raises if none comes (or the child died) in time."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.process.is_alive() and not self.conn.poll(0):
                raise AssertionError(
                    f"worker {self.process.name} exited with {self.process.exitcode} "
                    "without answering"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.process.name} sent nothing in {timeout} s")
        message = self.conn.recv()
        if isinstance(message, tuple) and message and message[0] == "crash":
            raise AssertionError(f"worker {self.process.name} failed:\n{message[1]}")
        return message

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def join(self, timeout: float = GET_TIMEOUT) -> int:
        """Wait for the child to exit; its exit code (AssertionError if it does not exit)."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise AssertionError(f"worker {self.process.name} did not exit within {timeout} s")
        return int(self.process.exitcode)


@contextlib.contextmanager
def spawn_worker(target: Callable[..., Any], *args: Any) -> Iterator[Worker]:
    """Run ``target(conn, *args)`` in a spawned process; ended (by handle) on leaving.

    ``target`` must be importable (a module-level function). An exception in it is sent to
    the parent as ``("crash", traceback)``, which :meth:`Worker.recv` raises.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_run_worker, args=(child, target, *args), daemon=True)
    process.start()
    child.close()
    try:
        yield Worker(process, parent)
    finally:
        process.join(GET_TIMEOUT)
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        parent.close()
        process.close()


def _run_worker(conn: Connection, target: Callable[..., Any], *args: Any) -> None:
    try:
        target(conn, *args)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("crash", traceback.format_exc()))
        raise
    finally:
        conn.close()


def _error_info(exc: BaseException) -> tuple[str, str, list[str]]:
    return (type(exc).__name__, str(exc), [c.__name__ for c in type(exc).__mro__])


def produce_worker(
    conn: Connection,
    qd: QueueDescriptor,
    tag: str,
    n: int,
    end: bool = False,
    exit_at_once: bool = False,
) -> None:
    """Child: put ``[tag, i]`` for i < n (then ``EndOfStream`` if ``end``), close, report.

    Reports ``("closed", None)`` or ``("closed", error info)``. With ``exit_at_once`` the
    process ends right after reporting, skipping interpreter teardown.
    """
    conn.send(("started", os.getpid()))
    for i in range(n):
        qd.put([tag, i], timeout=GET_TIMEOUT)
    if end:
        qd.put(EndOfStream(), timeout=GET_TIMEOUT)
    try:
        qd.close()
        result: Any = None
    except SageZmqError as exc:
        result = _error_info(exc)
    conn.send(("closed", result))
    if exit_at_once:
        conn.close()
        os._exit(0)


def consume_worker(conn: Connection, qd: QueueDescriptor, n: int) -> None:
    """Child: open the consumer, say ``ready``, get ``n`` records and send them back, then
    stay open until the parent says ``bye`` (its producer's close() needs a live consumer)."""
    with contextlib.suppress(Empty):
        qd.get_nowait()  # opens (binds) the consumer before the parent starts producing
    conn.send(("ready", None))
    records = drain(qd, n)
    conn.send(("records", records))
    if conn.poll(GET_TIMEOUT):
        conn.recv()
    qd.close()


def try_use_worker(conn: Connection, qd: QueueDescriptor, op: str) -> None:
    """Child: try ``qd.put`` or ``qd.get`` once and report what it raised (or None)."""
    try:
        if op == "put":
            qd.put("x", timeout=1.0)
        else:
            qd.get(timeout=1.0)
        result: Any = None
    except BaseException as exc:
        result = _error_info(exc)
    with contextlib.suppress(Exception):
        qd.close(timeout=0.5)
    conn.send(("result", result))


# ------------------------------------------------------------------------------ records
def sample_records() -> list[Any]:
    """One record of every kind the wire carries (see ``transports/PROTOCOL.md`` §7)."""
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    structured["a"] = [1, 2, 3]
    return [
        {"a": 1, "b": [1, 2, {"c": None}]},
        [1, "two", 3.0, None],
        "text ü",
        "",
        b"\x00bytes\xff",
        b"",
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        -0.0,
        True,
        False,
        None,
        {"nested": {"deeper": [[1, 2], {"x": b"y"}], "t": (1, 2)}},
        (1, "tuple", (2, 3)),
        {1: "int key", "s": "str key"},
        {(1, 2): "tuple key", ((3, "a"), 4): [5], "s": {(6,): "nested"}},
        Packet(
            {"v": 1},
            input_index=2,
            partition_key=0,
            partition_strategy="hash",
            headers={"trace": "t1"},
            timestamp=12.5,
        ),
        Packet("p", partition_key=""),
        Packet(b"p", partition_key=False),
        Packet(None, partition_key=b""),
        Packet(Packet([1, 2], partition_key=7), partition_key=1.25),
        Packet(EndOfStream("nested-source")),
        {"marker": EndOfStream()},
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.arange(10, dtype=np.int32),
        np.array([1, 2, 255], dtype=np.uint8),
        np.array([True, False]),
        np.array([1 + 2j, -3j], dtype=np.complex128),
        np.array([1.5, np.nan], dtype=np.float16),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.array(3.25),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        structured,
        np.float64(2.5),
    ]


def _wire_form(value: Any) -> Any:
    # What a value becomes on a serialising queue: tuples arrive as lists, numpy scalars as
    # Python numbers.
    if isinstance(value, tuple):
        return [_wire_form(v) for v in value]
    if isinstance(value, list):
        return [_wire_form(v) for v in value]
    if isinstance(value, dict):
        return {k: _wire_form(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def assert_same_record(sent: Any, got: Any, *, by_reference: bool, path: str = "record") -> None:
    """``got`` is ``sent`` after a trip through a queue (identical object if by reference)."""
    if by_reference:
        assert got is sent, f"{path}: a by-reference queue returned a different object"
        return
    sent = _wire_form(sent)
    if isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: expected ndarray, got {type(got)}"
        assert got.dtype == sent.dtype, f"{path}: dtype {got.dtype} != {sent.dtype}"
        assert got.shape == sent.shape, f"{path}: shape {got.shape} != {sent.shape}"
        nan_ok = sent.dtype.kind in "fc"
        assert np.array_equal(got, sent, equal_nan=nan_ok), f"{path}: values differ"
    elif isinstance(sent, Packet):
        assert isinstance(got, Packet), f"{path}: expected Packet, got {type(got)}"
        for name in Packet.__slots__:
            assert_same_record(
                getattr(sent, name), getattr(got, name), by_reference=False, path=f"{path}.{name}"
            )
    elif isinstance(sent, EndOfStream):
        assert isinstance(got, EndOfStream), f"{path}: expected EndOfStream, got {got!r}"
        assert got.source == sent.source, f"{path}: source {got.source!r} != {sent.source!r}"
    elif isinstance(sent, list):
        assert isinstance(got, list), f"{path}: expected list, got {type(got).__name__}"
        assert len(got) == len(sent), f"{path}: length {len(got)} != {len(sent)}"
        for i, (s, g) in enumerate(zip(sent, got, strict=True)):
            assert_same_record(s, g, by_reference=False, path=f"{path}[{i}]")
    elif isinstance(sent, dict):
        assert isinstance(got, dict), f"{path}: expected dict, got {type(got).__name__}"
        assert set(got) == set(sent), f"{path}: keys {sorted(map(repr, got))}"
        for k in sent:
            assert_same_record(sent[k], got[k], by_reference=False, path=f"{path}[{k!r}]")
    else:
        assert type(got) is type(sent), f"{path}: type {type(got).__name__} != {type(sent)}"
        assert got == sent, f"{path}: {got!r} != {sent!r}"
        if isinstance(sent, float) and sent == 0.0:
            assert str(got) == str(sent), f"{path}: sign of zero lost"


# ------------------------------------------------------------------------------ the checks
def check_fifo_per_producer(
    make_descriptor: DescriptorFactory, producers: int = 4, n: int = 2500
) -> None:
    """Threads put ``[tag, i]``; one consumer sees each thread's records once, in order."""
    qd = make_descriptor(maxsize=1000)
    errors: list[BaseException] = []

    def produce(tag: str) -> None:
        try:
            for i in range(n):
                qd.put([tag, i], timeout=GET_TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    with _closing(qd):
        threads = [threading.Thread(target=produce, args=(f"t{k}",)) for k in range(producers)]
        for t in threads:
            t.start()
        try:
            records = drain(qd, producers * n)
        finally:
            for t in threads:
                t.join(GET_TIMEOUT)
        assert not errors, f"producer threads failed: {errors!r}"
        assert not any(t.is_alive() for t in threads), "a producer thread did not finish"
        _check_per_producer(records, {f"t{k}": n for k in range(producers)})
        with contextlib.suppress(Empty):
            extra = qd.get(timeout=0.05)
            raise AssertionError(f"a record arrived twice or from nowhere: {extra!r}")


def check_process_producers(
    make_descriptor: DescriptorFactory, processes: int = 2, n: int = 5000
) -> None:
    """Spawned processes (descriptor passed as an argument) feed one consumer: FIFO each."""
    qd = make_descriptor(maxsize=1000)
    with _closing(qd), contextlib.ExitStack() as stack:
        with contextlib.suppress(Empty):
            qd.get_nowait()  # the consumer is open before any producer starts
        workers = [
            stack.enter_context(spawn_worker(produce_worker, qd, f"p{k}", n))
            for k in range(processes)
        ]
        records = drain(qd, processes * n)
        for w in workers:
            assert w.recv()[0] == "started"
            assert w.recv() == ("closed", None)
            assert w.join() == 0
        _check_per_producer(records, {f"p{k}": n for k in range(processes)})
        with contextlib.suppress(Empty):
            extra = qd.get(timeout=0.05)
            raise AssertionError(f"a record arrived twice or from nowhere: {extra!r}")


def check_waiting_stage_ships_its_tail(make_descriptor: DescriptorFactory, n: int = 50) -> None:
    """A thread about to wait for input sends what it put and has not sent yet, at once: a
    pipeline stage that ran dry does not hold the tail of its burst for ``flush_interval``."""
    inbox = make_descriptor(maxsize=100)
    out = make_descriptor(maxsize=1000, flush_interval=60.0)  # the background flush: a minute
    got: list[Any] = []

    def downstream() -> None:  # another thread: its waits must not be what sends the tail
        for _ in range(n):
            try:
                got.append(out.get(timeout=GET_TIMEOUT))
            except Empty:
                return

    with _closing(inbox, out):
        with contextlib.suppress(Empty):
            inbox.get_nowait()  # consumer ends open before the producers
        with contextlib.suppress(Empty):
            out.get_nowait()
        reader = threading.Thread(target=downstream, name="conf-downstream")
        for i in range(n):
            out.put(i, timeout=GET_TIMEOUT)  # a burst: the producer batches its tail
        reader.start()
        try:
            with contextlib.suppress(Empty):
                inbox.get(timeout=0.2)  # this stage now waits for input
        finally:
            reader.join(GET_TIMEOUT + 5)
        assert got == list(range(n)), f"{len(got)} of {n} records left a stage that went idle"


def check_timeouts(make_descriptor: DescriptorFactory, timeout: float = 0.2) -> None:
    """``Empty``/``Full`` are raised roughly on time and are ``queue.Empty``/``queue.Full``."""
    qd = make_descriptor(maxsize=2)
    with _closing(qd):
        t0 = time.monotonic()
        try:
            qd.get(timeout=timeout)
            raise AssertionError("get() on an empty queue returned")
        except Empty as exc:
            assert isinstance(exc, stdlib_queue.Empty) and isinstance(exc, SageZmqError)
        elapsed = time.monotonic() - t0
        assert timeout * 0.9 <= elapsed < timeout + 1.0, f"Empty after {elapsed:.3f} s"
        t0 = time.monotonic()
        try:
            qd.get_nowait()
            raise AssertionError("get_nowait() on an empty queue returned")
        except stdlib_queue.Empty:
            pass
        assert time.monotonic() - t0 < 0.1
        qd.put(1, timeout=GET_TIMEOUT)
        qd.put(2, timeout=GET_TIMEOUT)
        t0 = time.monotonic()
        try:
            qd.put(3, timeout=timeout)
            raise AssertionError("put() beyond maxsize with no consumer reading returned")
        except Full as exc:
            assert isinstance(exc, stdlib_queue.Full) and isinstance(exc, SageZmqError)
        elapsed = time.monotonic() - t0
        assert timeout * 0.9 <= elapsed < timeout + 1.0, f"Full after {elapsed:.3f} s"
        try:
            qd.put_nowait(4)
            raise AssertionError("put_nowait() beyond maxsize returned")
        except stdlib_queue.Full:
            pass
        assert drain(qd, 2) == [1, 2]


def _role_is_not(qd: QueueDescriptor, role: str) -> bool:
    return qd.statistics().role != role


def _waits_for_credit(qd: QueueDescriptor) -> bool:
    return qd.statistics().credit_waits > 0


def check_close_wakes_blocked_callers(make_descriptor: DescriptorFactory) -> None:
    """``close()`` from another thread ends a ``get()`` / ``put()`` blocked without a timeout
    (they raise ``QueueClosed``) and returns within its own timeout; ``empty()`` never waits
    for a blocked ``get()`` (``queue.Queue.empty`` does not block)."""
    for side in ("get", "put"):
        qd = make_descriptor(maxsize=2)
        outcome: list[str] = []

        def blocked(qd: QueueDescriptor = qd, side: str = side, out: list[str] = outcome) -> None:
            try:
                if side == "get":
                    qd.get()
                else:
                    for i in range(100):  # no consumer reads: blocks at maxsize + a batch
                        qd.put(i)
                out.append("returned")
            except QueueClosed:
                out.append("closed")
            except BaseException as exc:
                out.append(repr(exc))

        with _closing(qd):
            if side == "put":
                qd.qsize()  # a tcp queue's consumer end was bound here: open it to close it
            thread = threading.Thread(target=blocked, daemon=True)
            thread.start()
            if side == "get":
                wait_until(partial(_role_is_not, qd, "idle"), what="get() to start")
                t0 = time.monotonic()
                qd.empty()
                assert time.monotonic() - t0 < 0.5, "empty() waited for a blocked get()"
            else:
                wait_until(partial(_waits_for_credit, qd), what="put() to block")
            t0 = time.monotonic()
            with contextlib.suppress(DeliveryError):  # the put side: records nobody took
                qd.close(timeout=1.0)
            elapsed = time.monotonic() - t0
            thread.join(GET_TIMEOUT)
            assert not thread.is_alive(), f"close() did not end the blocked {side}()"
            assert elapsed < 3.0, f"close() took {elapsed:.1f} s behind a blocked {side}()"
            assert outcome == ["closed"], f"the blocked {side}() ended with {outcome}"


def check_backpressure(
    make_descriptor: DescriptorFactory, maxsize: int = 50, batch_size: int = 10
) -> None:
    """No consumer reading: a producer gets at most ``maxsize`` (+ one batch) ahead, then Full;
    every record it accepted arrives once the consumer reads."""
    qd = make_descriptor(maxsize=maxsize, batch_size=batch_size)
    with _closing(qd):
        accepted = 0
        for i in range(maxsize + batch_size + 1):
            try:
                qd.put(i, timeout=0.2)
            except Full:
                break
            accepted += 1
        else:
            raise AssertionError(
                f"{accepted} puts succeeded with maxsize={maxsize} and nobody reading"
            )
        assert accepted >= maxsize, f"only {accepted} puts fit in maxsize={maxsize}"
        assert drain(qd, accepted) == list(range(accepted))
        with contextlib.suppress(Empty):
            extra = qd.get(timeout=0.05)
            raise AssertionError(f"a rejected record arrived: {extra!r}")
        # Room comes back once the consumer has read.
        qd.put("after", timeout=GET_TIMEOUT)
        assert qd.get(timeout=GET_TIMEOUT) == "after"


def check_end_of_stream(make_descriptor: DescriptorFactory, n: int = 500) -> None:
    """Three upstreams: ``EndOfStream`` only after all three ended, then at once, forever."""
    qd = make_descriptor(upstreams=3, maxsize=2 * n + 10)
    errors: list[BaseException] = []

    def produce(tag: str) -> None:
        try:
            for i in range(n):
                qd.put([tag, i], timeout=GET_TIMEOUT)
            qd.put(EndOfStream(), timeout=GET_TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    with _closing(qd):
        first = [threading.Thread(target=produce, args=(tag,)) for tag in ("a", "b")]
        for t in first:
            t.start()
        for t in first:
            t.join(GET_TIMEOUT)
        assert not errors, f"producers failed: {errors!r}"
        records = drain(qd, 2 * n)
        # Two of three upstreams ended: the stream has not.
        try:
            early = qd.get(timeout=0.2)
            raise AssertionError(f"got {early!r} although upstream 'c' has not ended")
        except Empty:
            pass
        last = threading.Thread(target=produce, args=("c",))
        last.start()
        try:
            records += drain(qd, n)
            end = qd.get(timeout=GET_TIMEOUT)
        finally:
            last.join(GET_TIMEOUT)
        assert not errors, f"producer failed: {errors!r}"
        assert isinstance(end, EndOfStream), f"expected EndOfStream, got {end!r}"
        _check_per_producer(records, {"a": n, "b": n, "c": n})
        t0 = time.monotonic()
        for _ in range(3):
            assert isinstance(qd.get(timeout=GET_TIMEOUT), EndOfStream)
            assert isinstance(qd.get_nowait(), EndOfStream)
        assert time.monotonic() - t0 < 0.5, "EndOfStream is not returned at once after the end"
        assert list(qd) == [], "iterating an ended queue yielded records"


def check_end_of_stream_processes(make_descriptor: DescriptorFactory, n: int = 2000) -> None:
    """Three spawned upstreams, each ending with ``EndOfStream``; ``for item in qd`` stops
    after all three, with no record lost."""
    qd = make_descriptor(upstreams=3, maxsize=1000)
    with _closing(qd), contextlib.ExitStack() as stack:
        with contextlib.suppress(Empty):
            qd.get_nowait()
        workers = [
            stack.enter_context(spawn_worker(produce_worker, qd, tag, n, True))
            for tag in ("a", "b", "c")
        ]
        for w in workers:
            assert w.recv()[0] == "started"
        # Iteration has no timeout; the workers' own timeouts and the suite's bound it.
        records = list(qd)
        for w in workers:
            assert w.recv() == ("closed", None)
            assert w.join() == 0
        _check_per_producer(records, {"a": n, "b": n, "c": n})
        assert isinstance(qd.get(timeout=GET_TIMEOUT), EndOfStream)


def check_round_trips(make_descriptor: DescriptorFactory) -> None:
    """dict, JSON and pickle give an equal, usable descriptor, before and after use."""
    qd = make_descriptor(maxsize=100)
    with _closing(qd):
        for phase in ("before use", "after use"):
            copies = {
                "dict": QueueDescriptor.from_dict(qd.to_dict()),
                "json": QueueDescriptor.from_json(qd.to_json()),
                "pickle": pickle.loads(pickle.dumps(qd)),
            }
            for how, copy in copies.items():
                assert copy == qd, f"{how} round trip {phase} changed the descriptor: {copy!r}"
                assert copy.to_dict() == qd.to_dict()
                assert hash(copy) == hash(qd)
            # Every copy reaches the same queue.
            for how, copy in copies.items():
                copy.put(how, timeout=GET_TIMEOUT)
            assert drain(qd, 3) == ["dict", "json", "pickle"], phase
            for copy in copies.values():
                pickle.loads(pickle.dumps(copy))  # a used copy still pickles
        assert pickle.loads(pickle.dumps(qd)) == qd


def check_records(make_descriptor: DescriptorFactory) -> None:
    """Every record kind arrives intact (by reference on by-reference queues)."""
    qd = make_descriptor(maxsize=1000)
    by_ref = _by_reference(qd)
    records = sample_records()
    with _closing(qd):
        for record in records:
            qd.put(record, timeout=GET_TIMEOUT)
        got = drain(qd, len(records))
        for i, (sent, received) in enumerate(zip(records, got, strict=True)):
            assert_same_record(sent, received, by_reference=by_ref, path=f"record {i}")
        tup = (1, (2, 3))
        qd.put(tup, timeout=GET_TIMEOUT)
        back = qd.get(timeout=GET_TIMEOUT)
        if by_ref:
            assert back is tup
        else:
            assert back == [1, [2, 3]], "tuples should arrive as lists"
        qd.put(EndOfStream("src"), timeout=GET_TIMEOUT)
        assert isinstance(qd.get(timeout=GET_TIMEOUT), EndOfStream)


def check_large_payloads(make_descriptor: DescriptorFactory, nbytes: int = 64 * 2**20) -> None:
    """A >= 64 MiB bytes record and a 64 MiB numpy array round trip."""
    qd = make_descriptor(maxsize=4)
    blob = bytes(range(256)) * (nbytes // 256)
    array = np.arange(nbytes // 8, dtype=np.float64)
    with _closing(qd):
        qd.put(blob, timeout=GET_TIMEOUT)
        got = qd.get(timeout=GET_TIMEOUT)
        assert isinstance(got, bytes | bytearray | memoryview), type(got)
        assert len(got) == len(blob) and got == blob, "large bytes payload changed"
        del got
        qd.put(array, timeout=GET_TIMEOUT)
        back = qd.get(timeout=GET_TIMEOUT)
        assert isinstance(back, np.ndarray) and back.dtype == array.dtype
        assert back.shape == array.shape and np.array_equal(back, array)


def check_unencodable_record(make_descriptor: DescriptorFactory, n: int = 1000) -> None:
    """An unencodable record raises EncodeError naming its type, at its put or by close; the
    rest of its batch and later records still arrive; by-reference queues just carry it."""
    qd = make_descriptor(maxsize=4 * n)
    bad = object()
    with _closing(qd):
        if _by_reference(qd):
            qd.put(bad, timeout=GET_TIMEOUT)
            assert qd.get(timeout=GET_TIMEOUT) is bad
            return
        # Idle producer: reported at this put or the next.
        raised: list[EncodeError] = []
        try:
            qd.put(bad, timeout=GET_TIMEOUT)
        except EncodeError as exc:
            raised.append(exc)
        maybe: set[int] = set()
        try:
            qd.put(-1, timeout=GET_TIMEOUT)
        except EncodeError as exc:
            raised.append(exc)
            maybe.add(-1)
        assert raised, "put(object()) was accepted silently (not at that put, nor the next)"
        assert "object" in str(raised[0]), f"EncodeError does not name the type: {raised[0]}"
        assert isinstance(raised[0], SageZmqError)
        # accepted tells whether the record of the call that raised went in (README).
        assert getattr(raised[0], "accepted", None) is (-1 in maybe), (
            f"EncodeError.accepted is {getattr(raised[0], 'accepted', None)!r} for the record "
            f"{'after' if -1 in maybe else 'of'} the failing put"
        )
        # A record whose class is fine but which holds a bad value, put while idle.
        try:
            qd.put({"nested": bad}, timeout=GET_TIMEOUT)
        except EncodeError as exc:
            assert getattr(exc, "accepted", None) is False, "its own record, not queued"
        # Burst: the bad record sits inside a batch.
        sure: list[int] = [] if -1 in maybe else [-1]
        burst_errors = 0
        for i in range(n):
            record: Any = bad if i == n // 2 else i
            try:
                qd.put(record, timeout=GET_TIMEOUT)
                if record is not bad:
                    sure.append(i)
            except EncodeError as exc:
                burst_errors += 1
                assert "object" in str(exc), str(exc)
                assert getattr(exc, "accepted", None) is (record is not bad), (
                    f"EncodeError.accepted is {getattr(exc, 'accepted', None)!r} at the put of "
                    f"{'the bad record' if record is bad else 'a good one'}"
                )
                if record is not bad:
                    maybe.add(i)
        try:
            qd.flush(timeout=GET_TIMEOUT)
        except EncodeError:
            burst_errors += 1
        assert burst_errors >= 1, "the unencodable record in a burst was never reported"
        got: list[int] = []
        while True:
            try:
                got.append(qd.get(timeout=0.5))
            except Empty:
                break
        missing = [i for i in sure if i not in got]
        assert not missing, f"records accepted by put were lost: {missing[:10]}"
        assert len(got) == len(set(got)), "a record arrived twice"
        assert all(isinstance(g, int) for g in got), "an unencodable record arrived"
        assert got == sorted(got, key=lambda v: (v != -1, v)), "records out of order"
        # The queue stays usable.
        qd.put("still usable", timeout=GET_TIMEOUT)
        assert qd.get(timeout=GET_TIMEOUT) == "still usable"


def check_inspection(make_descriptor: DescriptorFactory) -> None:
    """qsize/empty/full and frozen statistics that count what passed."""
    qd = make_descriptor(maxsize=3)
    with _closing(qd):
        assert qd.empty() and qd.qsize() == 0 and not qd.full()
        for i in range(3):
            qd.put(i, timeout=GET_TIMEOUT)
        # qsize is approximate across processes, but must reach what was put.
        wait_until(lambda: qd.qsize() == 3, what=f"qsize() == 3 (is {qd.qsize()})")
        assert not qd.empty()
        assert qd.full()
        assert drain(qd, 3) == [0, 1, 2]
        with contextlib.suppress(Empty):
            qd.get(timeout=0.05)
        wait_until(lambda: qd.qsize() == 0 and qd.empty() and not qd.full(), what="drained")
        stats = qd.statistics()
        assert stats.queue_id == qd.queue_id and stats.queue_type == qd.queue_type
        assert stats.sent == 3 and stats.received == 3 and stats.depth == 0, stats
        if not _by_reference(qd):
            assert stats.bytes_sent > 0 and stats.bytes_received > 0, stats
        assert stats.bytes == stats.bytes_sent + stats.bytes_received, stats
        # Rates: uptime grows between snapshots, and the averages follow the counts.
        assert stats.uptime > 0 and stats.send_rate == stats.sent / stats.uptime, stats
        assert stats.receive_rate == stats.received / stats.uptime, stats
        qd.put(3, timeout=GET_TIMEOUT)
        assert qd.get(timeout=GET_TIMEOUT) == 3
        later = qd.statistics()
        assert later.uptime > stats.uptime and later.sent == 4, (stats, later)
        try:
            stats.sent = 0  # type: ignore[misc]
            raise AssertionError("QueueStatistics is not frozen")
        except FrozenInstanceError:
            pass


def check_producer_tail(make_descriptor: DescriptorFactory, n: int = 20000) -> None:
    """A spawned producer that puts ``n`` records, closes and exits at once loses none."""
    qd = make_descriptor(maxsize=1000)
    with _closing(qd):
        with contextlib.suppress(Empty):
            qd.get_nowait()
        with spawn_worker(produce_worker, qd, "tail", n, False, True) as w:
            assert w.recv()[0] == "started"
            records = drain(qd, n)
            assert w.recv() == ("closed", None)
            assert w.join() == 0
        _check_per_producer(records, {"tail": n})


def check_delivery_error(make_descriptor: DescriptorFactory, n: int = 10) -> None:
    """close() with no consumer reading raises DeliveryError naming how many records."""
    qd = make_descriptor(maxsize=100, timeout=0.5)
    try:
        for i in range(n):
            qd.put(i, timeout=GET_TIMEOUT)
        t0 = time.monotonic()
        try:
            qd.close()
            raise AssertionError("close() returned although no consumer confirmed anything")
        except DeliveryError as exc:
            assert exc.undelivered == n, f"undelivered={exc.undelivered}, expected {n}"
            assert str(n) in str(exc), f"the message does not name the count: {exc}"
            assert isinstance(exc, SageZmqError)
        assert time.monotonic() - t0 < 5.0, "close() ignored metadata['timeout']"
    finally:
        # A queue that bound its consumer socket early releases it through a consumer.
        with contextlib.suppress(Empty, SageZmqError):
            qd.get_nowait()
        close_quietly(qd)


def check_spawned_consumer(make_descriptor: DescriptorFactory, n: int = 3000) -> None:
    """The consumer runs in a spawned process; this process produces."""
    qd = make_descriptor(maxsize=500)
    with spawn_worker(consume_worker, qd, n) as w:
        try:
            assert w.recv() == ("ready", None)
            for i in range(n):
                qd.put(["here", i], timeout=GET_TIMEOUT)
            kind, records = w.recv()
            qd.close()
        except BaseException:
            close_quietly(qd)
            raise
        finally:
            with contextlib.suppress(OSError):
                w.send("bye")
        assert kind == "records"
        assert w.join() == 0
    _check_per_producer(records, {"here": n})


def check_local_rejects_other_process(make_descriptor: DescriptorFactory) -> None:
    """A same-process queue used from another process fails with a clear DescriptorError."""
    qd = make_descriptor()
    assert not _cross_process(qd)
    for op in ("put", "get"):
        with spawn_worker(try_use_worker, qd, op) as w:
            kind, result = w.recv()
            assert w.join() == 0
        assert kind == "result" and result is not None, f"{op} from another process worked"
        _name, message, mro = result
        assert "DescriptorError" in mro and "ValueError" in mro, result
        assert "as_type" in message, f"the error does not say how to fix it: {message}"
    qd.close()


def check_local_promotion(
    make_descriptor: DescriptorFactory, to: str = "shm", n: int = 3000
) -> None:
    """``qd.as_type(to)``: a spawned producer and a local one feed one consumer, FIFO each."""
    qd = make_descriptor(maxsize=1000)
    qd.put(["local", 0], timeout=GET_TIMEOUT)  # already queued before promotion
    promoted: QueueDescriptor | None = None
    try:
        promoted = qd.as_type(to)
        assert promoted.queue_type == to and promoted.queue_id == qd.queue_id
        assert promoted.endpoint and promoted.endpoint != qd.endpoint
        errors: list[BaseException] = []

        def produce_local() -> None:
            try:
                for i in range(1, n):
                    qd.put(["local", i], timeout=GET_TIMEOUT)
            except BaseException as exc:
                errors.append(exc)

        with spawn_worker(produce_worker, promoted, "remote", n) as w:
            thread = threading.Thread(target=produce_local)
            thread.start()
            try:
                records = drain(qd, 2 * n)
            finally:
                thread.join(GET_TIMEOUT)
            assert w.recv()[0] == "started"
            assert w.recv() == ("closed", None)
            assert w.join() == 0
        assert not errors, errors
        _check_per_producer(records, {"local": n, "remote": n})
    except BaseException:
        close_quietly(qd, *([promoted] if promoted else []))
        raise
    qd.close()
    if promoted is not None:
        promoted.close()
