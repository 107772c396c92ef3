"""``local``: producers and the consumer in one process; records pass by reference.

No serialization and no socket: batches are handed over through a :class:`LocalChannel` (a
deque and two condition variables). Using a local descriptor from another process is an error;
promote it with ``qd.as_type("shm")`` or ``"tcp"`` so remote producers can join.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

from sage_zmq.errors import DescriptorError
from sage_zmq.observe import tracing as _tracing
from sage_zmq.queues.base import (
    COMMON_METADATA_KEYS,
    Capabilities,
    ConsumerInlet,
    Credit,
    ProducerLink,
    QueueType,
)

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor

_PROCESS_TOKEN = os.urandom(4).hex()


def _process_token() -> str:
    return f"{os.getpid()}-{_PROCESS_TOKEN}"


def _refresh_token() -> None:
    global _PROCESS_TOKEN
    _PROCESS_TOKEN = os.urandom(4).hex()


os.register_at_fork(after_in_child=_refresh_token)


class LocalChannel:
    """The hand-over point shared by a local queue's producers and its consumer."""

    def __init__(self) -> None:
        self._events: deque[tuple[Any, ...]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._credit_changed = threading.Condition(threading.Lock())
        self._credits: dict[str, Credit] = {}
        self._inlet: LocalInlet | None = None

    def push(self, event: tuple[Any, ...]) -> None:
        with self._ready:
            self._events.append(event)
            self._ready.notify()

    def take(self, timeout: float) -> list[tuple[Any, ...]]:
        with self._ready:
            if not self._events and timeout > 0:
                self._ready.wait(timeout)
            events = list(self._events)
            self._events.clear()
        return events

    def set_credit(self, producer: str, credit: Credit) -> None:
        with self._credit_changed:
            self._credits[producer] = credit
            self._credit_changed.notify_all()

    def wait_credit(self, producer: str, last: Credit | None, timeout: float) -> Credit | None:
        with self._credit_changed:
            credit = self._credits.get(producer)
            if credit is last and timeout > 0:
                self._credit_changed.wait(timeout)
                credit = self._credits.get(producer)
            return None if credit is last else credit

    def close(self, timeout: float | None = None) -> None:
        """Nothing to release: the channel is plain Python objects."""


class LocalLink:
    """A producer's side of a :class:`LocalChannel`."""

    def __init__(self, channel: LocalChannel, queue_id: str = "") -> None:
        self._channel = channel
        self._queue_id = queue_id
        self._last: Credit | None = None
        self._producer = ""

    def _inlet(self) -> Any:
        return self._channel._inlet

    def send_hello(self, producer: str, epoch: int, next_seq: int, acked: int) -> None:
        self._producer = producer
        fields = {"producer": producer, "epoch": epoch, "next_seq": next_seq, "acked": acked}
        self._channel.push(("hello", self._inlet(), producer, fields))

    def send_batch(self, producer: str, seq: int, records: list[Any]) -> tuple[int, int, list[str]]:
        if _tracing.active:
            _tracing.local_hops(records, self._queue_id)
        self._channel.push(("data", self._inlet(), producer, producer, seq, records, 0))
        return len(records), 0, []

    def send_end(self, producer: str, seq: int) -> None:
        self._channel.push(("end", self._inlet(), producer, producer, seq))

    def send_close(self, producer: str, seq: int) -> None:
        self._channel.push(("close", self._inlet(), producer, producer, seq))

    def send_heartbeat(self, producer: str) -> None:
        self._channel.push(("heartbeat", self._inlet(), producer, producer))

    def poll(self, timeout: float) -> list[Credit]:
        credit = self._channel.wait_credit(self._producer, self._last, timeout)
        if credit is None:
            return []
        self._last = credit
        return [credit]

    def close(self) -> None:
        pass


class LocalInlet:
    """The consumer's side of a :class:`LocalChannel`."""

    rejected = 0

    def __init__(self, channel: LocalChannel) -> None:
        self._channel = channel
        channel._inlet = self

    def recv(self, timeout: float) -> list[tuple[Any, ...]]:
        events = self._channel.take(timeout)
        # Producers may have been created before the consumer: bind their events to us.
        return [e if e[1] is self else (e[0], self, *e[2:]) for e in events]

    def send_credit(self, peer: Any, credit: Credit) -> bool:
        self._channel.set_credit(peer, credit)
        return True

    def close(self) -> None:
        pass


class LocalQueueType(QueueType):
    name: ClassVar[str] = "local"
    capabilities: ClassVar[Capabilities] = Capabilities(
        cross_process=False, cross_host=False, by_reference=True, zero_copy=True
    )
    metadata_keys: ClassVar[frozenset[str]] = COMMON_METADATA_KEYS | {"owner"}

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        meta = dict(descriptor.metadata)
        endpoint = meta.get("endpoint")
        if endpoint is not None and not str(endpoint).startswith("inproc://"):
            raise DescriptorError(
                f"a local queue's endpoint must be inproc://NAME, got {endpoint!r}; "
                "for ipc:// use queue_type='shm', for tcp:// use queue_type='tcp'"
            )
        meta.setdefault("endpoint", f"inproc://{descriptor.queue_id}-{os.urandom(4).hex()}")
        meta.setdefault("owner", _process_token())
        return meta

    def check_usable_here(self, descriptor: QueueDescriptor) -> None:
        owner = descriptor.metadata.get("owner")
        if owner is not None and owner != _process_token():
            raise DescriptorError(
                f"local queue {descriptor.queue_id!r} belongs to process "
                f"{str(owner).split('-')[0]}, and local queues pass objects by reference inside "
                "one process; promote it there with qd.as_type('shm') (same host) or "
                "qd.as_type('tcp') and pass that descriptor instead"
            )

    def validate(self, descriptor: QueueDescriptor) -> None:
        endpoint = descriptor.metadata.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith("inproc://"):
            raise DescriptorError(
                f"a local queue's endpoint must be inproc://NAME, got {endpoint!r}"
            )

    def release(self, descriptor: QueueDescriptor) -> None:
        from sage_zmq import _runtime

        key = ("local-channel", str(descriptor.metadata["endpoint"]))
        channel = _runtime.existing_handle(key)
        if channel is not None:
            _runtime.forget_handle(key, channel)

    def channel(self, descriptor: QueueDescriptor) -> LocalChannel:
        from sage_zmq import _runtime

        key = ("local-channel", str(descriptor.metadata["endpoint"]))
        channel: LocalChannel = _runtime.handle_for(key, LocalChannel)
        return channel

    def open_producer_link(self, descriptor: QueueDescriptor) -> ProducerLink:
        return LocalLink(self.channel(descriptor), descriptor.queue_id)

    def open_consumer_inlet(self, descriptor: QueueDescriptor) -> ConsumerInlet:
        return LocalInlet(self.channel(descriptor))
