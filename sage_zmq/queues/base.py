"""The small interface every queue type implements, and what it declares it supports.

A queue type (``local``, ``shm``, ``tcp``, ...) is a :class:`QueueType`: it prepares a
descriptor's metadata (deriving an endpoint, binding early where needed) and opens the two ends
of a queue in a process: a :class:`ProducerLink` (how batches leave) and a
:class:`ConsumerInlet` (how they arrive). Batching, credits, end-of-stream counting and
statistics live above these hooks, in :mod:`sage_zmq.queues._producer` and
:mod:`sage_zmq.queues._consumer`, and are shared by every type.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, overload

from sage_zmq.errors import DescriptorError, InvalidArgument, InvalidArgumentType

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor

COMMON_METADATA_KEYS = frozenset(
    {"endpoint", "maxsize", "upstreams", "batch_size", "flush_interval", "timeout"}
)
"""Metadata every queue type reads (see ``QueueDescriptor.settings``)."""


def check_flag(key: str, value: Any) -> bool:
    """A boolean metadata option, or a :class:`DescriptorError` naming it.

    Never ``bool(value)``: ``"false"`` and ``"no"`` are truthy, so a YAML or env string meant to
    turn an option (pickle!) off would turn it on.
    """
    if value is True or value is False:
        return value
    raise DescriptorError(
        f"metadata[{key!r}] must be a boolean, got {value!r} ({type(value).__name__}); "
        "use true or false"
    )


def check_timeout(timeout: Any, call: str) -> float:
    """``timeout`` of ``call`` (``"put"``, ``"get"``) as seconds >= 0, or a clear error.

    Callers test the usual case (an int or float >= 0) inline and come here for the rest, so a
    well-formed call costs no function call. Like :mod:`queue`, a negative timeout is an error
    rather than "do not wait" (that is ``block=False`` or ``timeout=0``).
    """
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise InvalidArgumentType(
            f"{call}(timeout=...) must be a number of seconds >= 0 or None, got {timeout!r} "
            f"({type(timeout).__name__})"
        )
    value = float(timeout)
    if not value >= 0:  # also NaN, which compares false with everything
        no_wait = "0 (or block=False)" if call in ("put", "get") else "0"
        raise InvalidArgument(
            f"{call}(timeout=...) must be a number of seconds >= 0 or None, got {timeout!r}; "
            f"use {no_wait} not to wait, None to wait without limit"
        )
    return value


@dataclass(frozen=True)
class Capabilities:
    """What a queue type supports; the conformance suite reads this table."""

    cross_process: bool
    cross_host: bool
    by_reference: bool = False
    zero_copy: bool = False
    reliable: bool = False
    shared_memory: bool = False
    extra: str | None = None


@dataclass(frozen=True, slots=True)
class Credit:
    """A consumer's report to one producer: cumulative and idempotent.

    All records with ``seq < received`` arrived; ``seq < acked`` were consumed; the producer may
    send records with ``seq < limit``. ``session`` changes when the consumer restarts.
    ``base``: the first seq this session took from the producer; ``pid``: the consumer's process
    (sent on one host only). With both, a producer can tell which shared-memory slots went to a
    consumer that is gone (PROTOCOL.md §6). ``lost``: seqs of this producer a plain consumer
    skipped for good (gaps: frames refused or dropped in transit), so that ``close()`` can say
    so instead of reporting them delivered. ``ring``: the consumer's release ring for this
    producer's shared-memory slots (§6), if it made one.
    """

    session: str
    received: int
    acked: int
    limit: int
    base: int | None = None
    pid: int | None = None
    lost: int = 0
    ring: str | None = None


class ProducerLink(Protocol):
    """How one producer's batches leave the process."""

    def send_hello(self, producer: str, epoch: int, next_seq: int, acked: int) -> None: ...

    def send_batch(self, producer: str, seq: int, records: list[Any]) -> tuple[int, int, list[str]]:
        """Send records starting at ``seq``; returns ``(records_sent, bytes, encode_errors)``."""
        ...

    def send_end(self, producer: str, seq: int) -> None: ...

    def send_close(self, producer: str, seq: int) -> None: ...

    def send_heartbeat(self, producer: str) -> None: ...

    def poll(self, timeout: float) -> list[Credit]:
        """Credits that arrived, waiting up to ``timeout`` seconds for the first (0 = no wait)."""
        ...

    def close(self) -> None: ...


class ConsumerInlet(Protocol):
    """How batches arrive at the consumer and how it answers producers."""

    def recv(self, timeout: float) -> list[tuple[Any, ...]]:
        """Events that arrived, waiting up to ``timeout`` seconds for the first (0 = no wait).

        Events (``inlet`` is the inlet itself, ``peer`` whom to answer through it):
        ``("hello", inlet, peer, fields)``,
        ``("data", inlet, peer, producer, seq, records, nbytes)``,
        ``("end", inlet, peer, producer, seq)``, ``("close", inlet, peer, producer, seq)``,
        ``("heartbeat", inlet, peer, producer)``.
        ``records`` is a list, or a :class:`DrainingBatch` when the consumer must let go of
        each record as the application takes it.
        """
        ...

    def send_credit(self, peer: Any, credit: Credit) -> bool:
        """Answer one producer; False when the peer is gone."""
        ...

    def close(self) -> None: ...


