"""``ray``: Ray places the actors and tells producers where to connect; ZeroMQ carries the data.

A ray descriptor is a small value, ``ray://<queue_id>``: no address, no actor handle. The
consumer (driver, task or actor, on any node) binds a tcp ROUTER on its node's address
(``ray.util.get_node_ip_address()``, or ``metadata["host"]``) and publishes the endpoint in
Ray's GCS key-value store under ``<ray namespace>/<queue_id>``. The KV store was chosen over a
named registry actor: it needs no extra worker process, has no creation race or lifetime to
manage, and outlives any worker. Producers look the endpoint up lazily and again when their
socket reports the consumer gone or credit stalls; a consumer actor that Ray restarts
(``max_restarts``) binds a new port and republishes, and producers move to it.

On Linux the same ROUTER also binds an ipc socket in the abstract namespace (no file, so a
killed consumer leaves nothing behind) and publishes it beside the tcp endpoint. A producer on
the consumer's own Ray node and in its network namespace connects there: loopback tcp costs
10-30 µs more per message on the machines measured. The ipc socket is as reachable as the tcp
port (any local process; CURVE, when on, guards both). ``metadata["ipc"] = False`` keeps every
producer on tcp.

Without ``ack``/``persist``, records in flight to a consumer that died are lost with it; the
new consumer logs the gap and a producer's ``close`` raises ``DeliveryError`` for what was not
confirmed. With ``metadata["ack"] = True`` the reliable layer retransmits them. Backpressure is
the core's: ``put`` blocks on credit (``Full`` after ``timeout``), nothing is dropped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from sage_zmq import _runtime
from sage_zmq.errors import DescriptorError, MissingDependency, SageZmqError
from sage_zmq.observe.logging import connection_event
from sage_zmq.queues._socket_type import SocketQueueType
from sage_zmq.queues._zmq import (
    DealerLink,
    RouterInlet,
    check_tcp_endpoint,
    derive_abstract_ipc_endpoint,
)
from sage_zmq.queues.base import Capabilities, ConsumerInlet, Credit, ProducerLink, check_flag
from sage_zmq.wire.codec import Codec
from sage_zmq.wire.frame import Kind

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor

__all__ = [
    "INSTALL_HINT",
    "ConsumerEntry",
    "RayConsumerInlet",
    "RayNotConnected",
    "RayProducerLink",
    "RayQueueType",
    "consume_here",
    "lookup_consumer",
]

log = logging.getLogger("sage_zmq.queue.ray")

INSTALL_HINT = "pip install sage-zmq[ray]"
KV_NAMESPACE = "sage_zmq.queues"
_SCHEME = "ray://"


class RayNotConnected(SageZmqError):
    """This process is not connected to a Ray cluster (``ray.init()`` was not called)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependency(
            f"queue_type 'ray' needs Ray, which is not installed here: {INSTALL_HINT}"
        ) from None
    return ray


def _connected_ray() -> Any:
    ray = _ray()
    if not ray.is_initialized():
        raise RayNotConnected(
            "queue_type 'ray' needs this process connected to Ray: call ray.init() (or "
            "ray.init(address=...)) in the driver first; tasks and actors are connected already"
        )
    return ray


# ------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ConsumerEntry:
    """What a consumer publishes: where to connect, and a token that changes on restart."""

    endpoint: str
    token: str
    node_id: str = ""
    pid: int = 0
    local_endpoint: str = ""
    """An ipc endpoint for producers on the consumer's node ("" when there is none)."""
    netns: str = ""
    """The consumer's network namespace: the abstract ipc name is visible only inside it."""


def _key(descriptor: QueueDescriptor) -> str:
    ns = descriptor.metadata.get("namespace")
    if ns is None:
        ns = _connected_ray().get_runtime_context().namespace
    return f"{ns}/{descriptor.queue_id}"


def _actor_id() -> str | None:
    """This actor's id (it survives a restart by Ray), or None outside an actor."""
    actor = _connected_ray().get_runtime_context().get_actor_id()
    return None if actor is None else str(actor)


