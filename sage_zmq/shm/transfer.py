"""Moving large payloads through shared memory: the producer's sender, the consumer's receiver.

:class:`ShmSender` (producer) copies a payload of at least ``threshold`` bytes into a slot of
its lazily created :class:`~sage_zmq.shm.pool.SharedMemoryPool` and puts extension type 4
(``transports/PROTOCOL.md`` §6) in the record instead. :class:`ShmReceiver` (consumer) turns
that reference back into a read-only numpy array / memoryview over the slot (or a copy when
``zero_copy`` is off) and queues a release for the producer when the view dies; the socket
owner sends queued releases (a GC callback must never touch a ZeroMQ socket).

Neither class owns a socket: the queue's link calls them while it holds its socket.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from sage_zmq.errors import DecodeError, Full
from sage_zmq.packet import Packet
from sage_zmq.shm import ring as ring_mod
from sage_zmq.shm.pool import (
    PayloadTooLarge,
    PoolClosed,
    SegmentCache,
    SharedMemoryPool,
    ShmError,
    Slot,
    SlotRef,
    _find_lease,
    byte_interface,
)
from sage_zmq.shm.ring import ReleaseRing
from sage_zmq.shm.sweep import SHM_DIR, pid_alive, sweep_orphans
from sage_zmq.wire.codec import EXT_SHM_REF
from sage_zmq.wire.dtypes import alloc_layout, dtype_from_wire, dtype_to_wire

log = logging.getLogger("sage_zmq.shm")


_BYTES_LIKE = (bytes, bytearray, memoryview)
_STAGED_TYPES = frozenset({bytes, bytearray, memoryview, Packet})
SCAN_DEPTH = 8
"""How many container levels below a record payloads nested in it are looked for."""
_WARN_EVERY = 10.0
_TRIM_EVERY = 10.0
_RELEASE_CHUNK = 4096

RELEASE_BATCH = 16
"""Releases a consumer collects before it sends them (unless RELEASE_DELAY passed)."""
RELEASE_BYTES = 4 << 20
"""Payload bytes whose releases a consumer sends at once, however few: slots that come back
soon are reused soon, and a pool cycling through a few MiB copies into memory still in the
cache (a 1 MiB copy ran at ~40 GB/s over 8 MiB of destinations here, ~16 GB/s over 64 MiB)."""
RELEASE_DELAY = 0.002
"""Seconds a release may wait for company before it is sent."""
GROW_AFTER = 2 * RELEASE_DELAY
"""Seconds a full pool waits for releases before it adds a segment."""
MAX_RINGS = 64
"""Release rings a consumer keeps (one per producer connection); producers beyond get frames."""
RING_ATTACH_WAIT = 60.0
"""Seconds after which a ring no producer attached to may give way to another producer's."""
GROW_RETRY = 1.0
"""Seconds after a segment could not be created (no memory) before the pool tries again."""
GONE_LOOK_EVERY = 5.0
"""Seconds between a consumer's looks for mapped segments their producer removed (trimmed,
closed, or it died): the memory of a removed segment is freed only once no process maps it."""


class InlineBytes(bytes):
    """A copy of a large payload that travels inline, decided before the flush (the pool had
    no room): ``stage`` and the deep scan pass it over, msgpack packs it as plain bytes."""

    __slots__ = ()


# --------------------------------------------------------------------------------------------
# wire form of the reference

_new_tuple = tuple.__new__


def pack_ref(
    slot: SlotRef,
    dtype: np.dtype[Any] | None,
    shape: Sequence[int] | None,
    packb: Callable[[Any], bytes] | None = None,
) -> Any:
    """Extension type 4 for a slot: ``[segment, offset, nbytes, slot, dtype, shape]``.

    ``packb``: a reused ``msgpack.Packer(use_bin_type=True).pack`` (a packer is not
    thread-safe: its owner's lock must cover it); without it, ``msgpack.packb``.
    """
    body = [
        slot.segment,
        slot.offset,
        slot.nbytes,
        slot.slot_id,
        None if dtype is None else dtype_to_wire(dtype),
        None if shape is None else [int(n) for n in shape],
    ]
    data = msgpack.packb(body, use_bin_type=True) if packb is None else packb(body)
    # msgpack.ExtType's __new__ checks its arguments in Python; these two are known good.
    return _new_tuple(msgpack.ExtType, (EXT_SHM_REF, data))


_WIRE_DTYPES: dict[str, np.dtype[Any]] = {}  # dtype strings seen on the wire, checked once


