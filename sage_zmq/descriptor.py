"""``QueueDescriptor``: a small value that names a queue, and the registry of queue types.

A descriptor is ``(queue_id, queue_type, metadata)``. It pickles, turns into a dict or JSON
and back, and can be sent to any process; the socket behind it opens lazily in each process
that calls ``put`` or ``get``. On first use the descriptor binds ``put``/``get`` straight to
this process's queue end, so the per-record call costs no extra indirection.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from sage_zmq import _runtime

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
from sage_zmq.config import current_config
from sage_zmq.errors import DescriptorError, SageZmqError
from sage_zmq.queues.base import QueueStatistics, QueueType, check_flag, check_timeout
from sage_zmq.wire.dtypes import alloc_layout

__all__ = [
    "QueueDescriptor",
    "QueueSettings",
    "lookup_queue_type",
    "queue_types",
    "register_queue_type",
]

_TYPES: dict[str, QueueType] = {}
_LAZY_TYPES = {
    "local": "sage_zmq.queues.local:LocalQueueType",
    "shm": "sage_zmq.queues.shm:ShmQueueType",
    "tcp": "sage_zmq.queues.tcp:TcpQueueType",
    "sage": "sage_zmq.queues.sage:SageQueueType",
    "ray": "sage_zmq.queues.ray:RayQueueType",
    "wrapped": "sage_zmq.queues.wrapped:WrappedQueueType",
}


def register_queue_type(qtype: QueueType | type[QueueType]) -> QueueType:
    """Register a queue type under its ``name`` (kombu-style: transports found by name)."""
    instance = qtype() if isinstance(qtype, type) else qtype
    _TYPES[instance.name] = instance
    return instance


def queue_types() -> list[str]:
    """Names of every known queue type."""
    return sorted(set(_TYPES) | set(_LAZY_TYPES))


def lookup_queue_type(name: str) -> QueueType:
    """The registered queue type called ``name``; a clear error (with "did you mean") if none."""
    found = _TYPES.get(name)
    if found is not None:
        return found
    target = _LAZY_TYPES.get(name)
    if target is None:
        hint = difflib.get_close_matches(str(name), queue_types(), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else "."
        raise DescriptorError(
            f"unknown queue_type {name!r}{extra} Known types: {', '.join(queue_types())}"
        )
    module_name, cls_name = target.split(":")
    import importlib

    module = importlib.import_module(module_name)
    return register_queue_type(getattr(module, cls_name))


@dataclass(frozen=True)
class QueueSettings:
    """Effective settings of a queue: metadata over config defaults."""

    maxsize: int
    upstreams: int
    batch_size: int
    flush_interval: float
    timeout: float


log = logging.getLogger("sage_zmq.queue")

_FINAL_STATISTICS: dict[tuple[str, str], QueueStatistics] = {}
"""The last statistics of queue ends this process closed, by (queue type, endpoint)."""
_FINAL_STATISTICS_KEPT = 1024

_INT_KEYS = {
    "maxsize": 1,
    "upstreams": 1,
    "batch_size": 1,
    "max_message_size": 1024,
    "compression_min_bytes": 0,
    "shm_threshold": 0,
}
# Finite numbers: (minimum, whether the minimum itself is allowed), as in the config.
_FLOAT_KEYS = {
    "timeout": (0.0, False),
    "flush_interval": (0.0, False),  # 0 would make the flush timer spin
    "shm_wait": (0.0, True),
    "memory_pool_size": (0.0, True),
}
_BOOL_KEYS = ("allow_pickle", "zero_copy", "ack")


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise DescriptorError(f"metadata must be a mapping (dict), got {type(metadata).__name__}")
    meta = dict(metadata)
    for key, minimum in _INT_KEYS.items():
        if key in meta:
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DescriptorError(
                    f"metadata[{key!r}] must be an integer >= {minimum}, got {value!r}"
                )
    for key, (low, inclusive) in _FLOAT_KEYS.items():
        if key in meta:
            value = meta[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < low
                or (value == low and not inclusive)
            ):
                bound = ">=" if inclusive else ">"
                raise DescriptorError(
                    f"metadata[{key!r}] must be a finite number {bound} {low:g}, got {value!r}"
                )
    for key in _BOOL_KEYS:
        if key in meta:
            check_flag(key, meta[key])
    curve = meta.get("curve")
    if isinstance(curve, Mapping) and not isinstance(curve.get("enabled", True), bool):
        raise DescriptorError(
            f"metadata['curve']['enabled'] must be a boolean, got {curve['enabled']!r}; "
            "use true or false"
        )
    if "compression" in meta:
        value = meta["compression"]
        if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
            raise DescriptorError(
                f"metadata['compression'] must be true, false or 'auto', got {value!r}"
            )
    from sage_zmq.security import check_no_key_material

    check_no_key_material(meta)  # a descriptor names key files, never carries a key
    endpoint = meta.get("endpoint")
    if endpoint is not None and not isinstance(endpoint, str):
        raise DescriptorError(
            f"metadata['endpoint'] must be a string like tcp://127.0.0.1:5555, got {endpoint!r}"
        )
    return meta


def _warn_typos(qtype: QueueType, keys: Iterable[Any]) -> None:
    """Warn of metadata keys close to one the queue type reads but not it: likely typos.

    Not an error: users may keep their own keys in a descriptor's metadata.
    """
    known = qtype.metadata_keys
    for key in keys:
        if isinstance(key, str) and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if not close:  # two letters swapped in a short key ("hots", "akc") score lower
                close = [k for k in sorted(known) if sorted(k) == sorted(key)][:1]
            if close:
                log.warning(
                    "metadata key %r is not used by %s queues; did you mean %r?",
                    key,
                    qtype.name,
                    close[0],
                )


class QueueDescriptor:
    """Names a queue: ``queue_id``, ``queue_type`` and ``metadata`` (maxsize, endpoint, ...).

    ``put``/``get`` follow :class:`queue.Queue`: ``Full``/``Empty`` (subclasses of
    ``queue.Full``/``queue.Empty``) on timeout. Many producers, one consumer, FIFO per producer.
    """

    def __init__(
        self,
        queue_id: str | None = None,
        queue_type: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if queue_id is None:
            queue_id = f"q-{os.urandom(6).hex()}"
        if not isinstance(queue_id, str) or not queue_id or len(queue_id) > 200:
            raise DescriptorError(
                f"queue_id must be a non-empty string of at most 200 characters, got {queue_id!r}"
            )
        if queue_type is None:
            queue_type = current_config().communication.queue.default_type
        if not isinstance(queue_type, str):
            raise DescriptorError(
                f"queue_type must be a string such as 'local', got {queue_type!r}"
            )
        qtype = lookup_queue_type(queue_type)
        meta = _check_metadata(metadata or {})
        meta.update(options)
        self.queue_id = queue_id
        self.queue_type = queue_type
        self.metadata = meta
        prepared = qtype.prepare(self)
        if qtype.carries_maxsize and "maxsize" not in prepared:
            prepared["maxsize"] = current_config().communication.queue.max_size
        self.metadata = _check_metadata(prepared)
        _warn_typos(qtype, self.metadata)

    # ---------------------------------------------------------------- value
    @classmethod
    def _restore(cls, queue_id: str, queue_type: str, metadata: dict[str, Any]) -> QueueDescriptor:
        self = cls.__new__(cls)
        self.queue_id = queue_id
        self.queue_type = queue_type
        self.metadata = dict(metadata)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (QueueDescriptor._restore, (self.queue_id, self.queue_type, dict(self.metadata)))

    def __copy__(self) -> QueueDescriptor:
        return QueueDescriptor._restore(self.queue_id, self.queue_type, self.metadata)

    def __deepcopy__(self, memo: dict[int, Any]) -> QueueDescriptor:
        import copy

        return QueueDescriptor._restore(
            self.queue_id, self.queue_type, copy.deepcopy(self.metadata, memo)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueueDescriptor):
            return NotImplemented
        return (self.queue_id, self.queue_type, self.metadata) == (
            other.queue_id,
            other.queue_type,
            other.metadata,
        )

    def __hash__(self) -> int:
        return hash((self.queue_id, self.queue_type, str(self.metadata.get("endpoint"))))

    def __repr__(self) -> str:
        return (
            f"QueueDescriptor(queue_id={self.queue_id!r}, queue_type={self.queue_type!r}, "
            f"metadata={self.metadata!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "queue_type": self.queue_type,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QueueDescriptor:
        if not isinstance(data, Mapping):
            raise DescriptorError(f"from_dict needs a mapping, got {type(data).__name__}")
        unknown = set(data) - {"queue_id", "queue_type", "metadata"}
        if unknown:
            raise DescriptorError(
                f"unknown descriptor keys {sorted(unknown)}; expected queue_id, queue_type, "
                "metadata"
            )
        if "queue_id" not in data or "queue_type" not in data:
            raise DescriptorError("a descriptor dict needs 'queue_id' and 'queue_type'")
        meta = data.get("metadata") or {}
        if isinstance(meta, Mapping) and "endpoint" in meta:
            # Complete descriptors come back as they were: no binding, no new endpoint.
            qid, qtype_name = data["queue_id"], data["queue_type"]
            if not isinstance(qid, str) or not qid or len(qid) > 200:
                raise DescriptorError(
                    f"queue_id must be a non-empty string of at most 200 characters, got {qid!r}"
                )
            if not isinstance(qtype_name, str):
                raise DescriptorError(f"queue_type must be a string, got {qtype_name!r}")
            qtype = lookup_queue_type(qtype_name)
            restored = cls._restore(qid, qtype_name, _check_metadata(meta))
            qtype.validate(restored)
            return restored
        return cls(data["queue_id"], data["queue_type"], meta)

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), sort_keys=True)
        except TypeError as exc:
            if self.queue_type == "wrapped":
                raise DescriptorError(
                    f"descriptor {self.queue_id!r} wraps a queue object, which has no JSON form: "
                    "pickle the descriptor (a ray.util.queue.Queue), pass it to a "
                    "multiprocessing.Process it starts (a multiprocessing.Queue), or use an "
                    "shm/tcp queue"
                ) from None
            raise DescriptorError(
                f"descriptor {self.queue_id!r} has metadata that JSON cannot carry: {exc}"
            ) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> QueueDescriptor:
        if not isinstance(text, str | bytes | bytearray):
            hint = "; for a dict use QueueDescriptor.from_dict" if isinstance(text, Mapping) else ""
            raise DescriptorError(
                f"from_json takes the JSON text (str or bytes), got {type(text).__name__}{hint}"
            )
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DescriptorError(f"not a descriptor JSON document: {exc}") from None
        return cls.from_dict(data)

    def with_options(self, **changes: Any) -> QueueDescriptor:
        """A copy with some metadata changed (same queue)."""
        meta = dict(self.metadata)
        meta.update(changes)
        new = QueueDescriptor._restore(self.queue_id, self.queue_type, _check_metadata(meta))
        _warn_typos(lookup_queue_type(self.queue_type), changes)
        return new

    @property
    def endpoint(self) -> str | None:
        value = self.metadata.get("endpoint")
        return None if value is None else str(value)

    @property
    def maxsize(self) -> int:
        return self.settings().maxsize

    def settings(self) -> QueueSettings:
        cfg = current_config()
        meta = self.metadata
        # A wrapped queue's bound is its queue object's own (none: 0), not the config's.
        default = cfg.communication.queue.max_size
        if "maxsize" not in meta and not lookup_queue_type(self.queue_type).carries_maxsize:
            default = 0
        return QueueSettings(
            maxsize=int(meta.get("maxsize", default)),
            upstreams=int(meta.get("upstreams", 1)),
            batch_size=int(meta.get("batch_size", cfg.performance.batch_size)),
            flush_interval=float(meta.get("flush_interval", cfg.performance.flush_interval)),
            timeout=float(meta.get("timeout", cfg.communication.queue.timeout)),
        )

    @property
    def capabilities(self) -> Any:
        return lookup_queue_type(self.queue_type).capabilities

    # ---------------------------------------------------------------- queue ops
    def _handle(self) -> _QueueHandle:
        key = (self.queue_type, str(self.metadata.get("endpoint")))
        handle: _QueueHandle | None = _runtime.existing_handle(key)
        qtype = lookup_queue_type(self.queue_type) if handle is None else handle.qtype
        # Two names for one socket endpoint are two queues on one end; (two names for one
        # wrapped queue object are fine).
        if handle is None:
            owner = qtype.endpoint_owner(self)
        else:
            owner = handle.descriptor.queue_id if qtype.consumer_binds else None
        if owner is not None and owner != self.queue_id:
            raise DescriptorError(
                f"queue {self.queue_id!r} names endpoint {key[1]}, which queue {owner!r} "
                "already uses in this process: two queues cannot share an endpoint. Give this "
                "one its own, or leave endpoint out"
            )
        if handle is None:
            _check_metadata(self.metadata)  # a dict the caller may have changed since
            qtype.check_usable_here(self)
            handle = _runtime.handle_for(key, lambda: _QueueHandle(self, qtype, key))
        return handle

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put a record; blocks while the consumer has no room (``Full`` after ``timeout``)."""
        # After the first call, qd.put is the producer's own bound method (see _bind); this
        # path still runs for a qd.put taken before that first call.
        bound = self.__dict__.get("put") or self._handle().producer(self).put
        bound(item, block, timeout)

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next record (``Empty`` after ``timeout``); ``EndOfStream`` at the end."""
        bound = self.__dict__.get("get") or self._handle().consumer(self).get
        return bound(block, timeout)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._handle().consumer(self))

    def flush(self, timeout: float | None = None) -> None:
        """Send what this process has put but not yet shipped."""
        handle = self._existing_handle()
        if handle is not None and handle.has_producer():
            handle.producer(self).flush(timeout)

    def qsize(self) -> int:
        """Records in the queue as this process sees them: those its consumer holds, or those
        its producer put that were not consumed yet. In a process with neither end it opens
        the consumer (a consumer polling before its first ``get`` binds the endpoint)."""
        handle = self._handle()
        if handle.has_consumer() or not handle.has_producer():
            return int(handle.consumer(self).qsize())
        return int(handle.producer(self).qsize())

    def empty(self) -> bool:
        handle = self._handle()
        if handle.has_consumer() or not handle.has_producer():
            return bool(handle.consumer(self).empty())
        return handle.producer(self).qsize() == 0

    def full(self) -> bool:
        """Whether a ``put`` from this process would wait for room. A producer's question: in a
        process with neither end of a socket queue it opens nothing and says False (opening
        the consumer would bind the endpoint and take the records this process is about to
        put; see ``QueueType.consumer_binds``)."""
        handle = self._handle()
        if handle.has_producer():
            return bool(handle.producer(self).full())
        qtype = handle.qtype
        if handle.has_consumer() or not qtype.consumer_binds or qtype.endpoint_owner(self):
            return bool(handle.consumer(self).full())
        return False

    def statistics(self) -> QueueStatistics:
        """This process's view of the queue; after ``close``, its last figures."""
        handle = self._existing_handle()
        if handle is None:
            key = (self.queue_type, str(self.metadata.get("endpoint")))
            final: QueueStatistics | None = _FINAL_STATISTICS.get(key)
            if final is not None:
                return final
        return self._handle().statistics()

    def backlog(self, refresh: bool = False) -> int:
        """Records this process put that the consumer has not reported consumed (cheap).

        Routers use it as the live load of a target: it moves with the consumer's credits;
        ``refresh`` reads the consumer's latest reports first.
        """
        handle = self._existing_handle()
        if handle is None or not handle.has_producer():
            return 0
        producer = handle.producer(self)
        return int(producer.poll_credit() if refresh else producer.qsize())

    def alloc(
        self,
        shape: int | Sequence[int],
        dtype: npt.DTypeLike = "u1",
        timeout: float | None = None,
    ) -> np.ndarray[Any, Any]:
        """A writable numpy array to fill and then ``put`` without a further copy.

        On ``shm`` queues it lives in this process's shared-memory pool; elsewhere (or when
        the pool cannot serve it) it is an ordinary array. ``timeout`` bounds the wait for room
        in a full pool (default ``performance.shm_wait``); ``shape`` is an int or a sequence of
        ints >= 0 and ``dtype`` anything :func:`numpy.dtype` takes that holds no objects.
        """
        shape, dtype = alloc_layout(shape, dtype)  # the same errors on every queue type
        if timeout is not None:
            timeout = check_timeout(timeout, "alloc")
        producer = self._handle().producer(self)
        allocate = getattr(producer, "alloc", None)
        if allocate is not None:
            return allocate(shape, dtype, timeout)
        import numpy as np

        return np.empty(shape, dtype)

    def _existing_handle(self) -> _QueueHandle | None:
        key = (self.queue_type, str(self.metadata.get("endpoint")))
        handle: _QueueHandle | None = _runtime.existing_handle(key)
        return handle

    def close(self, timeout: float | None = None) -> None:
        """Close this process's ends of the queue (a producer first delivers what it put)."""
        if timeout is not None:
            timeout = check_timeout(timeout, "close")  # before anything closes
        handle = self._existing_handle()
        if handle is not None:
            handle.close(timeout)
        else:
            self._unbind()
            lookup_queue_type(self.queue_type).release(self)

    def _unbind(self) -> None:
        for name in _BOUND_NAMES:
            self.__dict__.pop(name, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- conversion
    def as_type(self, new_type: str, **metadata: Any) -> QueueDescriptor:
        """The same queue reachable through another type (e.g. promote ``local`` to ``shm``).

        Call it in the process that consumes the queue: that consumer starts listening on the
        new endpoint too, so local and remote producers feed one queue, keeping its id and the
        records already in it, in order.
        """
        if new_type == self.queue_type and not metadata:
            return self
        qtype = lookup_queue_type(new_type)
        if not qtype.capabilities.cross_process and new_type != self.queue_type:
            raise DescriptorError(f"cannot promote to {new_type!r}: it is not cross-process")
        lookup_queue_type(self.queue_type).check_usable_here(self)
        handle = self._handle()
        consumer = handle.consumer(self)
        if not hasattr(consumer, "add_inlet"):  # refused before the new end binds anything
            raise DescriptorError(
                f"cannot promote a {self.queue_type!r} queue to {new_type!r}: only a local, "
                "shm or tcp queue's consumer can take producers of another type. A wrapped "
                "multiprocessing.Queue already crosses processes (pass the descriptor itself); "
                "for a queue.Queue, forward its items to a new shm/tcp descriptor"
            )
        keep = {k: v for k, v in self.metadata.items() if k not in ("endpoint", "owner", "bind")}
        keep.update(metadata)
        new = QueueDescriptor(self.queue_id, new_type, keep)
        consumer.add_inlet(qtype.open_consumer_inlet(new))
        _runtime.handle_for((new.queue_type, str(new.endpoint)), lambda: handle)
        handle.aliases.append((new.queue_type, str(new.endpoint)))
        return new

    @classmethod
    def from_existing(cls, queue: Any, queue_id: str | None = None) -> QueueDescriptor:
        """Wrap an existing ``queue.Queue``, ``multiprocessing.Queue`` or Ray queue."""
        from sage_zmq.queues.wrapped import wrap_existing

        return wrap_existing(cls, queue, queue_id)


_BOUND_NAMES = ("put", "get")


class _QueueHandle:
    """This process's ends of one queue, created on first use."""

    def __init__(self, descriptor: QueueDescriptor, qtype: QueueType, key: tuple[str, str]) -> None:
        self.descriptor = descriptor
        self.qtype = qtype
        self.key = key
        self.aliases: list[tuple[str, str]] = []
        self._producer: Any = None
        self._consumer: Any = None
        self._lock = threading.Lock()
        self._bound: list[weakref.ref[QueueDescriptor]] = []
        from sage_zmq import observe

        observe.activate()  # config-driven logging, tracing and metrics, once per process

    def __repr__(self) -> str:  # named in warnings (e.g. at shutdown)
        return f"queue {self.descriptor.queue_id!r} ({self.qtype.name})"

    def has_producer(self) -> bool:
        return self._producer is not None

    def has_consumer(self) -> bool:
        return self._consumer is not None

    def producer(self, bind_to: QueueDescriptor) -> Any:
        producer = self._producer
        if producer is None:
            with self._lock:
                if self._producer is None:
                    self._producer = self._make(self.qtype.make_producer)
                producer = self._producer
        self._bind(bind_to, "put", producer.put)
        return producer

    def consumer(self, bind_to: QueueDescriptor) -> Any:
        consumer = self._consumer
        if consumer is None:
            with self._lock:
                if self._consumer is None:
                    self._consumer = self._make(self.qtype.make_consumer)
                consumer = self._consumer
        self._bind(bind_to, "get", consumer.get)
        return consumer

    def _make(self, make: Callable[[QueueDescriptor], Any]) -> Any:
        try:
            return make(self.descriptor)
        except BaseException:
            # An end that failed to open (bad CURVE files, say) must not leave this handle
            # behind: every later descriptor for the endpoint would reuse its settings and
            # fail the same way, even with correct ones.
            if self._producer is None and self._consumer is None:
                _runtime.forget_handle(self.key, self)
                for alias in self.aliases:
                    _runtime.forget_handle(alias, self)
            raise

    def unbind_all(self) -> None:
        """Descriptors go back to looking up their handle (after close, or in a forked
        child, where this process's ends are not theirs to use)."""
        for ref in self._bound:
            d = ref()
            if d is not None:
                d._unbind()
        self._bound.clear()

    def _bind(self, descriptor: QueueDescriptor, name: str, method: Any) -> None:
        # ``!=``, not ``is not``: ``producer.put`` is a new bound method on every read, so an
        # identity test bound again (one more weakref kept) on every alloc.
        if descriptor.__dict__.get(name) != method:
            descriptor.__dict__[name] = method
            self._bound.append(weakref.ref(descriptor))

    def statistics(self) -> QueueStatistics:
        return self._combined(self._producer, self._consumer)

    def _combined(self, producer: Any, consumer: Any) -> QueueStatistics:
        from dataclasses import replace

        if consumer is None and producer is None:
            return QueueStatistics(self.descriptor.queue_id, self.descriptor.queue_type, "idle")
        if consumer is None:
            stats: QueueStatistics = producer.statistics()
            return stats
        stats = consumer.statistics()
        if producer is not None:
            p = producer.statistics()
            # Both ends are here: what the consumer took is known exactly, without waiting
            # for the report that tells the producer.
            consumed = getattr(consumer, "consumed_from", None)
            done = None if consumed is None else consumed(getattr(producer, "producer_id", ""))
            stats = replace(
                stats,
                role="producer+consumer",
                sent=p.sent,
                bytes_sent=p.bytes_sent,
                batches_sent=p.batches_sent,
                credit_waits=p.credit_waits,
                encode_errors=p.encode_errors,
                in_flight=p.in_flight if done is None else max(0, p.sent - done),
                uptime=max(p.uptime, stats.uptime),
            )
        return stats

    def close(self, timeout: float | None = None) -> None:
        error: Exception | None = None
        with self._lock:
            producer, consumer = self._producer, self._consumer
            self._producer = self._consumer = None
        self.unbind_all()
        _runtime.forget_handle(self.key, self)
        for alias in self.aliases:
            _runtime.forget_handle(alias, self)
        if producer is not None:
            if consumer is not None:
                producer.assist = consumer.assist
                producer.local_receipts = getattr(consumer, "received_from", None)
            try:
                producer.close(timeout)
            except Exception as exc:  # the consumer end still closes (a full disk, say)
                error = exc
        if consumer is not None:
            consumer.close(timeout)
        if producer is not None or consumer is not None:
            # What statistics() shows after the close: a run's totals outlive its sockets.
            _FINAL_STATISTICS[self.key] = self._combined(producer, consumer)
            while len(_FINAL_STATISTICS) > _FINAL_STATISTICS_KEPT:
                del _FINAL_STATISTICS[next(iter(_FINAL_STATISTICS))]
        try:
            self.qtype.release(self.descriptor)
        except SageZmqError as exc:
            error = error or exc
        if error is not None:
            raise error
