"""The producing end of any queue: batching, credits, end of stream, the close handshake.

The per-record path (``put``) is three cheap steps: check room, append, maybe flush. Records
wait in ``_pending`` (a list: appends are atomic, so threads may append without a lock; a flush
takes from the front by slice, never by swapping the list out) until a flush ships them as
one batch. ``_flush_at`` adapts: 1 while the caller is slow to come back (an idle queue adds no
latency); once it comes back within ``BUSY_GAP`` of the previous flush, up to ``batch_size``
records or about ``FLUSH_BYTES`` of payload (so large records batch too, a few at a time). The
process-wide ticker thread ships a busy producer's partial batch if it has not moved for a tick
(``flush_interval``).

Room is credit: the consumer grants a cumulative limit on sequence numbers, so a producer is
never more than its window (``maxsize``) ahead of what the consumer has consumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from sage_zmq import _runtime
from sage_zmq.errors import DeliveryError, EncodeError, Full, QueueClosed
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.queues.base import Credit, ProducerLink, QueueStatistics, check_timeout

log = logging.getLogger("sage_zmq.queue")

BUSY_GAP = 20e-6
"""A put this soon after the previous flush ended switches a producer to batching."""
FLUSH_BYTES = 16 << 20
"""About how many bytes (frames and shared-memory payloads) a busy producer ships per flush."""

_HOST = socket.gethostname()[:40]

# Record classes put appends without a look (a batch encodes them; what they hold is checked
# then). Any other class is encoded once at its put, so that a record msgpack cannot carry is
# refused at that put even in a burst. numpy's ndarray joins once seen (numpy loads lazily).
_PLAIN_TYPES: set[type] = {
    dict,
    list,
    tuple,
    str,
    bytes,
    bytearray,
    memoryview,
    int,
    float,
    bool,
    type(None),
    Packet,
}
_PLAIN_BASES = (dict, list, tuple, str, bytes, int, float)


def new_producer_id() -> str:
    return f"{_HOST}:{os.getpid()}:{os.urandom(4).hex()}"


def refused(queue_id: str, why: str) -> EncodeError:
    """The EncodeError of a record ``put`` did not accept (nothing of it was queued)."""
    return EncodeError(f"queue {queue_id!r}: record refused: {why}", records_dropped=1)


def wrong_queue(
    queue_id: str, undelivered: int, endpoint: str, why: str, note: str = ""
) -> DeliveryError:
    """The DeliveryError of a close whose consumer refused it: it serves another queue."""
    return DeliveryError(
        f"queue {queue_id!r}: {undelivered} records put were refused by the consumer at "
        f"{endpoint}, which serves another queue ({why}){note}; is the endpoint stale?",
        undelivered,
    )


class Producer:
    """One producer per queue per process; threads may share it (FIFO per thread)."""

    def __init__(
        self,
        link: ProducerLink,
        *,
        queue_id: str,
        queue_type: str,
        window: int,
        batch_size: int,
        flush_interval: float,
        timeout: float,
        producer_id: str | None = None,
        epoch: int = 0,
        next_seq: int = 0,
    ) -> None:
        self.queue_id = queue_id
        self.queue_type = queue_type
        self.producer_id = producer_id or new_producer_id()
        self.epoch = epoch
        self._link = link
        self._window = window
        self._look_every = max(1, window // 8)  # seqs between two reads of credit
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._timeout = timeout
        self._pending: list[Any] = []
        self._lock = threading.RLock()
        self._flush_at = 1
        self._busy = False
        self.putter = 0  # the thread that last filled a batch (see Consumer._get_slow)
        self._heavy = False  # busy with large records: each put takes its own look
        # Bytes a link moves beside its frames (shm payloads), for the flush size.
        self._side_bytes: Any = getattr(link, "side_bytes", None)
        # A link may ship less per flush (shm: every payload in a frame holds a pool slot).
        self._flush_bytes: int = getattr(link, "flush_bytes", FLUSH_BYTES)
        self._side_seen = 0
        self._next_seq = next_seq
        self._limit = next_seq + window  # implicit first credit: both ends know maxsize
        self._received = next_seq
        self._acked = next_seq
        self._start_seq = next_seq
        self._lost = 0  # records at most, sent to a consumer that was replaced unconfirmed
        # Per consumer session: seqs it skipped for good (CREDIT "lost": refused or dropped
        # frames). Cumulative within a session, so the largest report counts.
        self._skipped_by: dict[str, int] = {}
        self._end_seqs: list[int] = []  # ENDs take seqs but are not records (statistics)
        self._session: str | None = None
        self._room = window
        self._fast_limit = 0
        self._next_look = next_seq  # the seq at which _read_credit_if_due looks again
        self._errors: list[str] = []
        self._closed = False
        # Set by close() before it takes the lock: a put blocked for room (holding the lock)
        # sees it within half a second and gives up, so close() is not stuck behind it.
        self._close_requested = False
        self._last_flush = 0.0
        self._back_at = 0.0  # when the caller came back for more (see ShmProducer.alloc)
        self._sent = 0
        self._bytes = 0
        self._batches = 0
        self._credit_waits = 0
        self._encode_errors = 0
        self._opened_at = time.monotonic()
        # Set when this process also consumes the queue: its consumer's assist (reads what
        # arrived) and received_from (what it has of a producer), so close need not wait for
        # a CREDIT to learn what the consumer beside it already holds.
        self.assist: Any = None
        self.local_receipts: Any = None
        link.send_hello(self.producer_id, epoch, next_seq, next_seq)

    # ---------------------------------------------------------------- hot path
    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item``; blocks (or raises :class:`Full` after ``timeout``) without credit."""
        pending = self._pending
        if len(pending) < self._fast_limit and item.__class__ in _PLAIN_TYPES:
            pending.append(item)  # room left and no flush due: nothing else to do
            return
        self._put_slow(item, block, timeout)

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    # --------------------------------------------------------------- slow path
    def _put_slow(self, item: Any, block: bool, timeout: float | None) -> None:
        if timeout is not None and not (
            (timeout.__class__ is float or timeout.__class__ is int) and timeout >= 0
        ):
            timeout = check_timeout(timeout, "put")  # only a bad or unusual timeout
        self._check_open()
        if isinstance(item, EndOfStream):
            self._put_end(timeout)
            return
        with self._lock:
            self._check_open()  # close() in another thread may have run while this waited
            self.putter = threading.get_ident()
            if item.__class__ not in _PLAIN_TYPES:
                self._check_record(item)  # refused here on either path, accepted=False
            idle = not self._busy and not self._pending and not self._errors
            if idle and self._room > 0 and self._ship_alone(item):
                return
            # A record dropped earlier (by the background flush) is reported after this one
            # is queued, so a caller who catches EncodeError and moves on loses nothing.
            self._update_room()
            if self._room <= 0 and not self._wait_for_room(block, timeout):
                raise Full(
                    f"queue {self.queue_id!r} is full: the consumer has not taken the "
                    f"{self._window} records it has room for"
                    + (f" within {timeout} s" if block and timeout is not None else "")
                    + "; get() from it, raise maxsize, or put with a longer timeout"
                )
            queued = self._snapshot(item) if self._heavy else item
            self._pending.append(queued)
            flushed = len(self._pending) >= self._flush_at
            if flushed:
                self._flush_locked()
            else:
                self._update_room()
            if self._errors:
                # Was this call's own record among those just dropped? Then it was not
                # accepted after all (the README's contract for EncodeError.accepted).
                own = flushed and self._fails_alone(queued)
                raise self._take_error(accepted=not own)

    def _ship_alone(self, item: Any) -> bool:
        """The idle path: send ``item`` in a frame of its own now, skipping the list and the
        flush bookkeeping; False (nothing done) if this put would make the producer busy.

        Runs under the lock, with nothing pending, room for one and no error to report.
        """
        if self._caller_gap(time.perf_counter()) < BUSY_GAP:
            return False  # the caller came straight back: the general path starts batching
        self._read_credit_if_due()
        try:
            self._ship([item])
        except DeliveryError:
            self._pending.append(item)  # accepted: it stays queued, as in _flush_locked
            self._update_room()
            raise
        side = self._side_bytes
        if side is not None:
            self._side_seen = side()
        self._last_flush = time.perf_counter()
        self._update_room()
        if self._errors:
            # The frame held this record alone, so it is the one that failed: not queued.
            errors, self._errors = self._errors, []
            self._update_room()
            raise refused(self.queue_id, errors[0])
        return True

    def _check_record(self, item: Any) -> None:
        """Refuse now (not at the batch's flush) a record whose own class msgpack cannot carry."""
        numpy = sys.modules.get("numpy")
        if numpy is not None and item.__class__ is numpy.ndarray:
            _PLAIN_TYPES.add(numpy.ndarray)  # arrays are checked by the batch, as dicts are
            return
        codec = getattr(self._link, "codec", None)
        why = None if codec is None else codec.refusal(item)
        if why is not None:
            self._encode_errors += 1
            raise refused(self.queue_id, why)
        if issubclass(item.__class__, _PLAIN_BASES):
            _PLAIN_TYPES.add(item.__class__)  # an OrderedDict, an IntEnum: packed as its base

    def _fails_alone(self, record: Any) -> bool:
        """Whether ``record`` alone fails to encode (asked only once its batch had errors).

        A throwaway codec of the same settings answers, without the link's side effects (a
        shared-memory slot per payload). It keeps the link's size limit unless the link has a
        pool (a payload that goes through it is not too large for a frame).
        """
        if any(p is record for p in self._pending):
            return False  # still queued: credit held it back from the flush
        codec = getattr(self._link, "codec", None)
        if codec is None:
            return False
        from sage_zmq.wire.codec import Codec, DecodeLimits

        pooled = getattr(codec, "shm_encoder", None) is not None
        limits = DecodeLimits(2**63, 2**63) if pooled else codec.limits
        probe = Codec(allow_pickle=codec.allow_pickle, limits=limits)
        return bool(probe.encode_batch(self.producer_id, 0, [record])[2])

    def _wait_for_room(self, block: bool, timeout: float | None) -> bool:
        self._apply(self._link.poll(0))
        self._update_room()
        if self._room > 0:
            return True
        if not block:
            return False
        self._credit_waits += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        rehello = getattr(self._link, "REHELLO_AFTER", None)
        rehello_at = None if rehello is None else time.monotonic() + rehello
        while True:
            self._flush_locked()
            if self._room > 0:
                return True
            if rehello_at is not None and time.monotonic() >= rehello_at:
                # The consumer that owes us credit may have died and another taken its
                # endpoint: that one knows nothing of us until we speak. A consumer that
                # knows us ignores a repeated HELLO (PROTOCOL.md section 4).
                rehello_at += rehello
                # acked = next_seq: this producer keeps nothing to resend, so a new consumer
                # must not count what its predecessor took with it as in flight.
                self._link.send_hello(self.producer_id, self.epoch, self._next_seq, self._next_seq)
                if self._session is None and not self._silence_noted:
                    self._note_silence()
            wait = 0.5 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return False
            if self._close_requested:
                _runtime.stop_if_exiting()
                raise QueueClosed(
                    f"queue {self.queue_id!r} was closed while this put waited for room; "
                    "the record was not accepted"
                )
            self._apply(self._link.poll(min(wait, 0.5)))
            self._update_room()
            if self._room > 0:
                return True

    _silence_noted = False

    def _note_silence(self) -> None:
        """Say once that no consumer ever answered while a put waits for credit: a refused
        CURVE handshake (or nothing at the endpoint) shows a plain producer nothing else."""
        self._silence_noted = True
        self._event(
            "connect_failed",
            "a put is waiting for credit and no consumer has answered yet: is one "
            "running at this endpoint and reading (a consumer answers from its first get(); "
            "a port bound when the queue was made is not yet a consumer), and if it requires "
            "CURVE, does it accept this producer's key?",
        )

    def _event(self, event: str, detail: str) -> None:
        """A connection event (WARNING or INFO, see observe.logging) about this producer's link."""
        from sage_zmq.observe.logging import connection_event

        peer = str(getattr(self._link, "endpoint", ""))
        connection_event(event, queue=self.queue_id, peer=peer, detail=detail)

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed(f"queue {self.queue_id!r} was closed in this process")

    def _put_end(self, timeout: float | None) -> None:
        with self._lock:
            self._check_open()
            self._drain(self._timeout if timeout is None else timeout)
            if self._pending:
                raise Full(
                    f"queue {self.queue_id!r}: end of stream not sent, {len(self._pending)} "
                    "records are still waiting for credit from the consumer"
                )
            self._link.send_end(self.producer_id, self._next_seq)
            self._end_seqs.append(self._next_seq)
            self._next_seq += 1
            self._limit += 1  # the END marker takes a sequence number, not buffer space
            self._update_room()
            if self._errors:
                note = "; the end of stream itself was sent: do not put it again"
                raise self._take_error(accepted=True, note=note)

    # --------------------------------------------------------------- flushing
    def _flush_locked(self) -> None:
        now = time.perf_counter()
        self._read_credit_if_due()
        pending = self._pending
        take = max(0, min(len(pending), self._limit - self._next_seq))
        weight = 0
        first = self._next_seq
        if take > 0:
            # One slice for the whole flush: deleting from a list's front moves what remains.
            chunk = pending[:take]
            del pending[:take]
            size = self._batch_size
            for start in range(0, take, size):
                try:
                    weight += self._ship(chunk[start : start + size] if take > size else chunk)
                except DeliveryError:
                    pending[:0] = chunk[start:]  # accepted records stay queued, in order
                    self._update_room()
                    raise
        if take and self._next_seq == first:
            # Every record was refused, nothing sent: no measure of the caller's pace nor of
            # record sizes. Read as "busy, with 0-byte records", it made the next oversize
            # record wait in a batch of batch_size instead of being refused at its put.
            self._last_flush = time.perf_counter()
        else:
            self._note_flush(now, take, weight)
        self._update_room()

    def _read_credit_if_due(self) -> None:
        # Each look costs syscalls inside libzmq, so look once per eighth of the window sent
        # (the consumer grants about that often), or when the credit left is about to run
        # short. "Short" is capped at an eighth of the window too: with a window of a batch or
        # less, "less than a batch left" would be always, a look on every idle put.
        next_seq = self._next_seq
        every = self._look_every
        if next_seq >= self._next_look or self._limit - next_seq <= min(self._batch_size, every):
            self._apply(self._link.poll(0))
            self._next_look = next_seq + every

    def _snapshot(self, item: Any) -> Any:
        """What a heavy producer queues for ``item`` (a link that copies payloads does it now,
        so that a caller may reuse its buffer as soon as ``put`` returns)."""
        return item

    def _ship(self, batch: list[Any]) -> int:
        """Send one batch; returns the bytes of its frame."""
        sent, nbytes, errors = self._link.send_batch(self.producer_id, self._next_seq, batch)
        self._next_seq += sent  # dropped records never took a sequence number
        self._sent += sent
        self._bytes += nbytes
        self._batches += 1
        if errors:
            self._encode_errors += len(errors)
            self._errors.extend(errors)
        return nbytes

    def _caller_gap(self, now: float) -> float:
        """The caller's own time between the previous flush's end and ``now``.

        A put that copies a large payload is slow, yet its caller may be busy: a caller that
        came back earlier (see ``_note_caller_back``: for a buffer to fill, or with a record
        to log) was back then, however long the filling or the logging took.
        """
        last = self._last_flush
        back = self._back_at
        return (back if back > last else now) - last

    def _note_caller_back(self) -> None:
        """The caller is back for more now (noted at the first call since the last flush):
        what this put or alloc does from here on is the queue's work, not a pause of the
        caller's, and must not make a busy producer look idle."""
        if self._back_at <= self._last_flush:
            self._back_at = time.perf_counter()

    def _note_flush(self, started: float, records: int, weight: int) -> None:
        """Adapt ``_flush_at`` after a flush (begun at ``started``) of ``weight`` frame bytes."""
        gap = self._caller_gap(started)
        if not self._busy:
            if gap < BUSY_GAP and self._batch_size > 1:
                self._busy = True
                _runtime.batching(self, True)
                _runtime.ticker().add(self, self._flush_interval)
        elif gap > self._flush_interval:
            self._busy = False
            _runtime.batching(self, False)
        side = self._side_bytes
        beside = 0
        if side is not None:  # payload bytes copied beside the frames since the last flush
            now_side = side()
            beside = now_side - self._side_seen
            weight += beside
            self._side_seen = now_side
        if not self._busy:
            self._flush_at, self._heavy = 1, False
        elif records:
            per_record = weight // records + 1
            self._flush_at = max(1, min(self._batch_size, self._flush_bytes // per_record))
            # Payloads that go beside the frames (the shm pool) are copied at put while
            # batching, whatever their size: the caller may reuse its buffer once put returns
            # (docs/architecture.md), and a batch holds records until its flush.
            self._heavy = self._flush_at < self._batch_size or beside > 0
        self._last_flush = time.perf_counter()

    def tick(self, now: float) -> float | None:
        """Background tick: ship a partial batch whose oldest record has waited
        ``flush_interval`` (it came after the last flush); then tick when the next one will."""
        if self._closed or not (self._busy or self._pending):
            return None  # idle: puts flush at once, no ticks needed
        waited = time.perf_counter() - self._last_flush
        if waited < self._flush_interval:
            return self._flush_interval - waited
        # Nothing put for flush_interval (empty), or a partial batch that long: either way
        # the caller paused, and its next put goes out at once.
        self._ship_partial()
        return self._flush_interval

    def ship_partial(self) -> None:
        """The thread filling this producer's batch is about to wait for input: send what is
        pending now. A link that fails leaves the records queued for the next put, flush or
        tick to send or report."""
        with contextlib.suppress(DeliveryError):
            self._ship_partial()

    def _ship_partial(self) -> None:
        # Ship what is pending and leave batching mode: nobody is putting right now. Skipped
        # when another thread holds the lock (it is putting, or shipping already).
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    if self._pending:
                        self._flush_locked()
                    self._busy, self._heavy, self._flush_at = False, False, 1
                    _runtime.batching(self, False)
                    self._update_room()
            finally:
                self._lock.release()

    def _leave_runtime(self) -> None:
        """No more background work on this producer: no ticks, no early flushes."""
        _runtime.ticker().discard(self)
        _runtime.batching(self, False)

    def flush(self, timeout: float | None = None) -> None:
        """Send everything pending now, waiting for credit up to ``timeout`` seconds."""
        with self._lock:
            if self._closed:
                return  # close() shipped everything there was
            self._drain(self._timeout if timeout is None else timeout)
            if self._errors:
                raise self._take_error(accepted=True)

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._flush_locked()
            if not self._pending:
                return
            wait = deadline - time.monotonic()
            if wait <= 0:
                return
            self._apply(self._link.poll(min(wait, 0.5)))

    # ----------------------------------------------------------------- credit
    def _apply(self, credits: list[Credit]) -> None:
        for credit in credits:
            if credit.session != self._session:
                if self._session is not None:
                    log.info(
                        "queue %s: consumer session changed %s -> %s",
                        self.queue_id,
                        self._session,
                        credit.session,
                    )
                self._session = credit.session
            if credit.base is not None and credit.base > self._acked:
                self._consumer_replaced(credit.base)
            if credit.lost > self._skipped_by.get(credit.session, 0):
                self._consumer_skipped(credit.session, credit.lost)
            if credit.limit > self._limit:
                self._limit = credit.limit
            if credit.received > self._received:
                self._received = credit.received
            if credit.acked > self._acked:
                self._acked = credit.acked

    def _consumer_replaced(self, base: int) -> None:
        # This consumer's first seq from us (CREDIT base) is above what any consumer reported
        # consumed: the seqs between went to a consumer that died or was replaced, and are
        # gone with it. Nothing here resends (the reliable and ray links handle this
        # themselves), so close() reports them.
        if getattr(self._link, "REHELLO_AFTER", None) is None:
            return
        at_risk = base - self._acked
        if at_risk > 0:
            self._lost += at_risk
            self._event(
                "lost",
                f"up to {at_risk} records went to a consumer that was replaced before "
                "confirming them; set metadata ack=True to have them resent",
            )
        self._received = max(self._received, base)
        self._acked = max(self._acked, base)

    def _consumer_skipped(self, session: str, lost: int) -> None:
        more = lost - self._skipped_by.get(session, 0)
        self._skipped_by[session] = lost
        self._event(
            "lost",
            f"the consumer never received {more} more records of this producer: it "
            "refused their frame or ZeroMQ dropped it (e.g. over the consumer's "
            "max_message_size); the consumer's log names the seqs",
        )

    def _skipped(self) -> int:
        """Records the consumer reported it will never receive (CREDIT ``lost``)."""
        return sum(self._skipped_by.values())

    def _update_room(self) -> None:
        room = 0 if self._closed else self._limit - self._next_seq
        room -= len(self._pending)
        self._room = room
        # put() appends without a lock while below this: room remains and no flush is due
        # (and no dropped record waits to be reported).
        self._fast_limit = (
            -1
            if self._errors or self._heavy
            else min(len(self._pending) + room, self._flush_at - 1)
        )

    def _take_error(self, *, accepted: bool, note: str = "") -> EncodeError:
        errors, self._errors = self._errors, []
        self._update_room()
        more = ""
        if len(errors) > 1:
            # Each one named (the part before its explanation), not only counted.
            named = "; ".join(e.split(": records must", 1)[0] for e in errors[1:6])
            more = f" (and {len(errors) - 1} more: {named}{'; ...' if len(errors) > 6 else ''})"
        return EncodeError(
            f"queue {self.queue_id!r}: record dropped: {errors[0]}{more}{note}",
            accepted=accepted,
            records_dropped=len(errors),
        )

    # -------------------------------------------------------------- lifecycle
    def close(self, timeout: float | None = None) -> None:
        """Ship everything and wait until the consumer confirms it received it.

        Raises :class:`DeliveryError` naming how many records were not confirmed within
        ``timeout`` (default ``communication.queue.timeout``).
        """
        if self._closed:
            return
        timeout = self._timeout if timeout is None else check_timeout(timeout, "close")
        self._close_requested = True
        with self._lock:
            if self._closed:
                return
            self._leave_runtime()
            deadline = time.monotonic() + timeout
            try:
                self._drain(timeout)
                self._link.send_close(self.producer_id, self._next_seq)
            except DeliveryError as exc:
                undelivered = len(self._pending) + max(0, self._next_seq - self._received)
                self._closed = True
                self._leave_runtime()  # the drain's flushes may have entered batching again
                self._update_room()
                self._link.close()
                raise DeliveryError(
                    f"{exc}; {undelivered} records not delivered", undelivered
                ) from None
            unsent = len(self._pending)
            self._hear_local_consumer()
            if self._received < self._next_seq:
                # What the consumer reported meanwhile: with timeout 0 (at exit) the loop
                # below would not read at all, and call received records unconfirmed.
                self._apply(self._link.poll(0))
            # A plain link resends the tail's END and CLOSE now and then: a connection that
            # broke (a reconnect, a frame over the consumer's MAXMSGSIZE) took them with it,
            # and the consumer would wait for the end and this close for its receipt. Both
            # are idempotent; the reliable and ray links resend by themselves.
            resend = getattr(self._link, "REHELLO_AFTER", None)
            resend_at = None if resend is None else time.monotonic() + resend
            while self._received < self._next_seq:
                wait = deadline - time.monotonic()
                if wait <= 0 or getattr(self._link, "refused", None):
                    break
                if resend_at is not None and time.monotonic() >= resend_at:
                    resend_at += resend
                    self._resend_tail()
                if self.assist is not None:
                    wait = min(wait, 0.01)
                if resend_at is not None:
                    wait = min(wait, max(0.0, resend_at - time.monotonic()))
                self._apply(self._link.poll(min(wait, 0.5)))
                self._hear_local_consumer()
            undelivered = unsent + max(0, self._next_seq - self._received)
            stuck = getattr(self._link, "unsent_frames", 0)
            refused = getattr(self._link, "refused", None)
            self._closed = True
            self._leave_runtime()
            self._update_room()
            self._link.close()
            errors, self._errors = self._errors, []
        if undelivered:
            if refused:
                endpoint = str(getattr(self._link, "endpoint", "?"))
                raise wrong_queue(self.queue_id, undelivered, endpoint, refused)
            endpoint = str(getattr(self._link, "endpoint", "") or "")  # none: in-process
            if stuck:
                why = (
                    f"{stuck} frames found no connection to take them: is the consumer up, and "
                    "does it accept this producer's CURVE key?"
                )
            elif self._session is None and self.assist is None and endpoint:
                # Not one CREDIT: no consumer there, or one that refused the connection (a
                # CURVE handshake that fails leaves a plain producer nothing else to see).
                why = (
                    f"nothing was ever heard from a consumer at {endpoint}: is one running "
                    "there, and if it requires CURVE, does it accept this producer's key?"
                )
            else:
                why = "is the consumer running and reading?"
            what = self._unconfirmed(undelivered, self._received)
            held = max(0, self._received - self._acked - self._ends_in(self._acked, self._received))
            also = (
                f"; {held} more that it confirmed receiving were not yet consumed at its last "
                "report, and are lost too if it is gone"
                if held
                else ""
            )
            raise DeliveryError(
                f"queue {self.queue_id!r}: {what} not confirmed as received by the consumer "
                f"within {timeout} s ({why}){also}",
                undelivered,
                undelivered + held + self._lost_at_most() + self._skipped(),
            )
        skipped = self._skipped()
        lost = self._lost_at_most()
        if skipped:
            also = (
                f"; and up to {lost} more went to a consumer that was replaced before "
                "confirming them"
                if lost
                else ""
            )
            raise DeliveryError(
                f"queue {self.queue_id!r}: {skipped} record{'s' if skipped != 1 else ''} put "
                f"{'were' if skipped != 1 else 'was'} lost in transit: the consumer never "
                "received them (it refused their frame, or ZeroMQ dropped it, e.g. over the "
                f"consumer's max_message_size; the consumer's log names the seqs and why){also}",
                skipped + lost,
            )
        if lost:
            raise DeliveryError(
                f"queue {self.queue_id!r}: up to {lost} records went to a consumer that was "
                "replaced (it restarted, or closed and another took over) before confirming "
                "them, and are lost; set metadata ack=True to have them retransmitted",
                lost,
            )
        if errors:
            raise EncodeError(
                f"queue {self.queue_id!r}: record dropped: {errors[0]}",
                records_dropped=len(errors),
            )

    def _resend_tail(self) -> None:
        """END(s) not yet confirmed, then CLOSE, again (the consumer ignores repeats)."""
        for seq in self._end_seqs:
            if seq >= self._received:
                self._link.send_end(self.producer_id, seq)
        self._link.send_close(self.producer_id, self._next_seq)

    def _unconfirmed(self, count: int, confirmed_to: int) -> str:
        """``count`` unconfirmed seqs in words: an END among them is no record put."""
        ends = min(count, self._ends_in(confirmed_to))
        records = count - ends
        parts = [f"{records} record{'s' if records != 1 else ''} put"] if records > 0 else []
        if ends:
            parts.append("the end of stream" if ends == 1 else f"{ends} ends of stream")
        verb = "was" if records <= 1 and ends <= 1 and len(parts) == 1 else "were"
        return f"{' and '.join(parts) or f'{count} records'} {verb}"

    def _lost_at_most(self) -> int:
        """Records at most that went to a consumer replaced before confirming them."""
        return int(getattr(self._link, "lost", 0)) + self._lost

    def _hear_local_consumer(self) -> None:
        """Take what the consumer in this process has received from us (after letting it read
        what arrived): exact, and without a CREDIT round trip, so that a close at exit (timeout
        0) does not call records unconfirmed that the consumer beside it already got."""
        if self.assist is None:
            return
        self.assist()
        received = None if self.local_receipts is None else self.local_receipts(self.producer_id)
        if received is not None and received > self._received:
            self._received = received

    @property
    def closed(self) -> bool:
        return self._closed

    def poll_credit(self) -> int:
        """Read the consumer's latest reports now; returns :meth:`qsize` (the live backlog)."""
        with self._lock:
            if not self._closed:
                self._apply(self._link.poll(0))
                self._update_room()
        return self.qsize()

    def qsize(self) -> int:
        """Records this producer put that the consumer has not yet reported consumed."""
        self._hear_reports()
        return self._unconsumed() + len(self._pending)

    def _hear_reports(self) -> None:
        # Read the consumer's reports that arrived (an idle producer reads its socket only
        # when it puts): unless this producer is busy in another thread right now.
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._apply(self._link.poll(0))
                    self._update_room()
            finally:
                self._lock.release()

    def _ends_in(self, start: int, stop: int | None = None) -> int:
        """ENDs this producer sent with seqs from ``start`` (up to ``stop``): they take seqs
        but are not records."""
        return sum(1 for seq in self._end_seqs if seq >= start and (stop is None or seq < stop))

    def _unconsumed(self) -> int:
        """Records sent and not reported consumed (ENDs left out)."""
        return self._next_seq - self._acked - self._ends_in(self._acked)

    def full(self) -> bool:
        with self._lock:
            if self._closed:
                return False  # a put through a descriptor opens a new end
            self._apply(self._link.poll(0))
            self._update_room()
            return self._room <= 0

    def statistics(self) -> QueueStatistics:
        self._hear_reports()
        in_flight = self._unconsumed()
        ends_consumed = len(self._end_seqs) - self._ends_in(self._acked)
        # Where the records go: for a ray queue, the consumer's tcp or same-node ipc endpoint.
        endpoint = getattr(self._link, "endpoint", None)
        extra: dict[str, Any] = {}
        if isinstance(endpoint, str) and endpoint:
            extra["endpoint"] = endpoint
        lost = self._lost_at_most() + self._skipped()
        if lost:
            extra["lost"] = lost
        moves = getattr(self._link, "reconnects", None)  # a ray link following its consumer
        if isinstance(moves, int):
            extra["reconnects"] = moves
        return QueueStatistics(
            queue_id=self.queue_id,
            queue_type=self.queue_type,
            role="producer",
            sent=self._sent,
            depth=in_flight + len(self._pending),
            maxsize=self._window,
            bytes_sent=self._bytes,
            batches_sent=self._batches,
            acked=max(0, self._acked - self._start_seq - ends_consumed),
            in_flight=in_flight,
            credit_waits=self._credit_waits,
            encode_errors=self._encode_errors,
            extra=extra or None,
            uptime=time.monotonic() - self._opened_at,
        )