def _ends_key(descriptor: QueueDescriptor) -> str:
    return _key(descriptor) + "/ends"


def _kv() -> Any:
    _connected_ray()
    # Ray's GCS KV store; an internal module, so every use goes through this one function.
    from ray.experimental import internal_kv

    return internal_kv


def lookup_consumer(descriptor: QueueDescriptor) -> ConsumerEntry | None:
    """The consumer currently published for a ray queue, or None."""
    raw = _kv()._internal_kv_get(_key(descriptor), namespace=KV_NAMESPACE)
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
        endpoint, token = str(fields["endpoint"]), str(fields["token"])
        local, netns = fields.get("local_endpoint") or "", fields.get("netns") or ""
        if not isinstance(local, str) or (local and not local.startswith("ipc://")):
            raise ValueError(f"local_endpoint {local!r} is not an ipc endpoint")
        return ConsumerEntry(
            endpoint, token, str(fields["node_id"]), int(fields["pid"]), local, str(netns)
        )
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("queue %s: unreadable registry entry %r: %s", descriptor.queue_id, raw, exc)
        return None


def _publish(descriptor: QueueDescriptor, entry: ConsumerEntry) -> None:
    value = json.dumps(entry.__dict__).encode()
    _kv()._internal_kv_put(_key(descriptor), value, True, namespace=KV_NAMESPACE)


def _unpublish(descriptor: QueueDescriptor, token: str) -> None:
    current = lookup_consumer(descriptor)
    if current is not None and current.token == token:
        _kv()._internal_kv_del(_key(descriptor), namespace=KV_NAMESPACE)


def _refuse_if_consumed(descriptor: QueueDescriptor, own_endpoint: str) -> None:
    """A queue has one consumer: refuse to replace a published one that still lives.

    Replacing it silently split the stream by timing (producers that looked it up before
    kept sending to the first). One that died (a killed actor Ray restarts, a lost node) is
    replaced. On this host the kernel says whether its process lives (its port may already
    serve another socket, even this one); elsewhere, whether its endpoint still accepts.
    """
    current = lookup_consumer(descriptor)
    if current is None or current.endpoint == own_endpoint:
        return
    if current.netns and current.netns == _netns() and current.pid > 0:
        from sage_zmq.shm.sweep import pid_alive  # here: the shm package imports numpy

        alive = current.pid != os.getpid() and pid_alive(current.pid)
    else:
        alive = _listening(current.endpoint)
    if not alive:
        return
    raise DescriptorError(
        f"ray queue {descriptor.queue_id!r} already has a consumer (pid {current.pid} on node "
        f"{current.node_id[:12]}, at {current.endpoint}); a queue has one consumer: close that "
        "one first, or give this consumer its own queue id"
    )


def _listening(endpoint: str, timeout: float = 0.5) -> bool:
    """Whether something accepts tcp connections at ``endpoint`` (a dead consumer does not)."""
    import socket

    address = endpoint.removeprefix("tcp://")
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def consume_here(descriptor: QueueDescriptor) -> None:
    """Become the consumer now (e.g. in an actor's ``__init__``) so producers find it early.

    Otherwise the consumer binds and publishes at its first ``get``.
    """
    descriptor._handle().consumer(descriptor)


