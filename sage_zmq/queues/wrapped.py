"""``wrapped``: an existing ``queue.Queue``, ``multiprocessing.Queue`` or Ray queue, same API.

``QueueDescriptor.from_existing(q)`` returns a descriptor whose ``put``/``get`` go straight to
``q`` (no batching, no credits, no wire): code holding ``q`` and code holding the descriptor
see the same items. ``q``'s own bound is the backpressure; its ``Full``/``Empty`` become
:class:`~sage_zmq.errors.Full`/:class:`~sage_zmq.errors.Empty`.

Where a wrapped descriptor can go is where its queue can go:

* ``queue.Queue``: this process only. The descriptor holds a reference id into a
  process-local table (which keeps the queue alive until :func:`forget`); elsewhere it is a
  clear error.
* ``multiprocessing.Queue``: the descriptor carries the queue object itself, so it reaches a
  child exactly as multiprocessing allows: as an argument of ``Process(...)`` (inherited at
  spawn/fork time), not through a pipe, another queue or JSON (multiprocessing raises there).
* ``ray.util.queue.Queue``: the descriptor carries the Ray queue (an actor handle, which
  serializes), so it works from any Ray task or actor.
"""

from __future__ import annotations

import os
import queue as stdlib_queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from sage_zmq.errors import DescriptorError, Empty, Full, QueueClosed
from sage_zmq.packet import EndOfStream
from sage_zmq.queues.base import (
    COMMON_METADATA_KEYS,
    Capabilities,
    ConsumerInlet,
    ProducerLink,
    QueueStatistics,
    QueueType,
    check_timeout,
)

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor

__all__ = ["WrappedQueueType", "forget", "wrap_existing"]

_SCHEME = "wrapped://"
_TOKEN = os.urandom(4).hex()
_refs: dict[str, Any] = {}
_refs_lock = threading.Lock()


def _process_token() -> str:
    return f"{os.getpid()}-{_TOKEN}"


def _refresh_token() -> None:
    global _TOKEN
    _TOKEN = os.urandom(4).hex()


os.register_at_fork(after_in_child=_refresh_token)


def _kind(queue: Any) -> str:
    if isinstance(queue, stdlib_queue.Queue):  # also LifoQueue, PriorityQueue
        return "queue"
    import multiprocessing.queues

    if isinstance(queue, multiprocessing.queues.Queue):  # also JoinableQueue
        return "multiprocessing"
    if type(queue).__module__ == "ray.util.queue" and type(queue).__name__ == "Queue":
        return "ray"
    raise DescriptorError(
        f"from_existing wraps a queue.Queue, multiprocessing.Queue or ray.util.queue.Queue, "
        f"got {type(queue).__name__}; for a new queue use QueueDescriptor(queue_type=...)"
    )


def wrap_existing(cls: type[QueueDescriptor], queue: Any, queue_id: str | None = None) -> Any:
    """A ``wrapped`` descriptor for ``queue`` (the same reference id each time for one queue)."""
    kind = _kind(queue)
    with _refs_lock:
        ref = next((r for r, q in _refs.items() if q is queue), None)
        if ref is None:
            ref = os.urandom(6).hex()
            _refs[ref] = queue
    meta: dict[str, Any] = {"kind": kind, "ref": ref, "endpoint": f"{_SCHEME}{ref}"}
    if kind == "queue":
        meta["owner"] = _process_token()
    else:
        meta["queue"] = _Carried(queue)  # travels as far as the queue itself can
    maxsize = getattr(queue, "maxsize", None) or getattr(queue, "_maxsize", None)
    # An unbounded multiprocessing.Queue says so with its semaphore's largest value.
    if isinstance(maxsize, int) and 0 < maxsize < _UNBOUNDED_SEMAPHORE:
        meta["maxsize"] = maxsize
    return cls(queue_id or f"wrapped-{ref}", "wrapped", meta)


def forget(descriptor: QueueDescriptor) -> None:
    """Drop this process's reference to a wrapped queue (it may then be garbage-collected)."""
    with _refs_lock:
        _refs.pop(str(descriptor.metadata.get("ref")), None)