class DrainingBatch:
    """A batch of records that forgets each record as it is taken: iterating it empties it.

    The consumer reads a list batch through an iterator that holds the whole list until its
    last record is taken. Records that hold something their last reference frees, such as
    views of shared-memory slots, come in this instead: a slot goes back to its producer's
    pool when the application drops its record, not when it takes the batch's last one.
    """

    __slots__ = ("_left",)

    def __init__(self, records: Iterable[Any]) -> None:
        self._left = deque(records)

    def __len__(self) -> int:
        return len(self._left)

    def __length_hint__(self) -> int:  # what the consumer counts as not yet taken
        return len(self._left)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> DrainingBatch: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return DrainingBatch(list(self._left)[index])
        return self._left[index]

    def __iter__(self) -> DrainingBatch:
        return self

    def __next__(self) -> Any:
        try:
            return self._left.popleft()
        except IndexError:
            raise StopIteration from None


class QueueType(ABC):
    """A registered queue type: a name, capabilities and the hooks to open its ends."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    metadata_keys: ClassVar[frozenset[str]] = COMMON_METADATA_KEYS
    """Metadata keys this type reads. Other keys are the user's own and pass, but one that is
    close to a key here (``maxsise``) is likely a typo: it is warned about at creation."""

    carries_maxsize: ClassVar[bool] = True
    """Whether ``maxsize`` is a credit window that every end must agree on: a new descriptor
    then carries it (the config's ``max_size`` when not given), so a process with another
    config cannot disagree. A wrapped queue's bound is its queue object's own."""

    consumer_binds: ClassVar[bool] = False
    """Whether opening the consumer end takes the queue (binds its endpoint, so its records
    come here). ``full()``, a producer's question, must not do that in a process with neither
    end: a producer that asked it before its first put became the consumer of its own
    records. (``qsize``/``empty`` still open the consumer there: consumers poll them.)"""

    def endpoint_owner(self, descriptor: QueueDescriptor) -> str | None:
        """The id of the queue whose consumer this process already bound on ``descriptor``'s
        endpoint (a tcp queue made without an endpoint binds it as it is made), or None."""
        return None

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        """Metadata to store in a new descriptor (e.g. a derived endpoint); validates input."""
        return dict(descriptor.metadata)

    @abstractmethod
    def open_producer_link(self, descriptor: QueueDescriptor) -> ProducerLink: ...

    @abstractmethod
    def open_consumer_inlet(self, descriptor: QueueDescriptor) -> ConsumerInlet: ...

    def check_usable_here(self, descriptor: QueueDescriptor) -> None:
        """Raise a clear error if this process cannot use the descriptor."""
        return None

    def validate(self, descriptor: QueueDescriptor) -> None:
        """Check a complete descriptor (e.g. one from ``from_dict``) without side effects."""
        return None

    def release(self, descriptor: QueueDescriptor) -> None:
        """Free what this process holds for the queue once its ends are closed."""
        return None

    def make_producer(self, descriptor: QueueDescriptor) -> Any:
        """The producing end in this process (a layer such as reliability may override)."""
        from sage_zmq.queues._producer import Producer

        return Producer(self.open_producer_link(descriptor), **producer_options(descriptor))

    def make_consumer(self, descriptor: QueueDescriptor) -> Any:
        """The consuming end in this process."""
        from sage_zmq.queues._consumer import Consumer

        return Consumer([self.open_consumer_inlet(descriptor)], **consumer_options(descriptor))


def producer_options(descriptor: QueueDescriptor) -> dict[str, Any]:
    """Keyword arguments every producing end takes, from the descriptor's settings."""
    s = descriptor.settings()
    return {
        "queue_id": descriptor.queue_id,
        "queue_type": descriptor.queue_type,
        "window": s.maxsize,
        "batch_size": s.batch_size,
        "flush_interval": s.flush_interval,
        "timeout": s.timeout,
    }


def consumer_options(descriptor: QueueDescriptor) -> dict[str, Any]:
    """Keyword arguments every consuming end takes, from the descriptor's settings."""
    s = descriptor.settings()
    return {
        "queue_id": descriptor.queue_id,
        "queue_type": descriptor.queue_type,
        "maxsize": s.maxsize,
        "upstreams": s.upstreams,
    }


@dataclass(frozen=True)
class QueueStatistics:
    """A snapshot of one queue end in this process (trio-style: small, frozen)."""

    queue_id: str
    queue_type: str
    role: str
    sent: int = 0
    received: int = 0
    depth: int = 0
    maxsize: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    batches_sent: int = 0
    batches_received: int = 0
    acked: int = 0
    in_flight: int = 0
    credit_waits: int = 0
    encode_errors: int = 0
    rejected: int = 0
    retransmits: int = 0
    duplicates: int = 0
    producers: int = 0
    upstreams: int = 1
    upstreams_ended: int = 0
    latency_p50: float | None = None
    latency_p99: float | None = None
    extra: dict[str, Any] | None = None
    uptime: float = 0.0
    """Seconds since this process opened its end (the first of its two ends): two snapshots
    give the exact rate between them, ``(b.sent - a.sent) / (b.uptime - a.uptime)``."""

    @property
    def utilisation(self) -> float:
        """Depth as a fraction of ``maxsize`` (0 when unbounded)."""
        return self.depth / self.maxsize if self.maxsize else 0.0

    @property
    def send_rate(self) -> float:
        """Records sent per second, on average since the end opened (see ``uptime``)."""
        return self.sent / self.uptime if self.uptime > 0 else 0.0

    @property
    def receive_rate(self) -> float:
        """Records received per second, on average since the end opened."""
        return self.received / self.uptime if self.uptime > 0 else 0.0

    @property
    def bytes(self) -> int:
        """Bytes this process moved through the queue, sent plus received."""
        return self.bytes_sent + self.bytes_received