# ------------------------------------------------------------------------------- consumer
class RayConsumerInlet(RouterInlet):
    """A ROUTER on this node's address, published in Ray's KV store while it is open."""

    def __init__(self, descriptor: QueueDescriptor, codec: Codec, opts: Any, host: str) -> None:
        super().__init__(f"tcp://{_bracket(host)}:0", codec, opts, queue_id=descriptor.queue_id)
        self._descriptor = descriptor
        self.token = os.urandom(8).hex()
        try:
            self.local_endpoint = self._bind_local() if descriptor.metadata.get("ipc", True) else ""
            ray = _connected_ray()
            node = ray.get_runtime_context().get_node_id()
            _refuse_if_consumed(descriptor, self.endpoint)
            entry = ConsumerEntry(
                self.endpoint, self.token, node, os.getpid(), self.local_endpoint, _netns()
            )
            _publish(descriptor, entry)
        except BaseException:
            super().close()
            raise

    def _bind_local(self) -> str:
        if not _netns():
            return ""  # no abstract namespace (not Linux): producers use tcp
        try:
            return self.bind_also(derive_abstract_ipc_endpoint(self.queue_id))
        except SageZmqError as exc:  # tcp still serves
            log.warning("queue %s: no ipc endpoint for same-node producers: %s", self.queue_id, exc)
            return ""

    def ends_counted_before(self) -> set[tuple[str, int]]:
        """Ends of stream a previous life of this consumer counted (the same actor, killed
        and restarted by Ray): they are not sent again, the producers that sent them may be
        gone. Another consumer of the queue (another actor, a task, the driver) starts afresh."""
        actor = _actor_id()
        if actor is None:
            return set()
        try:
            raw = _kv()._internal_kv_get(_ends_key(self._descriptor), namespace=KV_NAMESPACE)
            if not raw:
                return set()
            entry = json.loads(raw)
            if entry.get("actor") != actor:
                return set()
            return {(str(p), int(seq)) for p, seq in entry["ends"]}
        except Exception as exc:  # an unreadable entry: count afresh, and say so
            log.warning("queue %s: ends of stream counted before unknown: %s", self.queue_id, exc)
            return set()

    def note_end_counted(self, ends: set[tuple[str, int]]) -> None:
        actor = _actor_id()
        if actor is None:
            return  # not an actor: Ray does not restart it
        value = json.dumps({"actor": actor, "ends": sorted(ends)}).encode()
        _kv()._internal_kv_put(_ends_key(self._descriptor), value, True, namespace=KV_NAMESPACE)

    def close(self) -> None:
        try:
            _unpublish(self._descriptor, self.token)
            # A consumer closed on purpose is not restarted: the next one starts afresh.
            _kv()._internal_kv_del(_ends_key(self._descriptor), namespace=KV_NAMESPACE)
        except Exception as exc:  # Ray may be shut down already; the entry is then moot
            log.debug("queue %s: could not unpublish: %s", self.queue_id, exc)
        super().close()


def _netns() -> str:
    """This process's network namespace (Linux), or "" where there is no abstract namespace."""
    if not sys.platform.startswith("linux"):
        return ""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


# ------------------------------------------------------------------------------- producer
_SUSPECT_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
_MONITOR_EVENTS = _SUSPECT_EVENTS | zmq.EVENT_CONNECTED


