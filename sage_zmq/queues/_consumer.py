"""The consuming end of any queue: batches in, records out, credits back, ends counted.

``get`` is ``next()`` on an iterator over the current batch; only at a batch boundary does it
take the slow path, which retires the finished batch (granting its producer credit), reads what
has arrived, and counts ends of stream. An upstream's END marker sits in the batch queue after
that upstream's records, so an upstream counts as ended only once its records were consumed;
``get`` returns :class:`EndOfStream` when every upstream has ended, and from then on at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import chain
from operator import length_hint
from typing import Any

from sage_zmq import _runtime
from sage_zmq import observe as _observe
from sage_zmq.errors import Empty, QueueClosed
from sage_zmq.observe.metrics import LatencySamples
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.queues.base import ConsumerInlet, Credit, QueueStatistics

log = logging.getLogger("sage_zmq.queue")

_END = None  # records slot of an END marker in the batch queue
MAX_PRODUCERS_PER_PEER = 16
"""Producer ids one connection may introduce (sage-zmq uses one per socket)."""
_EMPTY_ITER: Iterator[Any] = iter(())
_NOTHING: Any = object()  # what next() gives for an exhausted batch iterator
_END_OF_STREAM = EndOfStream()  # what get() returns at the end; iteration stops on this object
_LAST_SEQ = 2**63 - 1  # a CREDIT's limit stays a seq (PROTOCOL.md section 3)


class _Upstream:
    """What the consumer knows of one producer."""

    __slots__ = (
        "acked",
        "base",
        "closing",
        "ended",
        "gone",
        "grant_at",
        "granted",
        "inlet",
        "lost",
        "peer",
        "producer",
        "received",
        "reported",
        "reported_at",
    )

    def __init__(self, producer: str, inlet: ConsumerInlet, peer: Any, base: int) -> None:
        self.producer = producer
        self.inlet = inlet
        self.peer = peer
        self.base = base  # where this consumer's life started for this producer
        self.received = base  # every seq below has arrived
        self.acked = base  # every seq below was consumed
        self.lost = 0  # seqs skipped for good (gaps): the producer hears of them in CREDIT
        self.granted = 0  # the limit last granted
        self.grant_at = 0  # grant again once ``acked`` reaches this
        self.reported = base  # ``acked`` as the last CREDIT told the producer
        self.reported_at = 0.0
        self.closing = False
        self.ended = False
        self.gone = False  # its connection went away without CLOSE (killed): no share


class Consumer:
    """One consumer per queue per process; threads may share it."""

    def __init__(
        self,
        inlets: list[ConsumerInlet],
        *,
        queue_id: str,
        queue_type: str,
        maxsize: int,
        upstreams: int = 1,
    ) -> None:
        self.queue_id = queue_id
        self.queue_type = queue_type
        self.session = os.urandom(6).hex()
        self._pid = os.getpid()
        self._inlets = inlets
        self._maxsize = maxsize
        self._upstreams = upstreams
        self._batches: deque[tuple[_Upstream, int, list[Any] | None]] = deque()
        self._current: Iterator[Any] = _EMPTY_ITER
        self._cur_upstream: _Upstream | None = None
        self._cur_end = 0
        self._queued = 0
        self._ups: dict[str, _Upstream] = {}
        self._ended = 0
        self._lock = threading.RLock()
        self._closed = False
        # Set by close() before it takes the lock: a get blocked in its read (holding the
        # lock) sees it within half a second and raises QueueClosed, so close() can go on.
        self._close_requested = False
        self._received = 0
        self._bytes = 0
        self._batches_in = 0
        self._duplicates = 0
        self._gaps = 0
        self._rejected = 0  # frames refused here (inlets count their own)
        self._late: dict[str, int] = {}  # producer -> records that came after the end
        self._per_peer: dict[tuple[int, Any], int] = {}  # (inlet, peer) -> producer ids it owns
        self._latencies: LatencySamples = _observe.new_latency_window(2048)
        self._unreported: set[_Upstream] = set()  # consumed more than their last CREDIT says
        # Ends of stream counted, as (producer, seq): an inlet that outlives this consumer
        # (a ray queue's registry) hands a restarted consumer those of its previous life, so
        # an upstream that ended before the restart is not waited for again.
        self._ends_counted: set[tuple[str, int]] = set()
        for inlet in inlets:
            restore = getattr(inlet, "ends_counted_before", None)
            if restore is not None:
                self._ends_counted |= restore()
        self._ended = len(self._ends_counted)
        self._opened_at = time.monotonic()
        self._next_gone_look = 0.0
        self._idle_ticks = 0  # background ticks in a row that found nothing to do
        self._waiting = False  # a get is blocked reading the socket (it holds the lock)
        _runtime.ticker().add(self, self.SERVICE_INTERVAL)

    # ---------------------------------------------------------------- hot path
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next record; :class:`EndOfStream` once every upstream has ended."""
        item = next(self._current, _NOTHING)  # no StopIteration raised at each batch's end
        if item is not _NOTHING:
            return item
        return self._get_slow(block, timeout)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def __iter__(self) -> Iterator[Any]:
        """Records until every upstream has ended."""
        # chain steps through each batch in C; the generator below wakes once per batch.
        return chain.from_iterable(self._batches_until_end())

    def _batches_until_end(self) -> Iterator[Iterable[Any]]:
        while True:
            yield self._current
            item = self._get_slow(True, None)
            if item is _END_OF_STREAM:
                return
            yield (item,)  # _get_slow took the new batch's first record; the rest follow

    # --------------------------------------------------------------- slow path
    def _get_slow(self, block: bool, timeout: float | None) -> Any:
        if timeout is not None and not (
            (timeout.__class__ is float or timeout.__class__ is int) and timeout >= 0
        ):
            from sage_zmq.queues.base import check_timeout  # only a bad or unusual timeout

            timeout = check_timeout(timeout, "get")
        deadline = None if timeout is None or not block else time.monotonic() + timeout
        if self._idle_ticks > 1:
            self._idle_ticks = 0  # in use again: the background tick comes back to its pace
            _runtime.ticker().add(self, self.SERVICE_INTERVAL)
        with self._lock:
            while True:
                if self._closed or self._close_requested:
                    _runtime.stop_if_exiting()
                    raise QueueClosed(f"queue {self.queue_id!r} was closed in this process")
                for item in self._current:  # another thread may have refilled it
                    return item
                self._retire_current()
                if not self._batches:
                    # Read what arrived, waiting if we may: one ZMQ_EVENTS check, then a
                    # blocking recv (each check costs a syscall inside libzmq).
                    wait = 0.0
                    if self._ended < self._upstreams:
                        if block:
                            wait = (
                                0.5 if deadline is None else max(0.0, deadline - time.monotonic())
                            )
                        self._ship_mine()
                    if not self._batches:
                        if wait > 0:
                            now = time.monotonic()
                            if self._unreported:
                                due = self._report_consumed(now)
                                if due is not None:
                                    wait = min(wait, due)
                            if now >= self._next_gone_look:
                                self._look_for_gone_producers(now)
                            # The background tick finds the lock taken while this waits: it
                            # is idle all the same (this read serves the socket).
                            self._waiting = True
                            try:
                                self._pump(min(wait, 0.5))
                            finally:
                                self._waiting = False
                        else:
                            self._pump(0)
                while self._batches:
                    up, end_seq, records = self._batches.popleft()
                    if records is _END:
                        up.acked = end_seq
                        up.ended = True
                        mark = (up.producer, end_seq)
                        if mark not in self._ends_counted:  # else counted in a previous life
                            self._ends_counted.add(mark)
                            self._ended += 1
                            self._note_ends(up.inlet)
                            if self._ended == self._upstreams:
                                self._warn_if_open()
                        continue
                    if self._ended >= self._upstreams:
                        self._queued -= len(records)
                        self._arrived_after_end(up, end_seq, records)
                        continue
                    self._queued -= len(records)
                    self._cur_upstream, self._cur_end = up, end_seq
                    first = records[0]
                    if first.__class__ is Packet:
                        self._latencies.append(time.time() - first.timestamp)
                    self._current = iter(records)
                    return next(self._current)
                if self._ended >= self._upstreams:
                    return _END_OF_STREAM
                if not block:
                    raise Empty(f"queue {self.queue_id!r} is empty")
                if deadline is not None and deadline <= time.monotonic():
                    raise Empty(f"queue {self.queue_id!r}: nothing arrived within {timeout} s")

    def _ship_mine(self) -> None:
        """Ship this thread's partial batches if nothing is here to read.

        A thread about to wait for input (a stage that ran dry), or asking whether any is here
        (``get_nowait``, ``empty``) right after putting, would otherwise miss its own records
        until a flush_interval later: a router's last partial batch to a queue of this process.
        """
        mine = _runtime.batching_in_this_thread()
        if mine:
            self._pump(0)
            if not self._batches:
                for producer in mine:
                    producer.ship_partial()

    def _warn_if_open(self) -> None:
        """The stream just ended: say so if a producer that sent records never ended."""
        still_open = [u.producer for u in self._ups.values() if not u.ended and u.received > u.base]
        if not still_open:
            return
        ends = self._ends_by_producer()
        repeated = [f"{p} ({n})" for p, n in ends.items() if n > 1]
        log.warning(
            "queue %s: end of stream after %d END frames (metadata upstreams=%d), but producer(s)"
            " %s sent records and no END%s: whatever they send now is not delivered. Each"
            " END counts as one upstream; set 'upstreams' to the number of EndOfStream puts",
            self.queue_id,
            self._ended,
            self._upstreams,
            ", ".join(still_open[:5]),
            f"; ENDs per producer: {', '.join(repeated[:5])}" if repeated else "",
        )

    def _arrived_after_end(self, up: _Upstream, end_seq: int, records: list[Any]) -> None:
        # get() says the stream ended and keeps saying it (a file at EOF): these are
        # counted, acknowledged so their producer is not blocked, and named in a warning.
        if up.producer not in self._late:
            log.warning(
                "queue %s: producer %s sent records after the end of the stream (all %d"
                " upstreams had ended): not delivered; see statistics().extra['after_end']",
                self.queue_id,
                up.producer,
                self._upstreams,
            )
        self._late[up.producer] = self._late.get(up.producer, 0) + len(records)
        self._consumed_to(up, end_seq)

    def _note_ends(self, inlet: ConsumerInlet) -> None:
        """Keep the ends counted where a restarted consumer finds them (see __init__)."""
        note = getattr(inlet, "note_end_counted", None)
        if note is not None:
            note(self._ends_counted)

    def _retire_current(self) -> None:
        up = self._cur_upstream
        if up is None:
            return
        self._cur_upstream = None
        self._current = _EMPTY_ITER
        self._consumed_to(up, self._cur_end)

    def _consumed_to(self, up: _Upstream, end: int) -> None:
        """Everything of ``up`` below ``end`` was consumed: grant now, or report it later."""
        up.acked = end
        if up.acked >= up.grant_at:
            self._grant(up)
        else:
            self._unreported.add(up)

    REPORT_AFTER = 0.005
    """Seconds after its last CREDIT that an idle consumer reports what it consumed since,
    even below the eighth of a window that normally triggers one: routers balance on it,
    statistics show it, and a producer waiting for room learns the queue is empty."""

    def _report_consumed(self, now: float) -> float | None:
        """CREDIT to each upstream whose consumption is unreported and due; seconds until the
        next one is due (None: nothing left to report)."""
        due: float | None = None
        for up in list(self._unreported):
            if up.acked <= up.reported:
                self._unreported.discard(up)
                continue
            left = up.reported_at + self.REPORT_AFTER - now
            if left <= 0:
                self._unreported.discard(up)
                self._grant(up)
            elif due is None or left < due:
                due = left
        return due

    def _share(self) -> int:
        active = sum(1 for u in self._ups.values() if not (u.closing or u.gone)) or 1
        return max(1, self._maxsize // active)

    GONE_LOOK_INTERVAL = 1.0
    """Seconds between two looks for producers whose connection went away without a CLOSE."""

    def _look_for_gone_producers(self, now: float) -> None:
        """A producer killed without CLOSE stops taking a share of the window (PROTOCOL §4).

        Else every dead producer would keep shrinking the live ones' credit for good. Its
        records are safe either way: it never sends again on that connection.
        """
        if now < self._next_gone_look:
            return
        self._next_gone_look = now + self.GONE_LOOK_INTERVAL
        for inlet in self._inlets:
            look = getattr(inlet, "look_at_limits", None)
            if look is not None:
                look(now)  # a producer that cannot connect does not show up as gone either
        active = [u for u in self._ups.values() if not (u.closing or u.gone)]
        if len(active) < 2 or all(u.received < u.granted for u in active):
            # Alone, a producer's share is the whole window; and while none has used up its
            # credit, none waits for the share a gone producer holds (no probe traffic then).
            return
        for up in active:
            if not getattr(up.inlet, "CAN_TELL_GONE", False):
                continue  # an in-process inlet: its producers cannot vanish on their own
            # A cumulative CREDIT (its last grant again) is harmless to a live producer;
            # ROUTER_MANDATORY makes the send fail once the producer's connection is gone.
            probe = Credit(
                self.session, up.received, up.acked, up.granted, up.base, self._pid, up.lost
            )
            if not up.inlet.send_credit(up.peer, probe):
                up.gone = True
                log.info("queue %s: producer %s is gone (no CLOSE)", self.queue_id, up.producer)

    def _grant(self, up: _Upstream) -> None:
        share = self._share()
        limit = min(max(up.granted, up.acked + share), _LAST_SEQ)
        up.granted = limit
        # The next grant once an eighth of the share was consumed: routers read live load
        # from credits. (Kept per upstream: counting the active producers at every batch
        # cost more than the rest of a batch's bookkeeping.)
        up.grant_at = limit - share + max(1, share // 8)
        up.reported, up.reported_at = up.acked, time.monotonic()
        credit = Credit(self.session, up.received, up.acked, limit, up.base, self._pid, up.lost)
        if not up.inlet.send_credit(up.peer, credit):
            log.debug("queue %s: producer %s is gone", self.queue_id, up.producer)

    # ------------------------------------------------------------------ intake
    def _pump(self, timeout: float) -> int:
        inlets = self._inlets
        events = inlets[0].recv(timeout) if len(inlets) == 1 else self._recv_any(timeout)
        for event in events:
            self._on_event(event)
        return len(events)

    def _read_arrived(self, limit: int) -> int:
        """Read up to ``limit`` messages that are already here (inlets return one per call);
        returns how many were read."""
        for n in range(limit):
            if not self._pump(0):
                return n
        return limit

    def _recv_any(self, timeout: float) -> list[tuple[Any, ...]]:
        # Several inlets (a promoted local queue): poll each briefly until one has something.
        deadline = time.monotonic() + timeout
        while True:
            events: list[tuple[Any, ...]] = []
            for inlet in self._inlets:
                events.extend(inlet.recv(0))
            remaining = deadline - time.monotonic()
            if events or remaining <= 0:
                return events
            events = self._inlets[0].recv(min(remaining, 0.002))
            if events:
                return events

    def _upstream(
        self, producer: str, inlet: ConsumerInlet, peer: Any, base: int
    ) -> _Upstream | None:
        """The producer's state, if this connection may speak for it (None: frame refused)."""
        up = self._ups.get(producer)
        if up is None:
            if not self._admit(inlet, peer):
                return None
            up = self._ups[producer] = _Upstream(producer, inlet, peer, base)
        elif not self._claim(up, inlet, peer):
            return None
        return up

    def _admit(self, inlet: ConsumerInlet, peer: Any) -> bool:
        """Count a new producer id against the connection introducing it (False: refused)."""
        owner = (id(inlet), peer)
        count = self._per_peer.get(owner, 0)
        if count >= MAX_PRODUCERS_PER_PEER:
            why = f"one connection may use at most {MAX_PRODUCERS_PER_PEER} producer ids"
            self._refuse(inlet, peer, why)
            return False
        self._per_peer[owner] = count + 1
        return True

    def _claim(self, up: _Upstream, inlet: ConsumerInlet, peer: Any) -> bool:
        """May this connection speak for ``up``'s producer? Rebinds it if so.

        A producer id belongs to the connection that introduced it; another connection takes
        it over only once that one is gone (a reconnect gets a new routing id). So a peer
        cannot move another producer's seqs (dedup state), take its credit, or end its stream.
        """
        if up.peer == peer and up.inlet is inlet:
            return True
        # Probe the owner with a harmless CREDIT (cumulative, idempotent): ROUTER_MANDATORY
        # makes the send fail once the owner's connection is gone.
        if up.inlet.send_credit(up.peer, Credit(self.session, up.received, up.acked, up.granted)):
            self._refuse(inlet, peer, f"producer id {up.producer!r} belongs to another connection")
            return False
        old = (id(up.inlet), up.peer)
        left = self._per_peer.pop(old, 1) - 1
        if left > 0:
            self._per_peer[old] = left
        new = (id(inlet), peer)
        self._per_peer[new] = self._per_peer.get(new, 0) + 1
        up.inlet, up.peer = inlet, peer
        up.gone = False  # it came back on a new connection
        return True

    def _refuse(self, inlet: ConsumerInlet, peer: Any, why: str) -> None:
        reject = getattr(inlet, "reject", None)
        if reject is not None:
            reject(peer, why)  # counts it, warns once per peer per interval, answers ERROR
        else:
            self._rejected += 1
            log.warning("queue %s: refused a frame: %s", self.queue_id, why)

    def _on_event(self, event: tuple[Any, ...]) -> None:
        what = event[0]
        if what == "data":
            _, inlet, peer, producer, seq, records, nbytes = event
            if not records:
                return  # carries nothing; it must not move seqs either
            up = self._ups.get(producer)
            if up is None or up.peer != peer or up.inlet is not inlet:  # else: its own link
                up = self._upstream(producer, inlet, peer, seq)
                if up is None:
                    return
            end = seq + len(records)
            if end <= up.received:
                self._duplicates += len(records)
                return
            if seq > up.received:
                self._skipped(up, seq)
            elif seq < up.received:
                skip = up.received - seq
                self._duplicates += skip
                records = records[skip:]
            up.received = end
            if self._ended >= self._upstreams:
                self._arrived_after_end(up, end, records)
                return
            self._batches.append((up, end, records))
            self._queued += len(records)
            self._received += len(records)
            self._bytes += nbytes
            self._batches_in += 1
        elif what == "end":
            _, inlet, peer, producer, seq = event
            up = self._upstream(producer, inlet, peer, seq)
            if up is None:
                return
            if seq < up.received:
                return  # a retransmitted END we already have
            if seq > up.received:
                self._skipped(up, seq)  # the frames before the END were lost
            up.received = seq + 1
            self._batches.append((up, seq + 1, _END))
            self._grant(up)  # a receipt: producers usually close right after their end
        elif what == "hello":
            _, inlet, peer, fields = event
            producer = fields["producer"]
            known = producer in self._ups
            up = self._upstream(producer, inlet, peer, fields.get("acked", fields["next_seq"]))
            if up is None:
                return
            up.closing = False
            if not known:
                self._grant(up)
        elif what == "close":
            _, inlet, peer, producer, seq = event
            up = self._upstream(producer, inlet, peer, seq)
            if up is None:
                return
            up.closing = True
            if seq > up.received:
                # Frames before the CLOSE were lost: say so in the receipt rather than keep
                # the producer waiting for seqs that will never come.
                self._skipped(up, seq)
                up.received = seq
            self._grant(up)  # the receipt the closing producer waits for
        elif what == "heartbeat":
            _, inlet, peer, producer = event
            if producer in self._ups:
                up = self._upstream(producer, inlet, peer, 0)
                if up is not None:
                    self._grant(up)

    def _skipped(self, up: _Upstream, seq: int) -> None:
        """Seqs ``up.received .. seq - 1`` will never arrive: a frame the inlet refused, or
        one ZeroMQ dropped (over the consumer's max_message_size). Counted, logged, and
        reported to the producer (CREDIT ``lost``) so that its ``close()`` does not call them
        delivered."""
        self._gaps += seq - up.received
        up.lost += seq - up.received
        log.warning(
            "queue %s: producer %s skipped seq %d..%d (records lost in transit)",
            self.queue_id,
            up.producer,
            up.received,
            seq - 1,
        )

    SERVICE_INTERVAL = 0.01

    def tick(self, now: float) -> float | None:
        """Background tick: read what arrived while the application is not in ``get``.

        So a closing producer gets its receipt and heartbeats are answered even when the
        application is busy or done reading; credit still follows consumption only.
        """
        if self._closed:
            return None
        if self.assist(now):
            self._idle_ticks = 0
            return self.SERVICE_INTERVAL
        # Nothing arrived and nothing was left to report: look less often, up to
        # IDLE_INTERVAL (a process may hold hundreds of idle consumers). A get() restores the
        # pace at once.
        self._idle_ticks += 1
        return min(self.SERVICE_INTERVAL * (1 << min(self._idle_ticks, 5)), self.IDLE_INTERVAL)

    IDLE_INTERVAL = 0.16
    """The longest background tick of a consumer that has had nothing to do for a while."""

    def _retire_taken(self) -> bool:
        """True if there was consumption to count or report."""
        # The application took the last record of its batch and has not come back: count
        # that consumption now, not at its next get (a producer waiting for room, a router
        # reading load or a statistics reader would wait for a get that may never come).
        busy = False
        up = self._cur_upstream
        if up is not None:
            if length_hint(self._current) == 0:
                self._retire_current()
                busy = True
            else:
                # Paused inside a batch (took some, then works on them): what it took is
                # consumed. Else its producers wait for the rest of the batch to be taken,
                # with room in the queue ("take N" actor methods deadlocked on it).
                taken = self._taken_of_current()
                if taken:
                    self._consumed_to(up, up.acked + taken)
                    busy = True
        if self._unreported:
            self._report_consumed(time.monotonic())
            busy = True
        return busy

    ASSIST_MESSAGES = 64
    """Messages one background read takes at most (credit bounds what can be waiting)."""

    def assist(self, now: float | None = None) -> bool:
        """Read what has arrived without waiting (a producer in this process is waiting).

        True if there was anything to do (or the consumer is busy in another thread). With
        ``now`` (the background tick), also looks for producers that went away.
        """
        if not self._lock.acquire(blocking=False):
            # A get or another assist holds it: the queue is in use, unless that get is just
            # waiting for input (it reads the socket itself meanwhile).
            return not self._waiting
        try:
            if self._closed:
                return False
            busy = self._retire_taken() or self._cur_upstream is not None
            busy = self._read_arrived(self.ASSIST_MESSAGES) > 0 or busy
            if now is not None:
                self._look_for_gone_producers(now)
            # Work an inlet holds back (an shm inlet's batched RELEASEs) goes out on a tick.
            return busy or any(getattr(i, "pending_work", False) for i in self._inlets)
        finally:
            self._lock.release()

    # -------------------------------------------------------------- inspection
    def qsize(self) -> int:
        """Records waiting here (approximate, like ``queue.Queue.qsize``)."""
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._pump(0)  # count what already arrived, not only what was read
            finally:
                self._lock.release()
        return length_hint(self._current) + self._queued

    def empty(self) -> bool:
        # Never waits for the lock (queue.Queue.empty does not block): another thread may
        # hold it for as long as its get() waits; then what was read so far answers.
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    if not self._batches:
                        self._ship_mine()
                    self._pump(0)
            finally:
                self._lock.release()
        return length_hint(self._current) + self._queued == 0

    def full(self) -> bool:
        return self.qsize() >= self._maxsize

    UNREAD_AT_CLOSE = (logging.WARNING, "they are gone")
    """How a close that drops records received and never read is logged: here they were
    confirmed to their producers, so nothing brings them back (the reliable consumer differs)."""

    def _ack_partial(self) -> None:
        """Count what the application took of the batch it is reading as consumed."""
        up = self._cur_upstream
        if up is not None:
            up.acked += self._taken_of_current()

    def _taken_of_current(self) -> int:
        """Records the application took from the batch it is reading (not yet in acked)."""
        up = self._cur_upstream
        if up is None:
            return 0
        return max(0, self._cur_end - length_hint(self._current) - up.acked)

    def consumed_from(self, producer: str) -> int | None:
        """Records of ``producer`` the application has taken (None: unknown producer)."""
        up = self._ups.get(producer)
        return None if up is None else self._consumed(up, self._ends_by_producer())

    def _ends_by_producer(self) -> Counter[str]:
        return Counter(producer for producer, _ in list(self._ends_counted))

    def _consumed(self, up: _Upstream, ends: Counter[str]) -> int:
        # acked counts seqs, and each END takes one (several when threads sharing this
        # producer each ended); the batch being read is not in acked yet.
        taken = self._taken_of_current() if up is self._cur_upstream else 0
        return max(0, up.acked - up.base - ends[up.producer] + taken)

    def received_from(self, producer: str) -> int | None:
        """The seq below which every record of ``producer`` has arrived here (None: unknown)."""
        up = self._ups.get(producer)
        return None if up is None else up.received

    def add_inlet(self, inlet: ConsumerInlet) -> None:
        with self._lock:
            self._inlets = [*self._inlets, inlet]

    def statistics(self) -> QueueStatistics:
        lat = sorted(self._latencies)
        ends = self._ends_by_producer()
        return QueueStatistics(
            queue_id=self.queue_id,
            queue_type=self.queue_type,
            role="consumer",
            received=self._received,
            depth=self.qsize(),
            maxsize=self._maxsize,
            bytes_received=self._bytes,
            batches_received=self._batches_in,
            duplicates=self._duplicates,
            rejected=self._rejected + sum(getattr(i, "rejected", 0) for i in self._inlets),
            producers=len(self._ups),
            upstreams=self._upstreams,
            upstreams_ended=self._ended,
            # Records consumed (ends of stream not counted), the batch being read included.
            acked=sum(self._consumed(u, ends) for u in list(self._ups.values())),
            latency_p50=lat[len(lat) // 2] if lat else None,
            latency_p99=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            extra={
                "gaps": self._gaps,
                "after_end": sum(self._late.values()),
                "session": self.session,
                "latency_histogram": self._latencies.histogram(),
            },
            uptime=time.monotonic() - self._opened_at,
        )

    def close(self, timeout: float | None = None) -> None:
        self._close_requested = True
        with self._lock:
            if self._closed:
                return
            _runtime.ticker().discard(self)
            try:
                # Last receipts: producers closing right now learn that what they sent arrived,
                # and what the application consumed of the batch it was reading (a ray
                # producer's next consumer would otherwise get those records again).
                self._ack_partial()
                self._read_arrived(4096)
                for up in self._ups.values():
                    if not up.ended:
                        self._grant(up)
            except Exception as exc:
                log.debug("queue %s: last read before close failed: %s", self.queue_id, exc)
            cur = self._cur_upstream
            unread = self._queued + (0 if cur is None else max(0, self._cur_end - cur.acked))
            if unread:
                level, fate = self.UNREAD_AT_CLOSE
                log.log(
                    level,
                    "queue %s: closed with %d records received and never read; %s",
                    self.queue_id,
                    unread,
                    fate,
                )
            self._closed = True
            self._batches.clear()
            self._current = _EMPTY_ITER
            for inlet in self._inlets:
                inlet.close()

    @property
    def closed(self) -> bool:
        return self._closed