def unpack_ref(data: bytes) -> tuple[SlotRef, np.dtype[Any] | None, tuple[int, ...] | None]:
    """Validate an ext 4 body; the layout must fill exactly ``nbytes``."""
    try:
        fields = msgpack.unpackb(data, raw=False, use_list=True)
    except Exception as exc:
        raise DecodeError(f"malformed shm ref: {exc}") from None
    if fields.__class__ is not list or len(fields) != 6:
        raise DecodeError("shm ref must be [segment, offset, nbytes, slot, dtype, shape]")
    ref = SlotRef.parse(fields[:4])
    spec, shape = fields[4], fields[5]
    if spec is None:
        if shape is not None:
            raise DecodeError("shm ref of raw bytes (nil dtype) must have a nil shape")
        return ref, None, None
    dt = _WIRE_DTYPES.get(spec) if spec.__class__ is str else None
    if dt is None:
        dt = dtype_from_wire(spec, "shm ref")
        if spec.__class__ is str and len(_WIRE_DTYPES) < 256:
            _WIRE_DTYPES[spec] = dt
    if shape.__class__ is not list:
        raise DecodeError("shm ref shape must be a list of non-negative ints")
    count = 1
    for n in shape:
        if n.__class__ is not int or n < 0:  # msgpack decodes ints as int, never bool
            raise DecodeError("shm ref shape must be a list of non-negative ints")
        count *= n
    if count * dt.itemsize != ref.nbytes:
        raise DecodeError(
            f"shm ref holds {ref.nbytes} bytes; shape {shape} of {dt} needs {count * dt.itemsize}"
        )
    return ref, dt, tuple(shape)


# --------------------------------------------------------------------------------------------
# producer side


class _Loan:
    """Owner of a buffer handed out by :meth:`ShmSender.alloc`: every array over it has this in
    its ``.base`` chain, so the slot goes back to the pool when the last one dies unsent."""

    __slots__ = (
        "__array_interface__",
        "__weakref__",
        "_export",
        "array",
        "sender",
        "slot",
        "watch",
    )

    watch: _LoanWatch  # set by ShmSender.alloc, which keeps the watch reachable
    # The array alloc returned, which starts at the slot (a weak reference: the array holds
    # the loan). Its put needs no ``__array_interface__`` (about 1 us) to learn where it starts.
    array: weakref.ref[np.ndarray]

    def __init__(self, sender: ShmSender, slot: Slot) -> None:
        # While this export lives the pool cannot release the slot's buffer under an array.
        self._export = np.frombuffer(slot.buffer, np.uint8)
        self.__array_interface__ = byte_interface(slot.address, slot.nbytes, False)
        self.sender = sender
        self.slot = slot


class _LoanWatch(weakref.ref[_Loan]):
    """Calls :func:`_loan_collected` when its loan dies; it outlives the loan, so it carries
    what the callback needs (a weakref.finalize would cost microseconds per buffer)."""

    __slots__ = ("sender", "sent", "slot_id")
    sender: weakref.ref[ShmSender]
    sent: bool
    slot_id: int


def _find_loan(obj: object) -> _Loan | None:
    for _ in range(64):
        if isinstance(obj, _Loan):
            return obj
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            return None
    return None