class RayProducerLink:
    """A producer's link that finds the consumer through Ray and follows it across restarts.

    Until a consumer is published, frames wait here (credits bound them to ``maxsize``
    records) and ``poll`` keeps looking; once found, they go out in order. When the socket
    reports the consumer gone, or no credit came for ``STALL`` seconds while records are
    unconfirmed, the link looks again; a new entry (token) means a new consumer: the link
    connects to it and introduces the producer with a HELLO from the last acked seq. No entry
    at all means the consumer closed and none took its place: the link drops its socket (whose
    frames would wait for a reconnect to an endpoint nobody will bind again) and frames wait
    here again for the next consumer.
    """

    LOOKUP_MIN = 0.01
    LOOKUP_MAX = 0.5
    STALL = 1.0
    WAIT_SLICE = 0.1
    WATCH_GAP = 0.01
    """Seconds between looks at the connection monitor while sending."""

    def __init__(
        self,
        descriptor: QueueDescriptor,
        make_link: Callable[[str], DealerLink],
        codec: Codec,
        compress: bool | str,
        reliable: bool = False,
    ) -> None:
        self.queue_id = descriptor.queue_id
        self.codec = codec
        self.compress = compress
        self.released: list[int] = []
        self.reconnects = 0
        self.lost = 0  # records at most, sent to consumers that restarted unconfirmed (no ack)
        self._descriptor = descriptor
        self._make = make_link
        self._reliable = reliable  # the reliable layer above retransmits after a restart
        self._inner: DealerLink | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._entry: ConsumerEntry | None = None
        self._endpoint = ""
        self._use_ipc = bool(descriptor.metadata.get("ipc", True))
        self._node_id: str | None = None
        self._backlog: list[Callable[[DealerLink], None]] = []
        self._hello: tuple[str, int] | None = None
        self._sent_seq = 0
        self._acked = 0
        self._received = 0
        self._suspect = False
        self._gap = self.LOOKUP_MIN
        self._next_lookup = 0.0
        self._last_credit = time.monotonic()
        self._next_watch = 0.0
        self._closed = False
        self._read_at_switch: list[Credit] = []  # the old consumer's last reports, for poll()
        # The seq where the frames sent to a consumer that closed (unpublished) ended; the
        # backlog holds what was put after it, for the next consumer. None: no such gap.
        self._parked_at: int | None = None
        # The ticker thread resolves and follows the consumer while the producer is idle.
        self._lock = threading.RLock()
        self._lookup()
        if self._inner is None:
            _runtime.ticker().add(self, self.LOOKUP_MIN)

    # ------------------------------------------------------------------ finding the consumer
    @property
    def endpoint(self) -> str:
        """Where this producer sends: the consumer's ipc or tcp endpoint ("" before lookup)."""
        return self._endpoint

    @property
    def errors(self) -> int:
        return 0 if self._inner is None else self._inner.errors

    @property
    def refused(self) -> str | None:
        """Why the consumer refuses this producer (see ``DealerLink.refused``)."""
        return None if self._inner is None else self._inner.refused

    @property
    def unsent_frames(self) -> int:
        """Frames no connection to the consumer took (see ``DealerLink.unsent_frames``)."""
        return 0 if self._inner is None else self._inner.unsent_frames

    def _lookup(self) -> bool:
        """Look the consumer up; True if the link moved to a new one."""
        now = time.monotonic()
        self._next_lookup = now + self._gap
        self._gap = min(self._gap * 2, self.LOOKUP_MAX)
        try:
            entry = lookup_consumer(self._descriptor)
        except SageZmqError:
            raise
        except Exception as exc:  # a GCS hiccup: keep the current socket, try again later
            log.debug("queue %s: consumer lookup failed: %s", self.queue_id, exc)
            return False
        if entry is None:
            if self._inner is not None and self._suspect:
                self._park()
            return False
        if self._entry is not None and entry.token == self._entry.token and self._inner:
            return False
        self._switch(entry)
        return True

    def _park(self) -> None:
        """The consumer closed (it unpublished itself) and none replaced it: stop sending into
        its socket, where frames would wait for an endpoint nobody binds again; later frames
        wait in the backlog for the next consumer."""
        old = self._inner
        assert old is not None
        # Its last reports, the reliable layer's too: what they confirm is not sent again.
        self._read_final_reports(old)
        self._drop_socket(linger=0)
        self._parked_at = self._sent_seq
        connection_event(
            "peer_dead",
            queue=self.queue_id,
            peer=self._endpoint,
            detail="the consumer closed and none took its place; records wait for the next",
        )
        _runtime.ticker().add(self, self.LOOKUP_MIN)

    def _read_final_reports(self, old: DealerLink) -> None:
        # Reports the old consumer sent before it went: what they confirm is not lost.
        with contextlib.suppress(zmq.ZMQError):
            credits = old.poll(0)
            if credits:
                self._on_credits(credits)
                self._read_at_switch.extend(credits)

    def _route(self, entry: ConsumerEntry) -> str:
        """The consumer's ipc endpoint if it is on this node and reachable, else its tcp one."""
        if not entry.local_endpoint or not self._use_ipc:
            return entry.endpoint
        if self._node_id is None:
            self._node_id = str(_connected_ray().get_runtime_context().get_node_id())
        # The node id alone is not enough: a worker in its own network namespace (a container)
        # cannot see the abstract name, and its connect would retry forever.
        if entry.node_id == self._node_id and entry.netns and entry.netns == _netns():
            return entry.local_endpoint
        return entry.endpoint

    def _switch(self, entry: ConsumerEntry) -> None:
        old = self._inner
        if old is not None and not self._reliable:
            # (The reliable layer retransmits what was not acked, and follows sessions itself.)
            self._read_final_reports(old)
        endpoint = self._route(entry)
        inner = self._make(endpoint)
        monitor = inner.sock.get_monitor_socket(_MONITOR_EVENTS)
        self._drop_socket(linger=0)
        self._inner, self._monitor, self._entry = inner, monitor, entry
        self._endpoint = endpoint
        self._suspect = False
        self._gap = self.LOOKUP_MIN
        self._last_credit = time.monotonic()
        parked, self._parked_at = self._parked_at, None
        backlog, self._backlog = self._backlog, []
        if old is None and parked is None:  # the first consumer: the backlog starts with HELLO
            for send in backlog:
                send(inner)
            return
        self.reconnects += 1
        # What went into the previous consumer's socket ends here; the backlog comes after.
        sent_before = self._sent_seq if parked is None else parked
        why = (
            "the consumer restarted"
            if parked is None
            else "a consumer took over from one that closed"
        )
        connection_event("reconnect", queue=self.queue_id, peer=endpoint, detail=why)
        at_risk = sent_before - self._acked
        if at_risk > 0 and not self._reliable:
            self.lost += at_risk
            connection_event(
                "lost",
                queue=self.queue_id,
                peer=endpoint,
                detail=f"{why}; up to {at_risk} records sent to the old one "
                f"(seq {self._acked}..{sent_before - 1}) were not acked and are lost; set "
                "metadata ack=True to have them retransmitted",
                records=at_risk,
            )
        if self._hello is not None:
            producer, epoch = self._hello
            if self._reliable:
                # The reliable layer's frames pass through send_frame, which does not read
                # their seqs, so what was acked may be ahead of what this link saw sent.
                self._sent_seq = max(self._sent_seq, self._acked)
                inner.send_hello(producer, epoch, self._sent_seq, self._acked)
            else:
                # Nothing will retransmit the lost range: start the new consumer after it,
                # or it would wait for seqs that never come and grant no credit.
                self._acked = self._received = sent_before
                inner.send_hello(producer, epoch, sent_before, sent_before)
        for send in backlog:  # what was put while no consumer was published
            send(inner)

    def _drop_socket(self, linger: int | None) -> None:
        inner, monitor = self._inner, self._monitor
        self._inner = self._monitor = None
        if inner is None:
            return
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                inner.sock.disable_monitor()
            monitor.close(linger=0)
        if linger is not None:
            inner.sock.setsockopt(zmq.LINGER, linger)
        inner.close()

    def _watch(self) -> None:
        monitor = self._monitor
        while monitor is not None and int(monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] & _SUSPECT_EVENTS:
                if not self._suspect:
                    self._suspect = True
                    self._gap = self.LOOKUP_MIN
                    self._next_lookup = 0.0
                    _runtime.ticker().add(self, self.LOOKUP_MIN)
            elif event["event"] == zmq.EVENT_CONNECTED:
                self._suspect = False

    def _maybe_lookup(self, now: float) -> None:
        if now < self._next_lookup:
            return
        stalled = self._sent_seq > self._received and now - self._last_credit > self.STALL
        if self._inner is None or self._suspect or stalled:
            self._lookup()

    def tick(self, now: float) -> float | None:
        """Ticker thread: look for the consumer while none is known or it seems gone."""
        if self._closed:
            return None
        if not self._lock.acquire(blocking=False):
            return self.LOOKUP_MIN  # the producer is using the link: look next tick
        try:
            if self._closed:
                return None
            self._watch()
            self._maybe_lookup(time.monotonic())
            if self._inner is None or self._suspect:
                return max(self.LOOKUP_MIN, self._next_lookup - time.monotonic())
            return None
        finally:
            self._lock.release()

    # ------------------------------------------------------------------------- sending
    def send_hello(self, producer: str, epoch: int, next_seq: int, acked: int) -> None:
        with self._lock:
            self._hello = (producer, epoch)
            self._sent_seq = max(self._sent_seq, next_seq)
            self._acked = max(self._acked, acked)
            self._received = max(self._received, acked)
            if self._inner is not None:
                self._inner.send_hello(producer, epoch, next_seq, acked)
            else:
                self._backlog.append(lambda link: link.send_hello(producer, epoch, next_seq, acked))

    def send_batch(self, producer: str, seq: int, records: list[Any]) -> tuple[int, int, list[str]]:
        with self._lock:
            inner = self._inner
            if inner is not None and self._monitor is not None:
                now = time.monotonic()
                if now >= self._next_watch:
                    # Reading the monitor costs syscalls: on a busy link, a look per
                    # WATCH_GAP finds a vanished consumer soon enough.
                    self._next_watch = now + self.WATCH_GAP
                    self._watch()
                if self._suspect:
                    self._maybe_lookup(time.monotonic())
                    inner = self._inner
            if inner is not None:
                result = inner.send_batch(producer, seq, records)
            else:
                frame, sent, errors = self.codec.encode_batch(
                    producer, seq, records, compress=self.compress
                )
                if sent:
                    self._backlog.append(lambda link: link.send_frame(frame))
                result = (len(sent), len(frame) if sent else 0, errors)
            self._sent_seq = max(self._sent_seq, seq + result[0])
            return result

    def send_frame(self, frame: bytes) -> None:
        """Send an already encoded frame (the reliable layer's retransmissions)."""
        with self._lock:
            if self._inner is not None:
                self._inner.send_frame(frame)
            else:
                self._backlog.append(lambda link: link.send_frame(frame))

    def send_end(self, producer: str, seq: int) -> None:
        with self._lock:
            self._sent_seq = max(self._sent_seq, seq + 1)
            self._control(Kind.END, lambda link: link.send_end(producer, seq))

    def send_close(self, producer: str, seq: int) -> None:
        with self._lock:
            self._control(Kind.CLOSE, lambda link: link.send_close(producer, seq))

    def send_heartbeat(self, producer: str) -> None:
        with self._lock:
            self._control(Kind.HEARTBEAT, lambda link: link.send_heartbeat(producer))

    def _control(self, kind: Kind, send: Callable[[DealerLink], None]) -> None:
        if self._inner is not None:
            send(self._inner)
        elif kind is not Kind.HEARTBEAT:  # a heartbeat to nobody means nothing later
            self._backlog.append(send)

    # ------------------------------------------------------------------------- credits
    def poll(self, timeout: float) -> list[Credit]:
        with self._lock:
            deadline = time.monotonic() + max(0.0, timeout)
            while True:
                self._watch()
                now = time.monotonic()
                self._maybe_lookup(now)
                if self._read_at_switch:
                    credits, self._read_at_switch = self._read_at_switch, []
                    return credits
                remaining = deadline - now
                inner = self._inner
                if inner is None:
                    if remaining <= 0:
                        return []
                    time.sleep(max(0.0, min(remaining, self._next_lookup - now, self.WAIT_SLICE)))
                    continue
                credits = inner.poll(max(0.0, min(remaining, self.WAIT_SLICE)))
                if credits:
                    self._on_credits(credits)
                    return credits
                if deadline - time.monotonic() <= 0:
                    return []

    def _on_credits(self, credits: list[Credit]) -> None:
        self._last_credit = time.monotonic()
        self._suspect = False
        for credit in credits:
            if credit.limit == 0:
                continue  # a reliable consumer's "who are you?": no progress in it
            self._acked = max(self._acked, credit.acked)
            self._received = max(self._received, credit.received)
        if self._inner is not None:
            self.released.extend(self._inner.released)
            self._inner.released.clear()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._backlog.clear()
            self._drop_socket(linger=None)
        _runtime.ticker().discard(self)