class _Carried:
    """The queue object inside a descriptor; unpickling it imports (and registers) this module.

    So a process that receives a wrapped descriptor knows the ``wrapped`` type even before
    anything there imported :mod:`sage_zmq.queues.wrapped`.
    """

    __slots__ = ("queue",)

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __reduce__(self) -> tuple[Any, ...]:
        import multiprocessing.context
        import multiprocessing.queues

        if (
            isinstance(self.queue, multiprocessing.queues.Queue)
            and multiprocessing.context.get_spawning_popen() is None
        ):
            # multiprocessing would raise a bare RuntimeError naming no way out.
            raise DescriptorError(
                "a descriptor wrapping a multiprocessing.Queue travels only as the queue "
                "itself does: as an argument of a multiprocessing.Process it starts (not by "
                "pickle, a pipe or another queue); to hand a queue to any process, use "
                "QueueDescriptor(queue_type='shm') or 'tcp', or qd.as_type('shm')"
            )
        return (_Carried, (self.queue,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Carried) and other.queue is self.queue

    def __hash__(self) -> int:
        return id(self.queue)

    def __repr__(self) -> str:
        return f"<{type(self.queue).__module__}.{type(self.queue).__name__}>"


def _target(descriptor: QueueDescriptor) -> Any:
    meta = descriptor.metadata
    carried = meta.get("queue")
    if isinstance(carried, _Carried):
        return carried.queue
    with _refs_lock:
        found = _refs.get(str(meta.get("ref")))
    if found is None:
        raise DescriptorError(
            f"wrapped queue {descriptor.queue_id!r} is not known in this process (it was "
            "forgotten); wrap the queue again with QueueDescriptor.from_existing(q)"
        )
    return found


class _End:
    """End-of-stream counting shared by both ends in a process."""

    def __init__(self, upstreams: int) -> None:
        self.upstreams = upstreams
        self.seen = 0


class WrappedProducer:
    """``put`` straight into the wrapped queue."""

    def __init__(self, target: Any, queue_id: str, maxsize: int) -> None:
        self._q = target
        self._queue_id = queue_id
        self._maxsize = maxsize
        self._sent = 0
        self._closed = False
        self._opened_at = time.monotonic()
        self.assist: Any = None
        self.local_receipts: Any = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self._closed:
            raise QueueClosed(f"queue {self._queue_id!r} was closed in this process")
        timeout = _checked(timeout, "put")
        try:
            self._q.put(item, block, timeout)
        except stdlib_queue.Full:
            raise Full(
                f"queue {self._queue_id!r} is full (its maxsize is {self._maxsize or 'unset'})"
                + (f" and stayed full for {timeout} s" if block and timeout is not None else "")
                + "; get() from it or put with a longer timeout"
            ) from None
        if not isinstance(item, EndOfStream):  # as on every queue: ENDs are not records
            self._sent += 1

    def flush(self, timeout: float | None = None) -> None:
        """Items are in the queue as soon as ``put`` returns."""

    def qsize(self) -> int:
        return _qsize(self._q)

    def full(self) -> bool:
        return bool(self._q.full())

    def close(self, timeout: float | None = None) -> None:
        """The wrapped queue belongs to its owner: it stays open."""
        self._closed = True

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            self._queue_id,
            "wrapped",
            "producer",
            sent=self._sent,
            maxsize=self._maxsize,
            uptime=time.monotonic() - self._opened_at,
        )


try:  # what an unbounded multiprocessing.Queue has as its _maxsize (2**31 - 1 on Linux)
    from _multiprocessing import SemLock as _SemLock

    _UNBOUNDED_SEMAPHORE = int(_SemLock.SEM_VALUE_MAX)
except (ImportError, AttributeError):  # no sem_open on this platform
    _UNBOUNDED_SEMAPHORE = 2**31 - 1


def _checked(timeout: Any, call: str) -> float | None:
    """``timeout`` checked as every queue checks it (the stdlib queues hang on NaN, overflow
    on huge values and take negative values differently); beyond ``threading.TIMEOUT_MAX``
    (about 292 years) it waits without limit."""
    if timeout is None:
        return None
    seconds = check_timeout(timeout, call)
    return None if seconds >= threading.TIMEOUT_MAX else seconds  # (they overflow above it)


