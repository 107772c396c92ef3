"""Reliability as a layer over any DEALER/ROUTER queue: acks, retransmit, dedup, liveness, WAL.

:class:`ReliableProducer` and :class:`ReliableConsumer` subclass the core ends; the per-record
``put``/``get`` stay the core's (a reliable producer without persistence, or a reliable consumer
without persistence, adds nothing per record). Used by ``sage`` queues always, and by
``shm``/``tcp`` when ``metadata["ack"] is True`` or ``metadata["persist"]`` is set. The wire
contract is ``transports/PROTOCOL.md`` §5; the decisions:

**Producer.** Every DATA/END frame sent is kept (encoded) until a CREDIT's ``acked`` passes it;
credits bound them to about ``maxsize`` records. Retransmission (HELLO first, then the kept
frames, oldest first) happens when (a) the consumer ``session`` changes, (b) a CREDIT has
``limit == 0`` ("who are you?": the consumer restarted or missed HELLO), (c) the socket
reconnected (a ZeroMQ socket monitor reports it), (d) the peer was declared dead and the socket
was recreated, and (e) frames the consumer has not *received* saw no progress of ``received``
for ``ack_timeout`` (received, not acked: a slow consumer that holds frames is not a loss)
while the consumer answers (a silent one would only pile copies up in the socket queue).

**In-flight window.** A producer has at most ``reliability.max_in_flight`` frames sent whose
receipt the consumer has not yet reported. Beyond it, records ``put`` accepted (credit, about
``maxsize``, still decides that) wait in the producer until receipts free a slot, so the window
bounds what sits in socket queues and what one retransmission resends, never what ``put``
accepts; a consumer that is not reading still buffers up to ``maxsize``. The window applies
while a live consumer answers; before it first does, or while it is declared dead, frames go
out as credit allows (they are kept and retransmitted anyway).

**Acks are windowed and asynchronous.** The consumer reports ``acked`` in a CREDIT when it has
advanced by ``maxsize // 8`` records, at an end of stream, in reply to HELLO/HEARTBEAT/CLOSE,
every ``max_in_flight // 2`` DATA frames received (a receipt, so the producer's in-flight
window never runs dry), and from the timer thread within ``ack_timeout / 4`` otherwise. No
put or get ever waits for a round trip.

**Consumer.** Records from a producer are accepted strictly in sequence: a duplicate or the
duplicated head of a batch is dropped, a frame after a gap is dropped (it will be retransmitted).
DATA from a producer not introduced by HELLO in this consumer's lifetime is dropped and answered
with a ``limit == 0`` CREDIT, so a restarted consumer never guesses where a producer starts.

**When is a record consumed?** Without consumer persistence, when ``get`` returned it. With
``metadata["persist"] = DIR`` on the consumer, when the application calls ``get`` again after
receiving it (or closes the consumer cleanly); END counts when the end of stream was reached.
``acked`` in CREDITs reports exactly this (the timer thread reports a partly read batch). With
persistence, that moment is recorded in a
:class:`~sage_zmq.flow.dedup.DedupState` (an mmap'd file, so a SIGKILL right after it loses
nothing) before the next record is handed out, and a restarted consumer skips everything
recorded there: each record is returned by ``get`` exactly once across restarts, in order per
producer, except that the one record the application held when it died is returned again (it
was never consumed). ``acked`` never passes what was recorded. Without persistence a restarted
consumer gets again what it received but had not acked (at least once). The ends of stream a
persistent consumer counted are kept too (``<dedup file>.ends``, replaced whole at each end), so
an upstream that ended before a restart is not waited for; the file goes once the stream ended.

**Producer persistence** (``metadata["persist"] = DIR`` on the producer): ``put`` writes the
record to a :class:`~sage_zmq.flow.wal.WriteAheadLog` (one entry per record, a one-record DATA
frame) before it returns, so a record whose ``put`` returned survives a SIGKILL (and, with
``reliability.fsync = "batch"``, a machine crash, at one fsync per put; use ``"interval"`` for
throughput). A restarted producer with the same id reopens the log with ``epoch + 1``, replays
the unacked entries and numbers new records after the last logged seq. The id is
``metadata["producer_id"]``, else the first log under ``DIR/<queue>/wal/`` that no live
process holds (flock), else a new random one: with several producer processes per directory a
restarted process may take over another dead one's log, which still delivers it. A corrupt
log is reported (:class:`~sage_zmq.flow.wal.WalCorruptionError`), a torn tail is cut with a
warning and shown in ``statistics().extra["wal_corrupt_tail_bytes"]``.

**Close.** A reliable producer's ``close`` waits until the consumer *acked* (consumed)
everything, not just received it, since a consumer crash loses what it only buffered; when the
consumer is in the same process it waits for ``received`` (they die together). So with a
persistent consumer, a producer's ``close`` returns once the application asked for the record
after the last one (or reached the end of stream, or closed).

**Failover hooks** (for a router): :attr:`ReliableProducer.peer_alive` / ``dead``,
:attr:`ReliableProducer.dead_event` (a ``threading.Event`` set while the peer is dead),
:meth:`ReliableProducer.add_dead_callback` (called once per death, on the thread that noticed,
with the producer lock held: do not block), and :meth:`ReliableProducer.take_unacked`, which
returns every record this producer holds unacknowledged or unsent, decoded and in order (an END
as :class:`~sage_zmq.packet.EndOfStream`), forgets them (and truncates the WAL past them) and
tells the consumer to skip their seqs, so a router can send them to another instance. What a
dead instance had already received may then be delivered twice (at least once across
instances).

**Background timer.** The process's ticker thread (:func:`sage_zmq._runtime.ticker`, shared
with batching and consumer service) ticks each reliable end every
``min(heartbeat_interval, ack_timeout) / 4`` (5-250 ms). A tick takes the end's lock with
``acquire(blocking=False)`` and skips a busy end; a producer blocked in ``put``/``close`` does
the same work itself between polls (at least every 0.5 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from sage_zmq import _runtime
from sage_zmq.config import ReliabilityConfig, current_config
from sage_zmq.errors import (
    ConfigError,
    DecodeError,
    DeliveryError,
    DescriptorError,
    EncodeError,
)
from sage_zmq.flow.clock import Clock, SystemClock
from sage_zmq.flow.dedup import DedupState
from sage_zmq.flow.liveness import Action, PeerLiveness
from sage_zmq.flow.wal import (
    MAX_PRODUCER_ID_BYTES,
    PersistLockedError,
    WriteAheadLog,
    check_producer_id,
)
from sage_zmq.observe.logging import connection_event
from sage_zmq.packet import EndOfStream
from sage_zmq.queues._consumer import _END, Consumer, _Upstream
from sage_zmq.queues._producer import _HOST, Producer, refused, wrong_queue
from sage_zmq.queues._socket_type import RELIABILITY_TIMING_KEYS, wants_reliability
from sage_zmq.queues.base import (
    ConsumerInlet,
    Credit,
    QueueStatistics,
    check_timeout,
    consumer_options,
    producer_options,
)
from sage_zmq.wire.frame import Kind

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor
    from sage_zmq.queues._zmq import DealerLink

log = logging.getLogger("sage_zmq.reliable")

_TIMING_KEYS = RELIABILITY_TIMING_KEYS
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ReliabilitySettings:
    """``reliability.*`` from the config, overridden by same-named descriptor metadata."""

    timing: ReliabilityConfig = dataclasses.field(default_factory=ReliabilityConfig)
    persist: str | None = None
    producer_id: str | None = None

    @property
    def tick(self) -> float:
        """How often the timer thread looks at an end."""
        t = self.timing
        return min(0.25, max(0.005, min(t.heartbeat_interval, t.ack_timeout) / 4))

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ReliabilitySettings:
        base = current_config().reliability
        changes = {k: metadata[k] for k in _TIMING_KEYS if k in metadata}
        try:
            timing = dataclasses.replace(base, **changes) if changes else base
        except ConfigError as exc:
            raise DescriptorError(f"bad reliability option in queue metadata: {exc}") from None
        persist = metadata.get("persist")
        if persist is not None and (not isinstance(persist, str) or not persist):
            raise DescriptorError(
                f"metadata['persist'] must be a directory path (str), got {persist!r}"
            )
        pid = metadata.get("producer_id")
        if pid is not None:
            try:
                check_producer_id(pid)
            except ConfigError as exc:
                raise DescriptorError(f"metadata['producer_id']: {exc}") from None
        return cls(timing, persist, pid)


def _stem(queue_id: str) -> str:
    stem = _UNSAFE.sub("_", queue_id)[:48].lstrip(".") or "q"
    return f"{stem}-{hashlib.sha1(queue_id.encode()).hexdigest()[:8]}"


def persist_paths(persist: str, queue_id: str) -> tuple[str, str]:
    """``(wal_root, dedup_file)`` of a queue under a persistence directory."""
    base = os.path.join(persist, _stem(queue_id))
    return os.path.join(base, "wal"), os.path.join(base, "dedup")


# ------------------------------------------------------------------------------ producer
class _KeepingLink:
    """The producer's link: keeps what it sends for retransmission, over a replaceable socket."""

    def __init__(self, inner: DealerLink, first_hello_acked: int) -> None:
        self.inner = inner
        self.kept: deque[tuple[int, int, bytes]] = deque()  # (first seq, end seq, frame)
        self.wal: WriteAheadLog | None = None
        self.first_hello_acked: int | None = first_hello_acked
        self.sent_at: Callable[[int], None] = lambda seq: None
        self.monitor: zmq.Socket[Any] | None = None
        self.connections = 0
        self.moves_before = 0  # a ray link's moves to new consumers, on links replaced since
        self._inline(inner)
        self._watch()

    @property
    def endpoint(self) -> str:
        return str(getattr(self.inner, "endpoint", ""))

    @property
    def moves(self) -> int:
        """A ray link's moves to new consumers, over every inner link this one has had."""
        return self.moves_before + int(getattr(self.inner, "reconnects", 0))

    @property
    def codec(self) -> Any:
        """The inner link's codec: the producer asks it whether a record can be encoded."""
        return getattr(self.inner, "codec", None)

    @property
    def refused(self) -> str | None:
        """Why the consumer refuses this producer (it serves another queue), if it does."""
        return getattr(self.inner, "refused", None)

    @staticmethod
    def _inline(inner: Any) -> None:
        # Kept frames must stand alone: a shared-memory reference in one would point at a
        # slot the consumer released long before a retransmission.
        codec = inner.codec
        if getattr(codec, "shm_encoder", None) is not None:
            codec.shm_encoder = None
        keep_unsent = getattr(inner, "keep_unsent", None)  # a test double may lack it
        if keep_unsent is not None:
            keep_unsent()  # frames are kept here: a send never needs to block

    def _watch(self) -> None:
        self.connections = 0
        sock = getattr(self.inner, "sock", None)  # a test double may have no socket
        if sock is not None:
            self.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)

    def reconnected(self) -> bool:
        """True if the socket connected again since the last look (not its first connect)."""
        mon = self.monitor
        again = False
        while mon is not None:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connections += 1
                again = again or self.connections > 1
        return again

    def replace(self, inner: DealerLink) -> None:
        self._unwatch()
        sock = getattr(self.inner, "sock", None)
        if sock is not None:
            sock.setsockopt(zmq.LINGER, 0)  # stale frames are retransmitted anyway
        self.inner.close()
        self.moves_before += int(getattr(self.inner, "reconnects", 0))  # counts from 0 anew
        self.inner = inner
        self._inline(inner)
        self._watch()

    def _unwatch(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.inner.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None

    def send_hello(self, producer: str, epoch: int, next_seq: int, acked: int) -> None:
        if self.first_hello_acked is not None:  # the core's HELLO in Producer.__init__
            acked, self.first_hello_acked = self.first_hello_acked, None
        self.inner.send_hello(producer, epoch, next_seq, acked)

    def send_batch(self, producer: str, seq: int, records: list[Any]) -> tuple[int, int, list[str]]:
        inner = self.inner
        frame, sent, errors = inner.codec.encode_batch(
            producer, seq, records, compress=inner.compress
        )
        if len(sent) > 1 and len(frame) > inner.codec.limits.max_frame_bytes:
            # Over what the consumer accepts: halves, each with its own consecutive seqs.
            half = len(sent) // 2
            n1, b1, e1 = self.send_batch(producer, seq, sent[:half])
            n2, b2, e2 = self.send_batch(producer, seq + n1, sent[half:])
            return n1 + n2, b1 + b2, errors + e1 + e2
        if not sent:
            return 0, 0, errors
        self.sent_at(seq)
        self.kept.append((seq, seq + len(sent), frame))
        inner.send_frame(frame)
        return len(sent), len(frame), errors

    def send_end(self, producer: str, seq: int) -> None:
        frame = self.inner.codec.encode_control(Kind.END, [producer, seq])
        if self.wal is not None:
            self.wal.append(seq, 1, frame)
        self.sent_at(seq)
        self.kept.append((seq, seq + 1, frame))
        self.inner.send_frame(frame)

    def send_close(self, producer: str, seq: int) -> None:
        self.inner.send_close(producer, seq)

    def send_heartbeat(self, producer: str) -> None:
        self.inner.send_heartbeat(producer)

    def poll(self, timeout: float) -> list[Credit]:
        return self.inner.poll(timeout)

    def close(self) -> None:
        self._unwatch()
        self.inner.close()


class _LoggedPending(list[Any]):
    """The pending list of a persistent producer: appending logs the record first."""

    def __init__(self, log_put: Callable[[Any, int], None]) -> None:
        super().__init__()
        self._log_put = log_put

    def append(self, item: Any) -> None:
        self._log_put(item, len(self))
        super().append(item)


def open_wal(settings: ReliabilitySettings, queue_id: str) -> WriteAheadLog:
    """The producer's write-ahead log: its own id, or a free existing log, or a new one."""
    assert settings.persist is not None
    root, _ = persist_paths(settings.persist, queue_id)
    t = settings.timing
    opts: dict[str, Any] = {"fsync": t.fsync, "fsync_interval": t.fsync_interval}
    if settings.producer_id is not None:
        return WriteAheadLog(root, producer_id=settings.producer_id, **opts)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if not os.path.isdir(os.path.join(root, name)):
                continue
            try:
                check_producer_id(name)
                return WriteAheadLog(root, producer_id=name, **opts)
            except (PersistLockedError, ConfigError):
                continue
    return WriteAheadLog(root, producer_id=f"{_HOST}-{os.urandom(6).hex()}", **opts)


class ReliableProducer(Producer):
    """A producer that keeps, retransmits and (optionally) logs what it sends; see module doc."""

    def __init__(
        self,
        open_link: Callable[[], DealerLink],
        *,
        queue_id: str,
        queue_type: str,
        window: int,
        batch_size: int,
        flush_interval: float,
        timeout: float,
        settings: ReliabilitySettings,
        clock: Clock | None = None,
    ) -> None:
        self._settings = settings
        self._clock: Clock = clock if clock is not None else SystemClock()
        timing = settings.timing
        self._tick_interval = settings.tick
        self._max_in_flight = timing.max_in_flight
        self._ack_timeout = timing.ack_timeout
        self._live = PeerLiveness(
            self._clock,
            interval=timing.heartbeat_interval,
            liveness=timing.liveness,
            reconnect_initial=timing.reconnect_initial,
            reconnect_max=timing.reconnect_max,
        )
        self._open_link = open_link
        self._dead_callbacks: list[Callable[[ReliableProducer], None]] = []
        self.dead_event = threading.Event()
        self._retransmits = 0
        self._reconnects = 0
        self._closing = False
        self._next_maint = 0.0
        self._progress_at = self._clock.monotonic()
        # PROTOCOL §5 (e): an ack-timeout resend needs the consumer heard since the last one,
        # and hearing nothing since the start is not hearing it (that is liveness's case).
        self._resent_at = self._live.last_heard
        self._prompt_at = -1e9
        wal: WriteAheadLog | None = None
        producer_id = settings.producer_id
        epoch = next_seq = acked = 0
        replay: list[tuple[int, int, bytes]] = []
        if settings.persist is not None:
            wal = open_wal(settings, queue_id)
            try:
                producer_id, epoch, next_seq, acked = (
                    wal.producer_id,
                    wal.epoch,
                    wal.next_seq,
                    wal.acked,
                )
                replay = list(wal.replay())
            except BaseException:
                wal.close()
                raise
            # What a damaged log's recovery did was logged by the log itself, precisely
            # (a torn write vs damage after writing, and which seqs): see corruption_report.
        self._wal = wal
        self._wal_warned_at = -1e9  # last warning that the ack watermark could not be saved
        try:
            link = _KeepingLink(open_link(), acked)
        except BaseException:
            if wal is not None:
                wal.close()
            raise
        link.wal = wal
        link.sent_at = self._sent_at
        link.kept.extend((first, first + count, frame) for first, count, frame in replay)
        self._keeping = link
        super().__init__(
            link,
            queue_id=queue_id,
            queue_type=queue_type,
            window=window,
            batch_size=batch_size,
            flush_interval=flush_interval,
            timeout=timeout,
            producer_id=producer_id,
            epoch=epoch,
            next_seq=next_seq,
        )
        self._acked = self._received = acked
        self._limit = max(next_seq, acked + window)
        if wal is not None:
            self._pending = _LoggedPending(self._log_put)
        self._update_room()
        if link.kept:
            log.info("queue %s: replaying %d logged frames", queue_id, len(link.kept))
            self._resend(acked, "replay", hello=False)
        _runtime.ticker().add(self, self._tick_interval)

    # ----------------------------------------------------------------- persistence
    def _log_put(self, item: Any, index: int) -> None:
        assert self._wal is not None
        self._note_caller_back()  # the log write below is this put's work, not a pause
        seq = self._next_seq + index
        inner = self._keeping.inner
        frame, _sent, errors = inner.codec.encode_batch(self.producer_id, seq, [item])
        if errors:
            raise refused(self.queue_id, errors[0])
        self._wal.append(seq, 1, frame)

    def _update_room(self) -> None:
        super()._update_room()
        if self._wal is not None:
            self._fast_limit = 0  # every put goes through the log before it returns

    def _ship_alone(self, item: Any) -> bool:
        return False  # every send goes through the in-flight window (and the log, if any)

    def _window_limit(self) -> int:
        """The seq ``reliability.max_in_flight`` lets the producer send up to."""
        if self._session is None or not self._live.alive:
            return self._limit  # no consumer reporting receipts: only credit applies
        cap, received, n = self._max_in_flight, self._received, 0
        for _first, end, _frame in reversed(self._keeping.kept):
            if end <= received or n >= cap:
                break
            n += 1
        return self._next_seq + (cap - n) * self._batch_size

    def _flush_locked(self) -> None:
        # The base loop sends full batches while the limit allows, so a limit of `free` whole
        # batches past next_seq sends at most `free` frames.
        limit = self._limit
        capped = min(limit, self._window_limit())
        self._limit = capped
        try:
            super()._flush_locked()
        finally:
            if self._limit == capped:  # else a credit moved it during the flush: keep that
                self._limit = limit
        self._update_room()
        pending = len(self._pending)
        if capped < limit and pending and self._wal is None and self._room > 0:
            # The in-flight window, not credit, held records back: look again after one more
            # batch of puts rather than on every put (each look reads the socket).
            self._fast_limit = pending + min(self._room, self._batch_size)

    # ----------------------------------------------------------------- credits
    def _sent_at(self, seq: int) -> None:
        if seq <= self._received:  # nothing older is outstanding: the ack clock starts now
            self._progress_at = self._clock.monotonic()

    def _apply(self, credits: list[Credit]) -> None:
        if credits:
            self._live.heard()
            for credit in credits:
                if credit.limit == 0:
                    self._on_prompt(credit)
                    continue
                if credit.session != self._session:
                    old, self._session = self._session, credit.session
                    self._limit = credit.limit
                    self._received = credit.received
                    if credit.acked > self._acked:
                        self._acked = credit.acked
                    if old is not None and self._prompt_session != credit.session:
                        log.info(
                            "queue %s: consumer session changed %s -> %s",
                            self.queue_id,
                            old,
                            credit.session,
                        )
                        self._resend(self._acked, "consumer restarted")
                    continue
                if credit.limit > self._limit:
                    self._limit = credit.limit
                if credit.received > self._received:
                    self._received = credit.received
                    self._progress_at = self._clock.monotonic()
                if credit.acked > self._acked:
                    self._acked = credit.acked
            self._forget_acked()
        self._maybe_maintain()

    _prompt_session: str | None = None

    def _on_prompt(self, credit: Credit) -> None:
        """The consumer does not know us: introduce ourselves and send everything again."""
        now = self._clock.monotonic()
        if credit.session == self._prompt_session and now - self._prompt_at < min(
            self._ack_timeout, 0.25
        ):
            return
        self._prompt_session, self._prompt_at = credit.session, now
        self._session = credit.session
        self._received = self._acked
        self._resend(self._acked, "consumer does not know this producer")

    def _forget_acked(self) -> None:
        acked = self._acked
        kept = self._keeping.kept
        while kept and kept[0][1] <= acked:
            kept.popleft()
        wal = self._wal
        if wal is not None and acked > wal.acked:
            try:
                wal.truncate(min(acked, wal.next_seq))
            except OSError as exc:
                # Saving the ack watermark failed (a full disk): the records are accepted and
                # logged already, so the put or tick that read this ack must not fail. A stale
                # watermark only replays acked entries (the consumer drops them); the next ack
                # saves it again.
                now = time.monotonic()
                if now - self._wal_warned_at >= 10.0:
                    self._wal_warned_at = now
                    log.warning(
                        "queue %s: could not save the write-ahead log's ack watermark: %s",
                        self.queue_id,
                        exc,
                    )

    # ----------------------------------------------------------------- retransmission
    def _send_hello(self) -> None:
        self._keeping.send_hello(self.producer_id, self.epoch, self._next_seq, self._acked)

    def _resend(self, start: int, why: str, *, hello: bool = True) -> None:
        link = self._keeping
        if hello:
            self._send_hello()
        n = 0
        for _first, end, frame in link.kept:
            if end > start:
                link.inner.send_frame(frame)
                n += 1
        if self._closing:
            link.send_close(self.producer_id, self._next_seq)
        self._retransmits += n
        self._progress_at = self._resent_at = self._clock.monotonic()
        if n:
            log.info("queue %s: retransmitted %d frames (%s)", self.queue_id, n, why)

    def _maybe_maintain(self) -> None:
        now = self._clock.monotonic()
        if now >= self._next_maint:
            self._maintain(now)
            # At the next tick, or earlier when a deadline falls before it.
            due = min(now + self._tick_interval, self._live.next_due())
            kept = self._keeping.kept
            if kept and kept[-1][1] > self._received:
                due = min(due, self._progress_at + self._ack_timeout)
            self._next_maint = due

    def _maintain(self, now: float) -> None:
        link = self._keeping
        if link.reconnected():
            self._resend(self._acked, "reconnected")
        action = self._live.check()
        if action & Action.REVIVED:
            self.dead_event.clear()
            connection_event(
                "peer_alive", queue=self.queue_id, peer=link.endpoint, detail="consumer heard again"
            )
        if action & Action.DEAD:
            self._declare_dead()
        if action & Action.RECONNECT:
            self._reconnect()
        if action & Action.HEARTBEAT:
            link.send_heartbeat(self.producer_id)
        kept = link.kept
        if (
            kept
            and kept[-1][1] > self._received
            and now - self._progress_at >= self._ack_timeout
            and self._live.last_heard > self._resent_at  # else copies would pile up unsent
        ):
            self._resend(self._received, "ack timeout")
        wal = self._wal
        if wal is not None and self._settings.timing.fsync == "interval":
            wal.sync()

    def _declare_dead(self) -> None:
        connection_event(
            "peer_dead",
            queue=self.queue_id,
            peer=self._keeping.endpoint,
            detail=f"consumer declared dead (nothing heard for {self._live.timeout:.3g} s)",
        )
        self.dead_event.set()
        for callback in list(self._dead_callbacks):
            try:
                callback(self)
            except Exception as exc:
                log.warning("queue %s: dead-consumer callback failed: %s", self.queue_id, exc)

    def _reconnect(self) -> None:
        self._reconnects += 1
        connection_event(
            "reconnect",
            queue=self.queue_id,
            peer=self._keeping.endpoint,
            detail=f"attempt {self._live.backoff.attempts}",
            attempt=self._live.backoff.attempts,
        )
        self._keeping.replace(self._open_link())
        self._resend(self._acked, "reconnect")

    def tick(self, now: float) -> float | None:
        """Timer thread: flush, poll, heartbeat, retransmit, sync, unless the producer is busy."""
        if self._closed:
            return None
        flush_delay = super().tick(now)
        self._hear_reports()  # self._keeping is this producer's link
        if flush_delay is None:
            return self._tick_interval
        return min(flush_delay, self._tick_interval)

    # ----------------------------------------------------------------- failover hooks
    @property
    def peer_alive(self) -> bool:
        """False once the consumer was silent for ``heartbeat_interval * liveness``."""
        return self._live.alive

    @property
    def dead(self) -> bool:
        return not self._live.alive

    @property
    def reconnect_attempts(self) -> int:
        """Connections recreated since the consumer was declared dead (0 while alive)."""
        return self._live.backoff.attempts - (0 if self._live.alive else 1)

    def add_dead_callback(self, callback: Callable[[ReliableProducer], None]) -> None:
        """Call ``callback(producer)`` each time the consumer is declared dead."""
        self._dead_callbacks.append(callback)

    def take_unacked(self) -> list[Any]:
        """Hand over every record held unacknowledged or unsent, decoded, in order.

        The producer forgets them, truncates its log past them, drops its socket (and with it
        frames still queued there) and tells the consumer on a new one (HELLO) that their seqs
        are skipped. An END comes back as ``EndOfStream()``.
        """
        with self._lock:
            codec = self._keeping.inner.codec
            records: list[Any] = []
            for first, _end, frame in self._keeping.kept:
                try:
                    msg = codec.decode(frame)
                except DecodeError as exc:  # our own frame: cannot happen unless memory broke
                    raise DeliveryError(
                        f"queue {self.queue_id!r}: kept frame unreadable: {exc}"
                    ) from exc
                if msg.kind is Kind.END:
                    records.append(EndOfStream())
                else:
                    records.extend(msg.fields[2][max(0, self._acked - first) :])
            records.extend(self._pending)
            self._next_seq += len(self._pending)
            self._pending.clear()
            self._keeping.kept.clear()
            self._acked = self._received = self._next_seq
            self._limit = max(self._limit, self._next_seq)
            if self._wal is not None:
                self._wal.truncate(min(self._next_seq, self._wal.next_seq))
            # A new socket drops what still waits in the old one's queue.
            self._keeping.replace(self._open_link())
            self._send_hello()
            self._update_room()
            return records

    # ----------------------------------------------------------------- lifecycle
    def close(self, timeout: float | None = None) -> None:
        """Ship everything, wait until the consumer acked it (see the module docstring)."""
        if self._closed:
            return
        timeout = self._timeout if timeout is None else check_timeout(timeout, "close")
        self._close_requested = True  # a put blocked for room gives up (see Producer)
        with self._lock:
            if self._closed:
                return
            self._leave_runtime()
            deadline = time.monotonic() + timeout
            try:
                self._drain(timeout)
                unsent = len(self._pending)
                target = self._next_seq
                self._closing = True
                self._keeping.send_close(self.producer_id, target)
                local = self.assist is not None
                self._hear_local_consumer()
                if (self._received if local else self._acked) < target:
                    self._apply(self._keeping.poll(0))  # reports that came meanwhile
                while (self._received if local else self._acked) < target:
                    wait = deadline - time.monotonic()
                    if wait <= 0 or self._keeping.refused:
                        break
                    if local:
                        wait = min(wait, 0.01)
                    self._apply(self._keeping.poll(min(wait, self._tick_interval)))
                    self._hear_local_consumer()
                done = self._received if local else self._acked
                undelivered = unsent + max(0, target - done)
                refused = self._keeping.refused
            finally:
                self._closed = True
                self._update_room()
                self._leave_runtime()
                self._keeping.close()
                if self._wal is not None:
                    self._wal.close()
            errors, self._errors = self._errors, []
        if undelivered:
            kept = " (they stay in the write-ahead log for the next run)" if self._wal else ""
            if refused:
                raise wrong_queue(self.queue_id, undelivered, self._keeping.endpoint, refused, kept)
            what = self._unconfirmed(undelivered, done)
            raise DeliveryError(
                f"queue {self.queue_id!r}: {what} not confirmed as consumed within {timeout} s"
                f"{kept} (is the consumer running and reading?)",
                undelivered,
            )
        if errors:
            raise EncodeError(
                f"queue {self.queue_id!r}: record dropped: {errors[0]}",
                records_dropped=len(errors),
            )

    def statistics(self) -> QueueStatistics:
        stats = super().statistics()
        kept = self._keeping.kept
        extra: dict[str, Any] = {
            **(stats.extra or {}),
            "producer_id": self.producer_id,
            "epoch": self.epoch,
            "session": self._session,
            "kept_frames": len(kept),
            "kept_records": kept[-1][1] - kept[0][0] if kept else 0,
            "peer_alive": self._live.alive,
            # Its own reconnects to a consumer declared dead, and a ray link's moves to a
            # restarted or new consumer.
            "reconnects": self._reconnects + self._keeping.moves,
        }
        if self._wal is not None:
            extra["wal_corrupt_tail_bytes"] = self._wal.corrupt_tail_bytes
            extra["wal_path"] = self._wal.path
        return dataclasses.replace(stats, retransmits=self._retransmits, extra=extra)


# ------------------------------------------------------------------------------ consumer
class _RUpstream(_Upstream):
    __slots__ = ("epoch", "frames", "last_end", "persist")

    def __init__(self, producer: str, inlet: ConsumerInlet, peer: Any, base: int) -> None:
        super().__init__(producer, inlet, peer, base)
        self.epoch = 0
        self.last_end = -1  # the seq of the last END counted
        self.persist = False
        self.frames = 0  # DATA frames received since the last report


class _Marked(list[Any]):
    """A batch whose iterator records each record as consumed when the next is asked for."""

    __slots__ = ("consumer", "producer", "seq")
    consumer: ReliableConsumer
    producer: str
    seq: int

    def __iter__(self) -> Iterator[Any]:
        return _MarkedIterator(self)


class _MarkedIterator:
    """Hands out a :class:`_Marked` batch; a record is marked consumed when the next is asked
    for. Not a generator: ``length_hint`` (the records not yet handed out) must be right, for
    ``qsize``, for what ``close`` counts as unread, and so that a batch is not retired while
    records of it are still to come."""

    __slots__ = ("_batch", "_consumer", "_i", "_mark", "_pending", "_producer", "_seq")

    def __init__(self, batch: _Marked) -> None:
        consumer = batch.consumer
        assert consumer._dedup is not None
        self._batch = batch
        self._consumer = consumer
        self._mark = consumer._dedup.mark
        self._producer = batch.producer
        self._seq = batch.seq
        self._i = 0
        self._pending = False  # a record was handed out and not yet marked

    def __iter__(self) -> _MarkedIterator:
        return self

    def __next__(self) -> Any:
        if self._pending:
            self._pending = False
            self._mark(self._producer, self._seq)  # asked for the next: the last is consumed
            self._seq += 1
        batch = self._batch
        if self._i >= len(batch):
            self._consumer._held = None
            raise StopIteration
        record = list.__getitem__(batch, self._i)
        self._i += 1
        self._consumer._held = (self._producer, self._seq)
        self._pending = True
        return record

    def __length_hint__(self) -> int:
        return len(self._batch) - self._i


class ReliableConsumer(Consumer):
    """A consumer that accepts in sequence only, reports acks, and (optionally) persists dedup."""

    def __init__(
        self,
        inlets: list[ConsumerInlet],
        *,
        queue_id: str,
        queue_type: str,
        maxsize: int,
        upstreams: int = 1,
        settings: ReliabilitySettings,
    ) -> None:
        super().__init__(
            inlets, queue_id=queue_id, queue_type=queue_type, maxsize=maxsize, upstreams=upstreams
        )
        self._settings = settings
        self._ack_step = max(1, maxsize // 8)
        # Report receipts before a producer's in-flight window fills, so it never stalls.
        self._receipt_frames = max(1, settings.timing.max_in_flight // 2)
        self._report_after = settings.timing.ack_timeout / 4
        self._prompted: dict[str, float] = {}
        self._held: tuple[str, int] | None = None
        self._dedup: DedupState | None = None
        self._ends_path: str | None = None
        if settings.persist is not None:
            try:
                _, path = persist_paths(settings.persist, queue_id)
                self._dedup = DedupState(path)
                # Beside the dedup state: the ends of stream it counted. A producer that
                # ended (and closed) before this consumer restarted never sends its end again.
                self._ends_path = path + ".ends"
                self._ends_counted |= _load_ends(self._ends_path)
                self._ended = len(self._ends_counted)
            except BaseException:
                # A damaged state file, say: the inlets bound for us must not outlive us.
                _runtime.ticker().discard(self)
                self._closed = True
                for inlet in self._inlets:
                    inlet.close()
                raise
        _runtime.ticker().add(self, settings.tick)

    def _note_ends(self, inlet: ConsumerInlet) -> None:
        super()._note_ends(inlet)
        if self._ends_path is not None:
            tmp = f"{self._ends_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(sorted(self._ends_counted), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._ends_path)  # whole or not at all, whenever the kill comes

    # ----------------------------------------------------------------- intake
    def _prompt(self, inlet: ConsumerInlet, peer: Any, producer: str) -> None:
        now = time.monotonic()
        if now - self._prompted.get(producer, -1e9) < 0.02:
            return
        if len(self._prompted) > 4096:
            self._prompted.clear()
        self._prompted[producer] = now
        inlet.send_credit(peer, Credit(self.session, 0, 0, 0))

    def _on_event(self, event: tuple[Any, ...]) -> None:
        what = event[0]
        if what == "data":
            _, inlet, peer, producer, seq, records, nbytes = event
            up = self._ups.get(producer)
            if up is None:
                self._prompt(inlet, peer, producer)
                return
            if not self._claim(up, inlet, peer):
                return
            self._on_data(up, seq, records, nbytes)
            up.frames += 1  # type: ignore[attr-defined]
            if up.frames >= self._receipt_frames:  # type: ignore[attr-defined]
                self._grant(up)
        elif what == "hello":
            _, inlet, peer, fields = event
            self._on_hello(inlet, peer, fields)
        elif what in ("end", "close", "heartbeat"):
            inlet, peer, producer = event[1], event[2], event[3]
            up = self._ups.get(producer)
            if up is None:
                self._prompt(inlet, peer, producer)
                return
            if not self._claim(up, inlet, peer):
                return
            if what == "end":
                self._on_end(up, event[4])
            elif what == "close":
                up.closing = True
            self._grant(up)  # a receipt, an answer to a heartbeat, or the END's receipt
        else:
            super()._on_event(event)

    def _on_data(self, up: Any, seq: int, records: list[Any], nbytes: int) -> None:
        end = seq + len(records)
        received = up.received
        if end <= received:
            self._duplicates += len(records)
            return
        if seq > received:
            self._gaps += 1  # a lost frame before this one: wait for the retransmission
            return
        if seq < received:
            self._duplicates += received - seq
            records = records[received - seq :]
        up.received = end
        if self._ended >= self._upstreams:
            self._arrived_after_end(up, end, records)
            return
        if up.persist:
            batch = _Marked(records)
            batch.consumer, batch.producer, batch.seq = self, up.producer, received
            records = batch
        self._batches.append((up, end, records))
        self._queued += len(records)
        self._received += len(records)
        self._bytes += nbytes
        self._batches_in += 1

    def _on_hello(self, inlet: ConsumerInlet, peer: Any, fields: dict[str, Any]) -> None:
        producer = fields["producer"]
        acked = fields.get("acked", fields["next_seq"])
        up = self._ups.get(producer)
        if up is None:
            if not self._admit(inlet, peer):
                return
            base = acked
            persist = self._dedup is not None
            if persist and len(producer.encode()) > MAX_PRODUCER_ID_BYTES:
                log.warning(
                    "queue %s: producer id %r is too long to persist its dedup state",
                    self.queue_id,
                    producer[:40],
                )
                persist = False
            if persist:
                assert self._dedup is not None
                last = self._dedup.last(producer)
                if last is not None:
                    base = max(base, last + 1)
            up = _RUpstream(producer, inlet, peer, base)
            up.persist = persist
            self._ups[producer] = up
        else:
            if not self._claim(up, inlet, peer):
                return
            if acked > up.received:
                up.received = acked  # the producer gave these seqs up (take_unacked)
        up.closing = False
        up.epoch = int(fields.get("epoch", 0))  # type: ignore[attr-defined]
        self._prompted.pop(producer, None)
        self._grant(up)

    def _on_end(self, up: Any, seq: int) -> None:
        if seq > up.received:
            self._gaps += 1
            return
        if seq == up.received:
            up.received = seq + 1
        elif not up.base > seq > up.last_end:
            return  # a duplicate; but an END that a previous life consumed still counts here
        up.last_end = seq
        self._batches.append((up, up.received, _END))

    # ----------------------------------------------------------------- acks
    def _grant(self, up: _Upstream) -> None:
        super()._grant(up)
        up.frames = 0  # type: ignore[attr-defined]

    def _retire_current(self) -> None:
        up: Any = self._cur_upstream
        super()._retire_current()
        # Every ack_step records; a consumer that caught up is reported by the timer thread
        # (within ack_timeout / 4) or by the next HELLO/HEARTBEAT/CLOSE: the consumer reads one
        # frame ahead, so "nothing queued" is true at almost every batch and would cost a
        # CREDIT per DATA frame.
        if up is not None and up.acked - up.reported >= self._ack_step:
            self._grant(up)

    def _get_slow(self, block: bool, timeout: float | None) -> Any:
        ended = self._ended
        try:
            return super()._get_slow(block, timeout)
        finally:
            if self._ended != ended:
                with self._lock:  # the timer thread sends on the same socket
                    self._report_ends()

    def _report_ends(self) -> None:
        dedup = self._dedup
        for up in self._ups.values():
            if up.ended and up.acked > up.reported:
                if dedup is not None and up.persist and not dedup.closed:  # type: ignore
                    dedup.mark(up.producer, up.acked - 1)
                self._grant(up)

    UNREAD_AT_CLOSE = (
        logging.INFO,
        "not acknowledged: their producers send them again to the next consumer",
    )

    def _retire_taken(self) -> bool:
        up: Any = self._cur_upstream
        if up is None or not up.persist:
            return super()._retire_taken()
        # The record in hand is not consumed until the next is asked for: count what was,
        # and leave retiring the batch to get().
        before = up.acked
        self._ack_partial()
        if up.acked > before:
            self._unreported.add(up)
        if self._unreported:
            self._report_consumed(time.monotonic())
            return True
        return False

    def _ack_partial(self) -> None:
        """Count what the application consumed of the batch it is reading (see module doc)."""
        up: Any = self._cur_upstream
        if up is None or not up.persist:
            super()._ack_partial()
            return
        # The record in hand is not consumed yet: count up to it.
        held = self._held
        done = held[1] if held is not None and held[0] == up.producer else self._cur_end
        if done > up.acked:
            up.acked = done

    def tick(self, now: float) -> float | None:
        """Timer thread: read (answering heartbeats) and report acks nobody reported yet."""
        if self._closed:
            return None
        busy = not self._waiting  # a get waiting for input holds the lock: idle all the same
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    busy = self._read_arrived(self.ASSIST_MESSAGES) > 0
                    self._ack_partial()
                    for up in list(self._ups.values()):
                        if up.acked > up.reported:
                            busy = True
                            if now - up.reported_at >= self._report_after:
                                self._grant(up)
                    self._look_for_gone_producers(now)
                    busy = busy or any(getattr(i, "pending_work", False) for i in self._inlets)
            finally:
                self._lock.release()
        pace = min(self.SERVICE_INTERVAL, self._settings.tick)
        if busy:
            self._idle_ticks = 0
            return pace
        # Idle: back off as a plain consumer does, but never past the reliability tick
        # (heartbeats must be answered well within their interval).
        self._idle_ticks += 1
        slowest = min(self.IDLE_INTERVAL, max(pace, self._settings.tick))
        return min(pace * (1 << min(self._idle_ticks, 5)), slowest)

    # ----------------------------------------------------------------- lifecycle
    def close(self, timeout: float | None = None) -> None:
        self._close_requested = True  # a get blocked in its read gives up (see Consumer)
        with self._lock:
            if self._closed:
                return
            dedup = self._dedup
            if dedup is not None and self._held is not None:
                dedup.mark(*self._held)  # closing counts as asking for the next record
                self._held = (self._held[0], self._held[1] + 1)
            self._ack_partial()
            for up in self._ups.values():
                if up.acked > up.reported:
                    self._grant(up)  # closing producers may be waiting for this
            super().close(timeout)
            if dedup is not None:
                dedup.close()
            if self._ends_path is not None and self._ended >= self._upstreams:
                # The stream ended: a consumer of the next run starts counting afresh.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._ends_path)

    def statistics(self) -> QueueStatistics:
        stats = super().statistics()
        extra = dict(stats.extra or {})
        extra["persistent"] = self._dedup is not None
        return dataclasses.replace(stats, extra=extra)


def _load_ends(path: str) -> set[tuple[str, int]]:
    try:
        with open(path) as f:
            return {(str(p), int(seq)) for p, seq in json.load(f)}
    except FileNotFoundError:
        return set()
    except (ValueError, TypeError) as exc:
        log.warning("ends of stream counted before could not be read from %s: %s", path, exc)
        return set()


# ------------------------------------------------------------------------------ factories
def make_reliable_producer(qtype: Any, descriptor: QueueDescriptor) -> ReliableProducer:
    """The reliable producing end of a socket queue type (see ``SocketQueueType``)."""
    return ReliableProducer(
        lambda: qtype.open_producer_link(descriptor),
        **producer_options(descriptor),
        settings=ReliabilitySettings.from_metadata(descriptor.metadata),
    )


def make_reliable_consumer(qtype: Any, descriptor: QueueDescriptor) -> ReliableConsumer:
    return ReliableConsumer(
        [qtype.open_consumer_inlet(descriptor)],
        **consumer_options(descriptor),
        settings=ReliabilitySettings.from_metadata(descriptor.metadata),
    )


__all__ = [
    "ReliabilitySettings",
    "ReliableConsumer",
    "ReliableProducer",
    "make_reliable_consumer",
    "make_reliable_producer",
    "open_wal",
    "persist_paths",
    "wants_reliability",
]
