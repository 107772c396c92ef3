"""``shm``: processes on one host over ipc sockets, large payloads through shared memory.

A payload of at least ``shm_threshold`` bytes (numpy arrays anywhere in a record; bytes,
bytearray and memoryview at the top level or as a Packet payload, and nested ones in batches
that they dominate) is copied into the producer's shared-memory pool; the frame carries only
a reference (``transports/PROTOCOL.md`` §6). The consumer gets a read-only numpy array or
memoryview over the slot (a copy when ``zero_copy`` is off); the slot goes back to the producer
when that view is garbage-collected or handed to :func:`sage_zmq.shm.release`.
``ShmProducer.alloc`` lends a writable buffer in the pool, so a producer can fill it in place
and ``put`` it without any copy.

Lifetime: the producer unlinks its segments when it closes; a later process sweeps those of a
producer that was killed. Slots held by a consumer that was killed come back when the next
consumer's first CREDIT says where its stream started (``base``) and the old consumer's
process (``pid``) is gone; a consumer re-opened in a living process keeps its views.

Metadata (over ``performance.*`` config): ``shm_threshold`` (bytes), ``memory_pool_size``
(MiB; 0 sends everything inline), ``zero_copy``, ``shm_wait`` (seconds a producer waits for
room in a full pool before sending a payload inline; default 2).

Without an endpoint, a private ipc path is derived in the 0700 runtime directory; long queue
ids are hashed so the path stays under the ~107-byte ipc limit.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from sage_zmq.config import current_config
from sage_zmq.errors import DeliveryError, DescriptorError, QueueClosed, SecurityError
from sage_zmq.packet import Packet
from sage_zmq.queues._producer import Producer
from sage_zmq.queues._socket_type import SocketQueueType
from sage_zmq.queues._zmq import (
    DealerLink,
    RouterInlet,
    SocketOptions,
    check_ipc_endpoint,
    derive_ipc_endpoint,
)
from sage_zmq.queues.base import (
    Capabilities,
    ConsumerInlet,
    Credit,
    DrainingBatch,
    ProducerLink,
    QueueStatistics,
    producer_options,
)
from sage_zmq.shm import ring as ring_mod
from sage_zmq.shm.pool import ShmError
from sage_zmq.shm.ring import ReleaseRing
from sage_zmq.shm.sweep import pid_alive, sweep_orphans
from sage_zmq.shm.transfer import SCAN_DEPTH, ShmReceiver, ShmSender
from sage_zmq.wire.codec import Codec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sage_zmq.descriptor import QueueDescriptor

log = logging.getLogger("sage_zmq.queue")

DEFAULT_SHM_WAIT = 2.0
"""Seconds a producer waits for a full pool to free room before sending a payload inline."""

FRAME_CAP = 4 << 20
"""A batch whose frame comes out larger is split: big frames stall the consumer and memory."""

SHM_FLUSH_BYTES = 8 << 20
"""About how many payload bytes a busy producer ships per frame (the generic FLUSH_BYTES is
16 MiB). A consumer that reads on sends its releases when it next reads the socket, after the
frame's last record, so each payload in a frame holds a pool slot until then: the slots a
producer cycles through grow with the frame, and fewer of them stay in cache. 1 MiB arrays
between two processes, 1000 a run (median of 7, 2-core VM): put 10.7 -> 13.6 GB/s, alloc +
fill + put 10.2 -> 13.4; 6-8 MiB beat 4 and 12. A pool smaller than 32 MiB ships a quarter of
its capacity per frame (ShmDealerLink)."""

RING_LOOK_FIRST = 0.001
RING_LOOK_MAX = 0.005
"""A producer waiting for room looks at its release ring after RING_LOOK_FIRST s (the
shortest wait its socket can make), then at doubling intervals up to RING_LOOK_MAX: a release
written there wakes nobody."""

LIVE_VIEW_WAKE = 0.05
"""Longest blocking read while received views live: their releases leave at least this often
(a few wake-ups a second for a consumer that keeps arrays, far inside a producer's shm_wait)."""


# --------------------------------------------------------------------------------- producer


class ShmDealerLink(DealerLink):
    """A DEALER that sends large payloads through its :class:`ShmSender`'s pool."""

    flush_bytes = SHM_FLUSH_BYTES

    def __init__(
        self,
        endpoint: str,
        codec: Codec,
        opts: SocketOptions,
        *,
        sender: ShmSender,
        compress: bool | str = False,
        queue_id: str = "",
    ) -> None:
        super().__init__(endpoint, codec, opts, compress=compress, queue_id=queue_id)
        self.shm = sender
        self.frame_cap = min(FRAME_CAP, codec.limits.max_frame_bytes)
        self._stash: list[Credit] = []  # credits read while waiting for releases
        self._consumer: tuple[str, int | None] | None = None  # (session, pid) last seen
        self._ring_name: str | None = None  # the release ring last named by the consumer
        sender.poll_releases = self._read_releases
        codec.shm_encoder = sender.encode_array
        if 0 < sender.capacity < 4 * SHM_FLUSH_BYTES:
            # A frame's slots come back only once it is sent and read: frames worth the whole
            # pool made every put wait for the consumer (1 MiB arrays through an 8 MiB pool:
            # 5.2-5.7 GB/s, against 15-17 with frames of 2 MiB).
            self.flush_bytes = max(1, sender.capacity // 4)

    def side_bytes(self) -> int:
        """Payload bytes copied into the pool so far (they travel beside the frames)."""
        return self.shm.placed_bytes

    def send_batch(self, producer: str, seq: int, records: list[Any]) -> tuple[int, int, list[str]]:
        if not self.shm.enabled:
            return super().send_batch(producer, seq, records)
        return self._send(producer, seq, records)

    def _send(self, producer: str, seq: int, records: list[Any]) -> tuple[int, int, list[str]]:
        shm = self.shm
        encode = self.codec.encode_batch
        shm.begin()
        try:
            staged = shm.stage(records)
            frame, sent, errors = encode(producer, seq, staged, compress=self.compress)
            deep = False
            if _worth_deep_scan(len(frame), len(records), shm.threshold) and _has_nested_bytes(
                records, shm.threshold
            ):
                shm.abort()
                shm.begin()
                deep = True
                staged = shm.stage(records, deep=True)
                frame, sent, errors = encode(producer, seq, staged, compress=self.compress)
            if errors and sent:
                # Slots placed for the records that failed are not in the frame: start over
                # with the records that encode.
                shm.abort()
                shm.begin()
                keep = {id(s) for s in sent}
                shm.forget([r for r, s in zip(records, staged, strict=True) if id(s) not in keep])
                records = [r for r, s in zip(records, staged, strict=True) if id(s) in keep]
                staged = shm.stage(records, deep=deep)
                frame, sent, more = encode(producer, seq, staged, compress=self.compress)
                errors = errors + more
            if len(frame) > self.frame_cap and len(sent) > 1:
                shm.abort()
                return self._send_split(producer, seq, records, len(frame), errors)
            if not sent:
                shm.abort()
                shm.forget(records)
                return 0, 0, errors
            self._send_frame(frame)
        except BaseException:
            shm.abort()
            raise
        shm.commit(seq, staged)
        return len(sent), len(frame), errors

    def _send_split(
        self, producer: str, seq: int, records: list[Any], size: int, errors: list[str]
    ) -> tuple[int, int, list[str]]:
        parts = min(len(records), -(-size // self.frame_cap))
        step = -(-len(records) // parts)
        total = nbytes = 0
        all_errors = list(errors)  # of records already left out of ``records``
        for i in range(0, len(records), step):
            sent, size_i, errs = self._send(producer, seq + total, records[i : i + step])
            total += sent
            nbytes += size_i
            all_errors.extend(errs)
        return total, nbytes, all_errors

    def poll(self, timeout: float) -> list[Credit]:
        stash = self._stash
        credits = super().poll(0 if stash else timeout)
        self._apply_released()
        self._follow_consumer(credits)
        if stash:
            credits, self._stash = stash + credits, []
        return credits

    def _read_releases(self, timeout: float) -> None:
        # Called while a full pool waits: keep the credits for the producer's next poll().
        if self.shm.ring is None:
            self._read_socket(timeout)
            return
        # Releases written to the ring wake nobody: look at it between short waits on the
        # socket (which brings credits, and releases the ring had no room for).
        deadline = time.monotonic() + timeout
        step = RING_LOOK_FIRST
        while True:
            if self._read_socket(max(0.0, min(step, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                return
            step = min(step * 2, RING_LOOK_MAX)

    def _read_socket(self, timeout: float) -> bool:
        credits = DealerLink.poll(self, timeout)
        got = self._apply_released()
        if credits:
            self._follow_consumer(credits)
            self._stash.extend(credits)
            del self._stash[:-64]  # cumulative values: the latest ones say everything
        return got

    def _follow_consumer(self, credits: list[Credit]) -> None:
        """Read the release ring a consumer names; on a new consumer session, take back the
        slots its dead predecessor held.

        A dead consumer never releases what it held. Its successor's CREDIT says where its
        life started (``base``): frames before that went to the predecessor (or were lost with
        it). Only a predecessor whose process is gone is counted out: a consumer re-opened in
        a living process may still hold views of those slots.
        """
        for credit in credits:
            if credit.ring != self._ring_name:
                self._adopt_ring(credit.ring)
            known = self._consumer
            if known is not None and known[0] == credit.session:
                continue
            if credit.limit == 0:
                continue  # "who are you?" from a reliable consumer: no state in it
            self._consumer = (credit.session, credit.pid)
            if known is None or known[1] is None or credit.base is None:
                continue
            if known[1] == credit.pid or pid_alive(known[1]):
                continue
            taken = self.shm.reclaim_sent_before(credit.base)
            if taken:
                log.info(
                    "queue %s: the consumer changed and the old one (pid %d) is gone; "
                    "took back %d shared-memory slots it held",
                    self.queue_id,
                    known[1],
                    taken,
                )

    def _adopt_ring(self, name: str | None) -> None:
        """Read releases from the consumer's ring ``name`` from now on (None: from frames
        only). The ring before, if any, is drained and let go: its consumer was replaced."""
        self._ring_name = name
        old = self.shm.ring
        if old is not None:
            self.shm.take_ring()
            self.shm.ring = None
            old.close()
        if name is None or not ring_mod.SUPPORTED or not self.shm.enabled:
            return
        try:
            ring = ReleaseRing.open(name)
        except (ShmError, SecurityError) as exc:
            # Gone: its consumer closed since the CREDIT (a normal end), or died.
            gone = isinstance(exc.__cause__, FileNotFoundError)
            log.log(
                logging.DEBUG if gone else logging.WARNING,
                "queue %s: cannot read the consumer's release ring (%s); releases come as frames",
                self.queue_id,
                exc,
            )
            return
        ring.attach()
        self.shm.ring = ring

    def _apply_released(self) -> bool:
        """Apply the releases read from the socket and the ring; whether there were any."""
        got = self.shm.take_ring()
        if self.released:
            ids, self.released = self.released, []
            self.shm.apply_releases(ids)
            return True
        return got > 0

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.shm.close()


def _draining(event: tuple[Any, ...]) -> tuple[Any, ...]:
    if event[0] != "data":
        return event
    kind, inlet, peer, producer, seq, records, nbytes = event
    return (kind, inlet, peer, producer, seq, DrainingBatch(records), nbytes)


_LEAVES = frozenset({str, int, float, bool, type(None)})


def _worth_deep_scan(frame_bytes: int, records: int, threshold: int) -> bool:
    # Walking every record of every batch would cost small records dearly: only a frame that
    # is large for its record count can hide a nested payload above the threshold.
    return frame_bytes >= threshold and frame_bytes * 8 >= records * threshold


def _has_nested_bytes(records: list[Any], threshold: int) -> bool:
    """Whether a bytes-like of ``threshold`` bytes sits inside a container of a record, at
    most ``SCAN_DEPTH`` levels down (a record that is itself bytes, or a Packet whose payload
    is, is staged without this scan; such a Packet's payload counts as the record)."""
    # Level by level, each level a list the next one extends in C: a recursive walk with a
    # generator per container cost 3.4 us for a five-field record, more than encoding it.
    level: list[Any] = []
    for rec in records:
        for _ in range(SCAN_DEPTH):
            if rec.__class__ is not Packet:
                break
            rec = rec.payload
        cls = rec.__class__
        if cls is dict:
            level.extend(rec.values())
        elif cls is list or cls is tuple:
            level.extend(rec)
    for _ in range(SCAN_DEPTH):
        if not level:
            return False
        below: list[Any] = []
        for obj in level:
            cls = obj.__class__
            if cls in _LEAVES:
                continue
            if cls is dict:
                below.extend(obj.values())
            elif cls is list or cls is tuple:
                below.extend(obj)
            elif cls is bytes or cls is bytearray:
                if len(obj) >= threshold:
                    return True
            elif cls is memoryview:
                if obj.nbytes >= threshold:
                    return True
            elif cls is Packet:
                below.append(obj.payload)
        level = below
    return False


class ShmProducer(Producer):
    """A producer that can lend pool memory to fill in place (:meth:`alloc`)."""

    shm: ShmSender
    _link: ShmDealerLink

    def _snapshot(self, item: Any) -> Any:
        # A heavy producer batches large payloads, so it copies them at put time: the caller
        # may reuse its array or buffer as soon as put returns.
        return self.shm.snapshot(item, self._link.codec.inline_array)

    def ship_for_room(self) -> None:
        """Send the batched records now: the pool is full, and the slots of those records
        come back only once they are sent and consumed. Called by the pool's owner while a
        ``put`` or ``alloc`` of this producer holds its lock."""
        if self._pending:
            # A link that fails leaves the records queued; the next put or flush reports it.
            with contextlib.suppress(DeliveryError):
                self._flush_locked()

    def alloc(
        self,
        shape: int | Sequence[int],
        dtype: npt.DTypeLike = np.uint8,
        timeout: float | None = None,
    ) -> np.ndarray:
        """A writable array in shared memory: fill it, then ``put`` it with no copy.

        Falls back to an ordinary array (``put`` then copies) when the pool is disabled, the
        array is smaller than 1 byte or larger than the pool, or no room frees up within
        ``timeout`` seconds (default ``shm_wait``). Once put, the queue owns the memory.
        """
        if self._closed:
            raise QueueClosed(f"queue {self.queue_id!r} was closed in this process")
        with self._lock:
            self._note_caller_back()  # filling the buffer is the caller's work after that
            return self.shm.alloc(shape, dtype, timeout)

    def statistics(self) -> QueueStatistics:
        stats = super().statistics()
        return replace(stats, extra={**(stats.extra or {}), "shm": self.shm.statistics()})


# --------------------------------------------------------------------------------- consumer


class ShmInlet(RouterInlet):
    """A ROUTER that maps shared-memory references and sends RELEASE for dropped views."""

    SAME_HOST = True

    def __init__(
        self, endpoint: str, codec: Codec, opts: SocketOptions, *, queue_id: str = ""
    ) -> None:
        super().__init__(endpoint, codec, opts, queue_id=queue_id)
        self.shm = ShmReceiver(codec, zero_copy=codec.zero_copy)
        codec.shm_decoder = self.shm.decode

    @property
    def pending_work(self) -> bool:  # type: ignore[override]
        return bool(self.shm.unsent_releases)

    def credit_body(self, peer: Any, credit: Credit) -> dict[str, Any]:
        body = super().credit_body(peer, credit)
        ring = self.shm.ring_name(peer)
        if ring is not None:
            body["release_ring"] = ring  # until its producer reads it, releases go as frames
        return body

    def recv(self, timeout: float) -> list[tuple[Any, ...]]:
        shm = self.shm
        shm.look_for_gone()  # the background tick reads here too: an idle consumer looks
        if shm.unsent_releases:
            # The socket's owner is here: safe to send. Releases to a producer that reads our
            # ring go into it at once; the others go in batches (RELEASE_BATCH, or after
            # RELEASE_DELAY): one frame each way per payload would cost more than the copy
            # saves. A wait is cut short so that queued releases still leave on time.
            shm.flush(self.send_release, force=False)
            if timeout > 0:
                due = shm.due_in()
                if due is not None:
                    timeout = min(timeout, max(due, 0.0005))
        if timeout > LIVE_VIEW_WAKE and shm.cache.live_views:
            # A view another thread (or the GC) drops while this waits for data queues its
            # release here, and only this thread may send it: a producer short of room would
            # wait for the whole read, then send inline. Wake up to look while views live.
            timeout = LIVE_VIEW_WAKE
        views = shm.views
        events = RouterInlet.recv(self, timeout)
        if shm.views != views:
            # Records that hold views of slots: each slot is released when the application
            # drops its record, not after it took the whole batch (a pool of a few slots
            # would otherwise wait on a batch the application reads one record at a time).
            events = [_draining(event) for event in events]
        producers = shm.producers
        for event in events:
            peer = event[2]
            if peer not in producers:
                who = event[3]
                producer = who.get("producer") if isinstance(who, dict) else who
                if isinstance(producer, str):
                    producers[peer] = producer
        return events

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.shm.flush(self.send_release)  # give back what was dropped before closing
        try:
            super().close()
        finally:
            self.shm.close()
            # Segments of producers that were SIGKILLed: nobody else would remove them.
            for name in sweep_orphans():
                log.info("removed orphaned shared-memory segment %s", name)

    def statistics(self) -> dict[str, Any]:
        return self.shm.statistics()


# --------------------------------------------------------------------------------- the type


def _number(meta: dict[str, Any], key: str, default: float, *, integer: bool = False) -> float:
    value = meta.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value < 0:
        kind = "an integer" if integer else "a number"
        raise DescriptorError(f"metadata[{key!r}] must be {kind} >= 0, got {value!r}")
    return value


class ShmQueueType(SocketQueueType):
    name: ClassVar[str] = "shm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        cross_process=True, cross_host=False, zero_copy=True, shared_memory=True
    )
    metadata_keys: ClassVar[frozenset[str]] = SocketQueueType.metadata_keys | {
        "memory_pool_size",
        "shm_threshold",
        "shm_wait",
    }

    def validate(self, descriptor: QueueDescriptor) -> None:
        endpoint = descriptor.metadata.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith("ipc://"):
            raise DescriptorError(
                f"queue_type 'shm' needs an ipc:// endpoint, got {endpoint!r}; "
                "for tcp:// use queue_type='tcp'"
            )
        check_ipc_endpoint(endpoint)

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        meta = dict(descriptor.metadata)
        endpoint = meta.get("endpoint")
        if endpoint is None:
            meta["endpoint"] = derive_ipc_endpoint(descriptor.queue_id)
        elif not isinstance(endpoint, str) or not endpoint.startswith("ipc://"):
            raise DescriptorError(
                f"queue_type 'shm' needs an ipc:// endpoint, got {endpoint!r}; "
                "for tcp:// use queue_type='tcp'"
            )
        else:
            check_ipc_endpoint(endpoint)
        self._shm_settings(meta)  # fail at creation, not in the first put
        return meta

    def _shm_settings(self, meta: dict[str, Any]) -> tuple[int, int, float]:
        perf = current_config().performance
        threshold = int(_number(meta, "shm_threshold", perf.shm_threshold, integer=True))
        pool_mib = _number(meta, "memory_pool_size", perf.memory_pool_size)
        wait = float(_number(meta, "shm_wait", DEFAULT_SHM_WAIT))
        return threshold, int(pool_mib * (1 << 20)), wait

    def open_producer_link(self, descriptor: QueueDescriptor) -> ProducerLink:
        threshold, capacity, wait = self._shm_settings(descriptor.metadata)
        sender = ShmSender(
            threshold=threshold, capacity=capacity, wait=wait, queue_id=descriptor.queue_id
        )
        return ShmDealerLink(
            str(descriptor.metadata["endpoint"]),
            self.codec(descriptor),
            self.socket_options(descriptor),
            sender=sender,
            compress=self.compress(descriptor),
            queue_id=descriptor.queue_id,
        )

    def open_consumer_inlet(self, descriptor: QueueDescriptor) -> ConsumerInlet:
        return ShmInlet(
            self.bind_endpoint(descriptor),
            self.codec(descriptor),
            self.socket_options(descriptor),
            queue_id=descriptor.queue_id,
        )

    def make_producer(self, descriptor: QueueDescriptor) -> Any:
        if self.reliable(descriptor):
            # The reliable layer keeps frames to resend them; a slot cannot be kept that way.
            log.info(
                "queue %r: ack/persist keep frames for resending, so this shm queue sends "
                "large payloads inline, not through the shared-memory pool",
                descriptor.queue_id,
            )
            return super().make_producer(descriptor)
        link = self.open_producer_link(descriptor)
        assert isinstance(link, ShmDealerLink)
        producer = ShmProducer(link, **producer_options(descriptor))
        producer.shm = link.shm
        link.shm.ship_pending = producer.ship_for_room
        return producer