class WrappedConsumer:
    """``get`` straight from the wrapped queue, counting ends of stream like the core."""

    def __init__(self, target: Any, queue_id: str, maxsize: int, upstreams: int) -> None:
        self._q = target
        self._queue_id = queue_id
        self._maxsize = maxsize
        self._upstreams = upstreams
        self._ended = 0
        self._received = 0
        self._closed = False
        self._lock = threading.Lock()
        self._opened_at = time.monotonic()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if self._closed:
            raise QueueClosed(f"queue {self._queue_id!r} was closed in this process")
        timeout = _checked(timeout, "get")
        while True:
            if self._ended >= self._upstreams:
                return EndOfStream()
            try:
                item = self._q.get(block, timeout)
            except stdlib_queue.Empty:
                why = f"nothing arrived within {timeout} s" if block else "is empty"
                raise Empty(f"queue {self._queue_id!r}: {why}") from None
            if isinstance(item, EndOfStream):
                with self._lock:
                    self._ended += 1
                continue  # one upstream's end is absorbed until every upstream ended
            self._received += 1
            return item

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.get()
            if isinstance(item, EndOfStream):
                return
            yield item

    def assist(self) -> None:
        """Nothing to pump: the wrapped queue delivers by itself."""

    def qsize(self) -> int:
        return _qsize(self._q)

    def empty(self) -> bool:
        return bool(self._q.empty())

    def full(self) -> bool:
        return bool(self._q.full())

    def close(self, timeout: float | None = None) -> None:
        self._closed = True

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            self._queue_id,
            "wrapped",
            "consumer",
            received=self._received,
            acked=self._received,  # what get() returned is consumed: nothing is in flight
            depth=_qsize(self._q),
            maxsize=self._maxsize,
            upstreams=self._upstreams,
            upstreams_ended=self._ended,
            uptime=time.monotonic() - self._opened_at,
        )


def _qsize(q: Any) -> int:
    try:
        return int(q.qsize())
    except NotImplementedError:  # multiprocessing.Queue on macOS
        return 0


class WrappedQueueType(QueueType):
    """Registered as ``wrapped``; made by ``QueueDescriptor.from_existing``."""

    name: ClassVar[str] = "wrapped"
    capabilities: ClassVar[Capabilities] = Capabilities(
        cross_process=False,
        cross_host=False,
        by_reference=True,
        extra="queue.Queue: this process; multiprocessing.Queue: children it is passed to "
        "at start; ray.util.queue.Queue: any Ray worker",
    )
    carries_maxsize: ClassVar[bool] = False
    metadata_keys: ClassVar[frozenset[str]] = COMMON_METADATA_KEYS | {
        "kind",
        "owner",
        "queue",
        "ref",
    }

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        meta = dict(descriptor.metadata)
        self._check(meta)
        return meta

    def validate(self, descriptor: QueueDescriptor) -> None:
        self._check(descriptor.metadata)

    @staticmethod
    def _check(meta: dict[str, Any]) -> None:
        kind, ref = meta.get("kind"), meta.get("ref")
        if kind not in ("queue", "multiprocessing", "ray") or not isinstance(ref, str):
            raise DescriptorError(
                "a 'wrapped' descriptor is made by QueueDescriptor.from_existing(q), not by "
                "hand: wrap a queue.Queue, multiprocessing.Queue or ray.util.queue.Queue"
            )
        if meta.get("endpoint") != f"{_SCHEME}{ref}":
            raise DescriptorError(f"a wrapped queue's endpoint is {_SCHEME}{ref}")

    def check_usable_here(self, descriptor: QueueDescriptor) -> None:
        meta = descriptor.metadata
        if meta.get("kind") == "queue" and meta.get("owner") != _process_token():
            owner = str(meta.get("owner")).split("-")[0]
            raise DescriptorError(
                f"wrapped queue {descriptor.queue_id!r} is a queue.Queue of process {owner}; "
                "a queue.Queue cannot leave its process: wrap a multiprocessing.Queue, or use "
                "QueueDescriptor(queue_type='shm' or 'tcp') to cross processes"
            )
        if meta.get("kind") in ("multiprocessing", "ray") and not isinstance(
            meta.get("queue"), _Carried
        ):
            raise DescriptorError(
                f"wrapped queue {descriptor.queue_id!r} lost its queue object in transit "
                "(JSON or dict copies cannot carry it); pass the descriptor itself"
            )

    def open_producer_link(self, descriptor: QueueDescriptor) -> ProducerLink:
        raise DescriptorError("wrapped queues hand items straight to the queue; no link")

    def open_consumer_inlet(self, descriptor: QueueDescriptor) -> ConsumerInlet:
        raise DescriptorError("wrapped queues take items straight from the queue; no inlet")

    def make_producer(self, descriptor: QueueDescriptor) -> Any:
        maxsize = int(descriptor.metadata.get("maxsize", 0))
        return WrappedProducer(_target(descriptor), descriptor.queue_id, maxsize)

    def make_consumer(self, descriptor: QueueDescriptor) -> Any:
        meta = descriptor.metadata
        upstreams = int(meta.get("upstreams", 1))
        return WrappedConsumer(
            _target(descriptor), descriptor.queue_id, int(meta.get("maxsize", 0)), upstreams
        )


def _register() -> None:
    # Until descriptor._LAZY_TYPES names "wrapped", importing this module registers it.
    from sage_zmq.descriptor import register_queue_type

    register_queue_type(WrappedQueueType)


_register()