# ------------------------------------------------------------------------------- the type
class RayQueueType(SocketQueueType):
    """Registered as ``ray``; the reliable layer applies with ``ack``/``persist``."""

    name: ClassVar[str] = "ray"
    capabilities: ClassVar[Capabilities] = Capabilities(
        cross_process=True,
        cross_host=True,
        extra="Ray finds the consumer (GCS KV store); ZeroMQ tcp carries the data",
    )
    metadata_keys: ClassVar[frozenset[str]] = (SocketQueueType.metadata_keys - {"bind"}) | {
        "host",
        "ipc",
        "namespace",
    }

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        _ray()
        meta = dict(descriptor.metadata)
        meta.setdefault("endpoint", f"{_SCHEME}{descriptor.queue_id}")
        self._check(descriptor.queue_id, meta)
        return meta

    def validate(self, descriptor: QueueDescriptor) -> None:
        self._check(descriptor.queue_id, descriptor.metadata)

    @staticmethod
    def _check(queue_id: str, meta: dict[str, Any]) -> None:
        endpoint = meta.get("endpoint")
        if endpoint != f"{_SCHEME}{queue_id}":
            raise DescriptorError(
                f"a ray queue's endpoint is ray://<queue_id> (here {_SCHEME}{queue_id}), got "
                f"{endpoint!r}: leave endpoint out; Ray finds the consumer's tcp address itself"
            )
        if "bind" in meta:
            raise DescriptorError(
                "metadata['bind'] does not apply to a ray queue: its consumer binds a port the "
                "OS picks on its own node and publishes it; name the address with "
                "metadata['host'] (default: the node's IP)"
            )
        for key in ("host", "namespace"):
            value = meta.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise DescriptorError(
                    f"metadata[{key!r}] of a ray queue must be a non-empty string, got {value!r}"
                )
        check_flag("ipc", meta.get("ipc", True))
        host = meta.get("host")
        if host in ("*", "0.0.0.0", "::"):
            raise DescriptorError(
                f"metadata['host'] = {host!r} is not connectable: name this node's "
                "address (the default is ray.util.get_node_ip_address())"
            )
        if host is not None:
            # A bare host name or address; the port is chosen when the consumer binds.
            if "/" in host or (":" in host and not _is_ipv6(host)):
                raise DescriptorError(
                    f"metadata['host'] must be a host name or IP address (no scheme or port), "
                    f"got {host!r}"
                )
            try:
                check_tcp_endpoint(f"tcp://{_bracket(host)}:1")
            except DescriptorError as exc:
                raise DescriptorError(f"metadata['host'] = {host!r}: {exc}") from None

    def check_usable_here(self, descriptor: QueueDescriptor) -> None:
        _connected_ray()

    def release(self, descriptor: QueueDescriptor) -> None:
        """Nothing is bound before first use, so nothing to free."""

    def open_producer_link(self, descriptor: QueueDescriptor) -> ProducerLink:
        codec = self.codec(descriptor)
        opts = self.socket_options(descriptor)
        compress = self.compress(descriptor)

        def make(endpoint: str) -> DealerLink:
            # "auto" compression decides by where the link goes: a remote node, or not.
            mode = self.compress(descriptor, endpoint)
            return DealerLink(endpoint, codec, opts, compress=mode, queue_id=descriptor.queue_id)

        return RayProducerLink(descriptor, make, codec, compress, self.reliable(descriptor))

    def open_consumer_inlet(self, descriptor: QueueDescriptor) -> ConsumerInlet:
        host = descriptor.metadata.get("host") or _connected_ray().util.get_node_ip_address()
        return RayConsumerInlet(
            descriptor, self.codec(descriptor), self.socket_options(descriptor), str(host)
        )


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