class ShmSender:
    """Producer side: places large payloads in the pool and frees slots the consumer releases.

    Not thread-safe on its own: the link calls it under its producer's lock. Release callbacks
    of unsent :meth:`alloc` buffers may come from any thread; the pool is thread-safe.

    ``poll_releases(timeout)`` (set by the link) reads RELEASE frames from the socket and
    passes their ids to :meth:`apply_releases`; it is how a full pool waits for room.
    """

    def __init__(
        self,
        *,
        threshold: int,
        capacity: int,
        wait: float,
        queue_id: str = "",
        segment_bytes: int | None = None,
    ) -> None:
        self.threshold = max(1, int(threshold))
        self.capacity = int(capacity)
        self.wait = float(wait)
        self.queue_id = queue_id
        self.poll_releases: Callable[[float], None] = lambda timeout: None
        # Sends what the producer batched (set by it): a full pool must not wait for the
        # release of slots that are still in our own unsent batch.
        self.ship_pending: Callable[[], None] = lambda: None
        self._segment_bytes = segment_bytes
        self._pool: SharedMemoryPool | None = None
        self._disabled = self.capacity <= 0
        self._batch: list[tuple[int, _Loan | None, int]] | None = None
        # Slots sent and not yet released -> the first seq of the frame that carried them:
        # what a consumer that died held is told apart from what its successor may hold.
        self._sent_at: dict[int, int] = {}
        self._early: dict[Any, int] = {}  # ext 4 value placed at put -> its slot, until sent
        self._starved = False
        self._closed = False
        self._unread_bytes = 0  # placed since the socket was last read for releases
        self._no_grow_until = 0.0  # after a failed segment creation: no new one before this
        self._last_warning = -1e9
        self._last_trim = time.monotonic()
        self._lock = threading.Lock()  # guards pool creation and close against GC callbacks
        self._weak_self = weakref.ref(self)
        self._loans: dict[int, _LoanWatch] = {}  # slot id -> watch of its buffer's owner
        # The consumer's release ring, once it named one and we attached (set by the link).
        self.ring: ReleaseRing | None = None
        self._packb = msgpack.Packer(use_bin_type=True).pack  # under the producer's lock
        self.placed = 0
        self.placed_bytes = 0
        self.lent = 0
        self.inline_fallbacks = 0
        self.released = 0
        self.ring_released = 0
        self.reclaimed = 0
        self.waits = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return not (self._disabled or self._closed)

    @property
    def pool(self) -> SharedMemoryPool | None:
        return self._pool

    def _get_pool(self) -> SharedMemoryPool | None:
        pool = self._pool
        if pool is not None or self._disabled or self._closed:
            return pool
        with self._lock:
            if self._pool is None and not self._closed:
                try:
                    self._pool = SharedMemoryPool(self.capacity, segment_bytes=self._segment_bytes)
                except ShmError as exc:
                    self._disabled = True
                    log.warning(
                        "queue %s: no shared-memory pool (%s); large payloads go inline",
                        self.queue_id,
                        exc,
                    )
            return self._pool

    def _fallback(self, nbytes: int, why: str) -> None:
        self.inline_fallbacks += 1
        now = time.monotonic()
        if now - self._last_warning > _WARN_EVERY:
            self._last_warning = now
            log.warning(
                "queue %s: a %d-byte payload goes inline, not through shared memory: %s "
                "(%d inline so far)",
                self.queue_id,
                nbytes,
                why,
                self.inline_fallbacks,
            )

    def _slot(self, nbytes: int, wait: float | None = None) -> Slot | None:
        """A slot, waiting for releases up to ``wait`` (default ``self.wait``); None: inline."""
        pool = self._get_pool()
        if pool is None:
            return None
        if self.ring is not None:
            # What the consumer released since the last look, without a syscall: first-fit
            # then reuses those slots, and the copy lands in memory still in the cache.
            self.take_ring()
        else:
            self._unread_bytes += nbytes
            if self._unread_bytes >= RELEASE_BYTES:
                # The same from RELEASE frames: reading the socket costs a few syscalls, so
                # only every few MiB of payloads.
                self._unread_bytes = 0
                self.poll_releases(0.0)
        try:
            return pool.alloc(nbytes, timeout=0, grow=False)
        except PayloadTooLarge:
            self._fallback(nbytes, f"larger than the pool ({pool.capacity} bytes)")
            return None
        except PoolClosed:
            return None
        except Full:
            pass
        if self._early and self._batch is None:
            # Payloads placed at put wait in the producer's batch: nobody can release their
            # slots before they are sent. (Not while a frame is being encoded: that frame is
            # the batch.)
            self.ship_pending()
        bound = self.wait if wait is None else wait
        # Releases are cheaper than a new segment, which takes tens of ms to pre-fault and
        # spreads the copies over more memory, colder in cache. Read those that arrived, and
        # give a consumer that is merely behind a moment to send more (it sends what it
        # dropped at least every RELEASE_DELAY) before growing. Not while one payload fills
        # the pool: waiting for it would have the producer take turns with the consumer on
        # every payload, where a second segment lets it fill the next one meanwhile.
        if pool.slots_in_use > 1:
            starved = self._starved and wait is None  # no release came lately: do not wait
            grace = time.monotonic() + (0.0 if starved else min(GROW_AFTER, bound))
            while True:
                self.poll_releases(max(0.0, grace - time.monotonic()))
                try:
                    return pool.alloc(nbytes, timeout=0, grow=False)
                except PoolClosed:
                    return None
                except Full:
                    pass
                if time.monotonic() >= grace:
                    break
        try:
            return pool.alloc(nbytes, timeout=0, grow=self._may_grow())
        except (Full, PoolClosed):
            pass
        except ShmError as exc:  # no memory for another segment (/dev/shm is full)
            self._cannot_grow(nbytes, exc)
            return None
        # Full: what frees room is a RELEASE from the consumer, read from our own socket.
        self.waits += 1
        deadline = time.monotonic() + (0.0 if self._starved and wait is None else bound)
        while True:
            remaining = deadline - time.monotonic()
            self.poll_releases(max(0.0, min(remaining, 0.05)))
            try:
                slot = pool.alloc(nbytes, timeout=0, grow=self._may_grow())
            except ShmError as exc:
                self._cannot_grow(nbytes, exc)
                return None
            except (Full, PoolClosed):
                if remaining > 0:
                    continue
                # Starved: until a release arrives, later payloads do not wait again.
                self._starved = True
                self._fallback(nbytes, f"the pool stayed full for {bound} s")
                return None
            self._starved = False
            return slot

    def _may_grow(self) -> bool:
        return time.monotonic() >= self._no_grow_until

    def _cannot_grow(self, nbytes: int, exc: ShmError) -> None:
        # The payload goes inline, as when the pool is full; trying to create a segment on
        # every put would cost a failed allocation each, so wait a while before the next try.
        self._no_grow_until = time.monotonic() + GROW_RETRY
        self._fallback(nbytes, f"the pool could not grow: {exc}")

    # -- encoding ---------------------------------------------------------------------------

    def begin(self) -> None:
        """Start tracking the slots a frame being encoded refers to."""
        self._batch = []

    def abort(self) -> None:
        """The frame will not be sent: give back what it placed, un-send what it lent."""
        batch, self._batch = self._batch, None
        pool = self._pool
        for slot_id, loan, nbytes in batch or ():
            if loan is not None:
                loan.watch.sent = False
            elif pool is not None:
                pool.release(slot_id)
                self.placed -= 1  # counts payloads that went through the pool, not attempts
                self.placed_bytes -= nbytes

    def commit(self, seq: int, records: list[Any]) -> None:
        """The frame of ``records`` (first seq ``seq``) was sent: its slots belong to the
        consumer until it releases them."""
        batch, self._batch = self._batch, None
        sent_at = self._sent_at
        for slot_id, _, _ in batch or ():
            sent_at[slot_id] = seq
        early = self._early
        if early:  # snapshots taken at put: top-level payloads, or a Packet's
            for record in records:
                ext = record.payload if record.__class__ is Packet else record
                if ext.__class__ is msgpack.ExtType:
                    slot_id = early.pop(ext, -1)
                    if slot_id >= 0:
                        sent_at[slot_id] = seq

    def forget(self, records: list[Any]) -> None:
        """Give back the slots placed at put for ``records``, which will never be sent (their
        encoding failed; the caller reports them): nobody would ever release them."""
        early, pool = self._early, self._pool
        if not early:
            return
        for record in records:
            ext = record.payload if record.__class__ is Packet else record
            if ext.__class__ is msgpack.ExtType:
                slot_id = early.pop(ext, -1)
                if slot_id >= 0 and pool is not None:
                    pool.release(slot_id)

    def reclaim_sent_before(self, seq: int) -> int:
        """Take back the slots of frames before ``seq``: their consumer is gone (it died), and
        the one after it started at ``seq``. Returns how many were taken back."""
        pool = self._pool
        gone = [slot_id for slot_id, at in self._sent_at.items() if at < seq]
        taken = 0
        for slot_id in gone:
            del self._sent_at[slot_id]
            if pool is not None and pool.release(slot_id):
                taken += 1
        self.reclaimed += taken
        return taken

    def encode_array(self, arr: np.ndarray) -> Any:
        """Codec hook for numpy arrays: ext 4 if it goes through the pool, else None."""
        nbytes = arr.nbytes
        if nbytes < self.threshold or self._disabled or arr.dtype.hasobject:
            return None
        return self._place(arr, arr.dtype, arr.shape, nbytes)

    def encode_bytes(self, data: bytes | bytearray | memoryview) -> Any:
        """ext 4 for a large bytes-like object (msgpack packs bytes without asking), or None."""
        if isinstance(data, memoryview):
            if not data.c_contiguous:
                return None
            nbytes = data.nbytes
        else:
            nbytes = len(data)
        if nbytes < self.threshold or self._disabled:
            return None
        return self._place(data, None, None, nbytes)

    def _place(
        self, data: Any, dtype: np.dtype[Any] | None, shape: Sequence[int] | None, nbytes: int
    ) -> Any:
        # An alloc buffer or a view of it has the loan's byte array as its base: no walk.
        base = data.base if data.__class__ is np.ndarray else None
        if base.__class__ is np.ndarray and base.base.__class__ is _Loan:
            loan: _Loan | None = base.base
        else:
            loan = _find_loan(data)
        if loan is not None and loan.sender is self and not loan.watch.sent:
            ref = self._lent_ref(loan, data, nbytes)
            if ref is not None:
                ext = pack_ref(ref, dtype, shape, self._packb)
                self._track(ref.slot_id, loan, nbytes, ext)
                return ext
        slot = self._slot(nbytes)
        if slot is None:
            return None
        try:
            slot.write(data)
        except BaseException:
            self._pool.release(slot.id)  # type: ignore[union-attr]
            raise
        self.placed += 1
        self.placed_bytes += nbytes
        ext = pack_ref(slot.ref(), dtype, shape, self._packb)
        self._track(slot.id, None, nbytes, ext)
        return ext

    def _track(self, slot_id: int, loan: _Loan | None, nbytes: int, ext: Any) -> None:
        if self._batch is not None:  # placed while a frame is encoded: it goes with the frame
            self._batch.append((slot_id, loan, nbytes))
        else:  # placed at put (a snapshot): it goes with whichever frame carries ``ext``
            self._early[ext] = slot_id

    def _lent_ref(self, loan: _Loan, data: Any, nbytes: int) -> SlotRef | None:
        # Any C-contiguous part of a lent buffer goes by reference (no copy at all).
        view = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        if not view.flags.c_contiguous:
            return None
        slot = loan.slot
        delta = 0 if loan.array() is view else view.__array_interface__["data"][0] - slot.address
        if delta < 0 or delta + nbytes > slot.nbytes or self._pool is None or self._pool.closed:
            return None
        loan.watch.sent = True
        self.lent += 1
        return SlotRef(slot.segment, slot.offset + delta, nbytes, slot.id)

    def stage(self, records: list[Any], deep: bool = False) -> list[Any]:
        """Records with large bytes-likes replaced by ext 4 (a new list; records untouched).

        Shallow: top-level records and Packet payloads only (cheap enough for every batch).
        ``deep`` also looks inside dicts, lists and tuples, for a frame that came out large.
        """
        if not deep and _STAGED_TYPES.isdisjoint(set(map(type, records))):
            return records  # the common batch of small dicts: one C-level pass, no Python loop
        out: list[Any] | None = None
        for i, rec in enumerate(records):
            cls = rec.__class__
            if deep:
                new = self._scan(rec, SCAN_DEPTH)
            elif cls is bytes or cls is bytearray or cls is memoryview:
                ext = self.encode_bytes(rec)
                new = rec if ext is None else ext
            elif cls is Packet and rec.payload.__class__ in _BYTES_LIKE:
                ext = self.encode_bytes(rec.payload)
                new = rec if ext is None else _with_payload(rec, ext)
            else:
                continue
            if new is not rec:
                if out is None:
                    out = list(records)
                out[i] = new
        return records if out is None else out

    def snapshot(self, record: Any, inline_array: Callable[[np.ndarray], Any]) -> Any:
        """``record`` with its large top-level payload (array, bytes-like, or either as a
        Packet's payload) copied now, so its owner may reuse the buffer: into the pool, or,
        when the pool has no room, into a private inline copy in its final form
        (``inline_array`` for arrays, :class:`InlineBytes`) that the flush sends as it is."""
        cls = record.__class__
        if cls is Packet:
            payload = record.payload
            if payload.__class__ is np.ndarray or payload.__class__ in _BYTES_LIKE:
                copied = self.snapshot(payload, inline_array)
                return record if copied is payload else _with_payload(record, copied)
            return record
        if cls is np.ndarray:
            ext = self.encode_array(record)
            if ext is not None:
                return ext
            big = record.nbytes >= self.threshold and not record.dtype.hasobject
            return inline_array(record) if big else record
        if cls in _BYTES_LIKE:
            ext = self.encode_bytes(record)
            return ext if ext is not None else self._inline_copy(record)
        return record

    def _inline_copy(self, data: bytes | bytearray | memoryview) -> Any:
        nbytes = data.nbytes if isinstance(data, memoryview) else len(data)
        return InlineBytes(data) if nbytes >= self.threshold else data

    def _scan(self, obj: Any, depth: int) -> Any:
        cls = obj.__class__
        if cls in _BYTES_LIKE:
            ext = self.encode_bytes(obj)
            return obj if ext is None else ext
        if depth <= 0:
            return obj
        if cls is Packet:
            payload = self._scan(obj.payload, depth - 1)
            return obj if payload is obj.payload else _with_payload(obj, payload)
        if cls is dict:
            changed = {}
            for k, v in obj.items():
                nv = self._scan(v, depth - 1)
                if nv is not v:
                    changed[k] = nv
            return {**obj, **changed} if changed else obj
        if cls is list or cls is tuple:
            items = [self._scan(v, depth - 1) for v in obj]
            if any(a is not b for a, b in zip(items, obj, strict=True)):
                return items
            return obj
        return obj

    # -- producer-side buffers ---------------------------------------------------------------

    def alloc(
        self,
        shape: int | Sequence[int],
        dtype: npt.DTypeLike = np.uint8,
        timeout: float | None = None,
    ) -> np.ndarray:
        """A writable array to fill in place and ``put`` with no copy.

        It lives in a pool slot when the pool can take it (waiting up to ``timeout`` s, default
        the queue's ``shm_wait``); otherwise it is an ordinary array and ``put`` copies it.
        After ``put`` the queue owns the memory: do not write to the array again.
        """
        shp, dt = alloc_layout(shape, dtype)
        nbytes = math.prod(shp) * dt.itemsize
        if nbytes == 0 or self._disabled or self._closed:  # not self.enabled, without a call
            return np.empty(shp, dt)
        slot = self._slot(nbytes, wait=timeout)
        if slot is None:
            return np.empty(shp, dt)
        # The watch must stay reachable from here: a weakref that dies in the same garbage
        # cycle as its loan would never call back, and the slot would stay taken.
        loan = _Loan(self, slot)
        watch = _LoanWatch(loan, _loan_collected)
        watch.sender, watch.sent, watch.slot_id = self._weak_self, False, slot.id
        loan.watch = watch
        self._loans[slot.id] = watch
        self.placed += 1
        self.placed_bytes += nbytes
        array = np.asarray(loan).view(dt)
        if len(shp) != 1:  # one dimension: the view has the shape already
            array = array.reshape(shp)
        loan.array = weakref.ref(array)
        return array

    def _loan_dropped(self, slot_id: int) -> None:
        pool = self._pool
        if pool is not None and not pool.closed:
            pool.release(slot_id)

    # -- releases ---------------------------------------------------------------------------

    def take_ring(self) -> int:
        """Free the slots released through the consumer's ring since the last look.

        Called under the producer's lock, like :meth:`commit`: a slot is in ``_sent_at``
        before its frame can reach the consumer that releases it.
        """
        ring = self.ring
        if ring is None:
            return 0
        ids = ring.take()
        if ids:
            self.ring_released += self._free_sent(ids)
        return len(ids)

    def apply_releases(self, slot_ids: Iterable[int]) -> None:
        """Free slots the consumer released (ids from RELEASE frames)."""
        self.released += self._free_sent(slot_ids)

    def _free_sent(self, slot_ids: Iterable[int]) -> int:
        """Free the slots a consumer released, from a ring or a frame; how many it freed."""
        pool = self._pool
        if pool is None:
            return 0
        sent_at = self._sent_at
        freed = 0
        for slot_id in slot_ids:
            # Only what we sent and still count as the consumer's: it cannot free a slot
            # still being filled, nor one taken back since (a dead consumer's ring may still
            # hold slots reclaim_sent_before took).
            if sent_at.pop(slot_id, None) is not None and pool.release(slot_id):
                freed += 1
        self._starved = False
        now = time.monotonic()
        if now - self._last_trim > _TRIM_EVERY:
            self._last_trim = now
            stats = pool.statistics()
            if len(stats.segments) > 1:
                # Buffers shrink back: every idle segment once a burst is over, and while the
                # pool is in use those idle for a whole interval (the payloads got smaller).
                pool.trim(0.0 if stats.used == 0 else _TRIM_EVERY)
        return freed

    def statistics(self) -> dict[str, Any]:
        pool = self._pool
        stats = pool.statistics() if pool is not None else None
        return {
            "threshold": self.threshold,
            "capacity": self.capacity,
            "placed": self.placed,
            "placed_bytes": self.placed_bytes,
            "lent": self.lent,
            "released": self.released,
            "ring_released": self.ring_released,
            "reclaimed": self.reclaimed,
            "inline_fallbacks": self.inline_fallbacks,
            "waits": self.waits,
            "in_use_bytes": stats.used if stats else 0,
            "slots_in_use": stats.slots_in_use if stats else 0,
            "segments": len(stats.segments) if stats else 0,
            "pool_waits": stats.waits if stats else 0,
        }

    def close(self) -> None:
        """Unlink every segment. Views a consumer already mapped stay valid."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            ring, self.ring = self.ring, None
        if ring is not None:
            ring.close()  # detaches: the consumer sends any later releases as frames
        if pool is not None:
            pool.close()
            # A consumer SIGKILLed before it could name its release ring left the ring
            # behind: nobody else might look at /dev/shm for a long time.
            for name in sweep_orphans():
                log.info("removed orphaned shared-memory segment %s", name)


def _loan_collected(watch: _LoanWatch) -> None:
    # Any thread (GC): an unsent buffer's slot goes back to the pool; a sent one is the
    # consumer's to release.
    sender = watch.sender()
    if sender is None:
        return
    sender._loans.pop(watch.slot_id, None)
    if not watch.sent:
        sender._loan_dropped(watch.slot_id)


def _with_payload(packet: Packet, payload: Any) -> Packet:
    return Packet(
        payload,
        packet.input_index,
        packet.partition_key,
        packet.partition_strategy,
        packet.headers,
        packet.timestamp,
    )


# --------------------------------------------------------------------------------------------
# consumer side


class ShmReceiver:
    """Consumer side: decodes ext 4 into views of the producer's slots, queues releases.

    The inlet's codec carries ``shm_origin`` (the ZeroMQ routing id of the frame being
    decoded, set by the inlet before each decode); the inlet calls :meth:`flush` with its
    socket's ``send_release`` whenever it reads, and :meth:`close` when it closes.
    """

    def __init__(self, codec: Any, *, zero_copy: bool = True) -> None:
        self.zero_copy = zero_copy
        self._codec = codec
        self.cache = SegmentCache()
        self.producers: dict[Any, str] = {}  # routing id -> producer id (for RELEASE bodies)
        # (peer, slot id) of views dropped whose RELEASE has not gone out yet.
        self.unsent_releases: deque[tuple[Any, int]] = deque()
        self._callbacks: dict[Any, Callable[[int], None]] = {}
        self._mapped = 0
        self._next_gone_look = time.monotonic() + GONE_LOOK_EVERY
        self._last_flush = 0.0
        self._last_nbytes = 0
        self._release_at = RELEASE_BATCH  # pending releases that go out at once
        self._closed = False
        # Release rings (shm/ring.py), one per producer connection that sent a slot, named in
        # the CREDITs to it; used once its producer attached.
        self.rings: dict[Any, ReleaseRing] = {}
        self._ring_refused: set[Any] = set()  # peers for which no ring could be made
        self.views = 0
        self.copies = 0
        self.releases_sent = 0
        self.ring_releases = 0

    def decode(self, data: bytes) -> Any:
        """Codec hook for ext 4."""
        ref, dt, shape = unpack_ref(data)
        if ref.nbytes != self._last_nbytes:  # sizes mostly repeat: recompute on a change
            self._last_nbytes = ref.nbytes
            self._release_at = max(1, min(RELEASE_BATCH, RELEASE_BYTES // max(1, ref.nbytes)))
        peer = self._codec.shm_origin
        if peer not in self.rings and ring_mod.SUPPORTED and peer not in self._ring_refused:
            self._new_ring(peer)
        on_release = self._callback(peer)
        cache = self.cache
        if not self.zero_copy:
            self.copies += 1
            if dt is None:
                return cache.copy_out(ref, on_release=on_release)
            return cache.copy_out(ref, on_release=on_release, dtype=dt, shape=shape)
        self.views += 1
        if dt is None:
            return cache.view(ref, on_release)
        assert shape is not None
        return cache.exact_array(ref, dt, shape, on_release)

    def _new_ring(self, peer: Any) -> None:
        if len(self.rings) >= MAX_RINGS:
            self._prune_rings()
            if len(self.rings) >= MAX_RINGS:
                self._ring_refused.add(peer)  # its releases go as frames, as before
                return
        try:
            self.rings[peer] = ReleaseRing.create()
        except ShmError as exc:  # /dev/shm full: frames do the same job
            self._ring_refused.add(peer)
            log.debug("no release ring for a producer (%s); releases go as frames", exc)

    def _prune_rings(self) -> None:
        # Rings whose producer went away (it detached on close, or its process is gone), and
        # rings never attached after a while (a producer that does not read rings: frames).
        stale = time.monotonic() - RING_ATTACH_WAIT
        if len(self._ring_refused) > 4 * MAX_RINGS:
            self._ring_refused.clear()  # connections come and go: forget the old ones
        for peer, ring in list(self.rings.items()):
            reader = ring.reader
            if reader:
                if pid_alive(reader):
                    continue
            elif not ring.was_read:
                if ring.created > stale:
                    continue
                self._ring_refused.add(peer)  # a producer that does not read rings
            del self.rings[peer]
            ring.close()

    def ring_name(self, peer: Any) -> str | None:
        """The release ring to name in a CREDIT to ``peer`` (None: it has none)."""
        ring = self.rings.get(peer)
        return None if ring is None else ring.name

    def _callback(self, peer: Any) -> Callable[[int], None]:
        cb = self._callbacks.get(peer)
        if cb is None:
            if len(self._callbacks) > 4096:
                self._callbacks.clear()
            cb = self._callbacks[peer] = functools.partial(self._released, peer)
        return cb

    def _released(self, peer: Any, slot_id: int) -> None:
        # Any thread, possibly inside the garbage collector: only a deque append.
        if not self._closed:
            self.unsent_releases.append((peer, slot_id))

    @property
    def pending(self) -> int:
        return len(self.unsent_releases)

    def due_in(self) -> float | None:
        """Seconds until the queued releases must be sent (None: none queued)."""
        if not self.unsent_releases:
            return None
        return max(0.0, self._last_flush + RELEASE_DELAY - time.monotonic())

    def flush(self, send: Callable[[Any, str, list[int]], bool], force: bool = True) -> None:
        """Send queued releases, one RELEASE per producer (``send(peer, producer, ids)``).

        Unless ``force``, a few releases wait (up to ``RELEASE_BATCH`` ids, fewer when the
        latest payload was large: about ``RELEASE_BYTES`` of them, or ``RELEASE_DELAY`` s) so
        that small payloads do not cost a frame each way.
        """
        pending = self.unsent_releases
        if not pending:
            return
        now = time.monotonic()
        due = force or len(pending) >= self._release_at or now - self._last_flush >= RELEASE_DELAY
        rings = self.rings
        if not due and not rings:
            return
        groups: dict[Any, list[int]] = {}
        while pending:
            peer, slot_id = pending.popleft()
            groups.setdefault(peer, []).append(slot_id)
        held: list[tuple[Any, int]] = []
        for peer, ids in groups.items():
            ring = rings.get(peer)
            if ring is not None and ring.reader:
                # Into the producer's ring at once: it costs no frame, so nothing waits.
                ring.was_read = True
                done = ring.put(ids)
                self.ring_releases += done
                ids = ids[done:]  # the ring is full: the rest go as a frame
                if not ids:
                    continue
            if not due:
                held.extend((peer, slot_id) for slot_id in ids)
                continue
            producer = self.producers.get(peer, "unknown")
            for i in range(0, len(ids), _RELEASE_CHUNK):
                if send(peer, producer, ids[i : i + _RELEASE_CHUNK]):
                    self.releases_sent += 1
        if held:
            pending.extend(held)
        if due:
            self._last_flush = now
            if self.cache.mapped_count != self._mapped:
                self.forget_gone()  # a new segment may replace ones its producer dropped

    def look_for_gone(self) -> None:
        """Every ``GONE_LOOK_EVERY`` s, :meth:`forget_gone` (a stat per mapped segment): a
        producer that trims its pool maps no new segment, which is when flush looks."""
        if self.cache.mapped_count:
            now = time.monotonic()
            if now >= self._next_gone_look:
                self._next_gone_look = now + GONE_LOOK_EVERY
                self.forget_gone()

    def forget_gone(self) -> None:
        """Unmap cached segments whose producer unlinked them (closed, trimmed or died)."""
        for name in self.cache.mapped:
            if not os.path.exists(os.path.join(SHM_DIR, name)):
                self.cache.forget(name)
        self._mapped = self.cache.mapped_count

    def statistics(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "copies": self.copies,
            "live_views": self.cache.live_views,
            "mapped_segments": len(self.cache.mapped),
            "releases_pending": len(self.unsent_releases),
            "release_frames": self.releases_sent,
            "ring_releases": self.ring_releases,
            "release_rings": len(self.rings),
        }

    def close(self) -> None:
        """Stop queuing releases; unmap segments no view uses (the rest when their views go)."""
        self._closed = True
        self.unsent_releases.clear()
        rings, self.rings = self.rings, {}
        for ring in rings.values():
            ring.close()
        self.cache.close()


def release(view: np.ndarray | memoryview) -> bool:
    """Give a received shared-memory view back to its producer now, instead of at GC.

    Returns False if it was already released. The caller promises not to read ``view`` (or
    anything derived from it) afterwards: the producer may reuse the memory at once.
    Raises ValueError for an object that is not a view of a shared-memory slot.
    """
    lease = _find_lease(view)
    if lease is None:
        raise ValueError(
            "release() needs an array or memoryview received from an shm queue "
            f"(got {type(view).__name__} not backed by a shared-memory slot)"
        )
    return lease.release()


def is_shared(obj: object) -> bool:
    """Whether ``obj`` is (a view of) a received shared-memory slot."""
    return _find_lease(obj) is not None


__all__ = [
    "EXT_SHM_REF",
    "InlineBytes",
    "ShmReceiver",
    "ShmSender",
    "dtype_from_wire",
    "dtype_to_wire",
    "is_shared",
    "pack_ref",
    "release",
    "unpack_ref",
]
