"""Shared-memory slots: a producer-owned pool and a consumer-side zero-copy segment cache.

The producer copies a large payload into a :class:`Slot` of its :class:`SharedMemoryPool` and
sends only ``slot.ref()`` over ZeroMQ. The consumer's :class:`SegmentCache` maps the segment once
and hands out numpy arrays / memoryviews that point straight into it; when the last reference to
such a view goes away, ``on_release(slot_id)`` fires once so the consumer can tell the producer
to ``pool.release(slot_id)``.

Segments are files under ``/dev/shm`` created with mode 0600, reserved with ``posix_fallocate``
(so a full ``/dev/shm`` is an error at creation, not a SIGBUS on first write) and mapped with
``MAP_POPULATE`` (writes into already-mapped pages run at memcpy speed; first-touch faults cost
several times that), then reused for the life of the pool.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import itertools
import logging
import math
import mmap
import os
import secrets
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from sage_zmq.errors import DecodeError, Full, QueueClosed, SageZmqError, SecurityError
from sage_zmq.shm.sweep import DEFAULT_PREFIX, SHM_DIR, segment_name, sweep_orphans

log = logging.getLogger(__name__)

ALIGN = 64
"""Slot offsets and sizes are multiples of this (cache line; keeps numpy dtypes aligned)."""

DEFAULT_SEGMENT_BYTES = 64 << 20

_PAGE = mmap.PAGESIZE
_PREFIX_RE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

OnRelease = Callable[[int], object]


class ShmError(SageZmqError):
    """A shared-memory segment could not be created, opened or mapped."""


class SlotSizeError(ShmError, ValueError):
    """A requested slot size is not a positive int."""


class PayloadTooLarge(SlotSizeError):
    """A payload is larger than the whole pool; send it inline or raise the capacity."""


class PoolClosed(QueueClosed):
    """The pool was closed; no more slots can be allocated from it."""


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@functools.lru_cache(maxsize=1024)  # a few segments, named in every reference
def _valid_name(name: str) -> bool:
    # Names arrive from the wire and become paths: allow no '/', no leading dot.
    return bool(name) and not name.startswith(".") and set(name) <= _PREFIX_RE_CHARS


# --------------------------------------------------------------------------------------------
# wire reference


class SlotRef(NamedTuple):
    """What goes on the wire instead of the payload (msgpack encodes it as a 4-list)."""

    segment: str
    offset: int
    nbytes: int
    slot_id: int

    @classmethod
    def parse(cls, obj: object) -> SlotRef:
        """Validate a ref decoded from the wire; raise DecodeError naming what is wrong."""
        if isinstance(obj, SlotRef):
            return obj
        if obj.__class__ is list and len(obj) == 4:  # as msgpack decodes it: check it in one go
            segment, offset, nbytes, slot_id = obj
            if (
                segment.__class__ is str
                and offset.__class__ is int
                and nbytes.__class__ is int
                and slot_id.__class__ is int
                and offset >= 0
                and nbytes >= 1
                and slot_id >= 0
                and _valid_name(segment)
            ):
                return cls(segment, offset, nbytes, slot_id)
        return cls._parse_checked(obj)

    @classmethod
    def _parse_checked(cls, obj: object) -> SlotRef:
        # Every check one by one, to name the field that is wrong.
        if not isinstance(obj, Sequence) or isinstance(obj, str | bytes) or len(obj) != 4:
            raise DecodeError(
                f"shm ref must be [segment, offset, nbytes, slot_id], got {obj!r:.200}"
            )
        segment, offset, nbytes, slot_id = obj
        if not isinstance(segment, str) or not _valid_name(segment):
            raise DecodeError(f"shm ref has an invalid segment name {segment!r:.100}")
        for field, value, low in (
            ("offset", offset, 0),
            ("nbytes", nbytes, 1),
            ("slot_id", slot_id, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DecodeError(f"shm ref field {field} must be an int >= {low}, got {value!r}")
        return cls(segment, offset, nbytes, slot_id)


# --------------------------------------------------------------------------------------------
# producer side


@dataclass(frozen=True, slots=True, eq=False)
class Slot:
    """A region of the pool owned by one in-flight payload until released.

    ``buffer`` is a writable memoryview of exactly ``nbytes``; it is released (made unusable)
    when the slot is released, so a late write fails instead of corrupting the next payload.
    """

    id: int
    segment: str
    offset: int
    nbytes: int
    buffer: memoryview
    address: int
    """Where the slot starts in this process's memory (for zero-copy array interfaces)."""

    def ref(self) -> SlotRef:
        """The small serializable reference to send instead of the payload."""
        return SlotRef(self.segment, self.offset, self.nbytes, self.id)

    def array(self, dtype: npt.DTypeLike, shape: int | Sequence[int]) -> np.ndarray:
        """A writable C-ordered array over the slot, to fill in place."""
        return np.ndarray(shape, dtype=dtype, buffer=self.buffer)

    def write(self, data: Any, offset: int = 0) -> int:
        """Copy a bytes-like object or any numpy array into the slot at ``offset``.

        Returns the number of bytes written. Non-contiguous arrays are copied in C order.
        """
        if isinstance(data, np.ndarray):
            if data.dtype.hasobject:
                raise TypeError("cannot place an object-dtype array in shared memory")
            if not data.flags.c_contiguous:
                self._check_room(offset, data.nbytes)
                dst = np.ndarray(data.shape, dtype=data.dtype, buffer=self.buffer, offset=offset)
                np.copyto(dst, data)
                return int(data.nbytes)
        # A byte-format memoryview slice assignment is one memcpy with no array objects to
        # build: for a 64 KiB payload about half the cost of the numpy assignment it replaced.
        try:
            src = memoryview(data).cast("B")
        except (TypeError, ValueError):  # formats a buffer cannot carry (datetime64, 0-size)
            flat = (
                data.reshape(-1) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
            )
            src = flat.view(np.uint8).data
        n = src.nbytes
        self._check_room(offset, n)
        self.buffer[offset : offset + n] = src
        return n

    def _check_room(self, offset: int, n: int) -> None:
        if offset < 0 or offset + n > self.nbytes:
            raise SlotSizeError(
                f"{n} bytes at offset {offset} do not fit in slot {self.id} of {self.nbytes} bytes"
            )


def _slot_factory() -> Callable[[int, str, int, int, memoryview, int], Slot]:
    # What Slot(...) builds, in half the time: the frozen dataclass's __init__ calls
    # object.__setattr__ per field, where the fields' own slot descriptors set them directly
    # (SharedMemoryPool.alloc builds one Slot per payload).
    new = object.__new__
    fields = Slot.__dict__
    set_id, set_segment, set_offset, set_nbytes, set_buffer, set_address = (
        fields[name].__set__ for name in ("id", "segment", "offset", "nbytes", "buffer", "address")
    )

    def new_slot(
        slot_id: int, segment: str, offset: int, nbytes: int, buffer: memoryview, address: int
    ) -> Slot:
        slot: Slot = new(Slot)
        set_id(slot, slot_id)
        set_segment(slot, segment)
        set_offset(slot, offset)
        set_nbytes(slot, nbytes)
        set_buffer(slot, buffer)
        set_address(slot, address)
        return slot

    return new_slot


_new_slot = _slot_factory()


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool. Byte counts are of 64-byte-aligned slot sizes."""

    capacity: int
    reserved: int
    used: int
    slots_in_use: int
    allocs: int
    releases: int
    waits: int
    bad_releases: int
    segments: tuple[str, ...]


class _Segment:
    """One mapped segment and its first-fit free list (sorted, coalesced)."""

    __slots__ = (
        "address",
        "free_len",
        "free_off",
        "idle_since",
        "live",
        "mm",
        "name",
        "size",
        "view",
    )

    def __init__(self, name: str, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self.mm = mm
        self.view = memoryview(mm)
        self.address = address_of(mm)
        self.free_off: list[int] = [0]
        self.free_len: list[int] = [size]
        self.live = 0
        self.idle_since = time.monotonic()  # when ``live`` last dropped to 0

    def take(self, need: int) -> int | None:
        for i, length in enumerate(self.free_len):
            if length >= need:
                off = self.free_off[i]
                if length == need:
                    del self.free_off[i], self.free_len[i]
                else:
                    self.free_off[i] = off + need
                    self.free_len[i] = length - need
                return off
        return None

    def give(self, off: int, size: int) -> None:
        i = bisect.bisect_left(self.free_off, off)
        merge_prev = i > 0 and self.free_off[i - 1] + self.free_len[i - 1] == off
        merge_next = i < len(self.free_off) and off + size == self.free_off[i]
        if merge_prev and merge_next:
            self.free_len[i - 1] += size + self.free_len[i]
            del self.free_off[i], self.free_len[i]
        elif merge_prev:
            self.free_len[i - 1] += size
        elif merge_next:
            self.free_off[i] = off
            self.free_len[i] += size
        else:
            self.free_off.insert(i, off)
            self.free_len.insert(i, size)

    @property
    def idle(self) -> bool:
        return self.live == 0

    def free_runs(self) -> list[tuple[int, int]]:
        return list(zip(self.free_off, self.free_len, strict=True))


def owned_file(fd: int, path: str) -> os.stat_result:
    """The stat of a segment just opened (with O_NOFOLLOW): a regular file of this user, or
    SecurityError (§6: nothing else is mapped)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        raise SecurityError(
            f"refusing to map {path}: not a regular file owned by uid {os.getuid()}"
        )
    return st


def address_of(buffer: Any) -> int:
    """The address of a buffer's first byte (the temporary export ends before returning)."""
    return int(np.frombuffer(buffer, np.uint8).__array_interface__["data"][0])


def byte_interface(address: int, nbytes: int, readonly: bool) -> dict[str, Any]:
    """An ``__array_interface__`` for ``nbytes`` bytes at ``address``: built once per owner,
    where numpy would build a new dict on every read of an array's."""
    return {"version": 3, "shape": (nbytes,), "typestr": "|u1", "data": (address, readonly)}


def _create_segment(name: str, size: int, prefault: bool) -> mmap.mmap:
    path = os.path.join(SHM_DIR, name)
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ShmError(f"cannot create shared-memory segment {path}: {exc}") from exc
    try:
        os.fchmod(fd, 0o600)  # umask can only narrow the mode; state it outright anyway
        try:
            # Reserve the pages now: on a full /dev/shm this fails cleanly instead of SIGBUS later.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)
        map_flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
        return mmap.mmap(fd, size, flags=map_flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        os.unlink(path)
        hint = (
            " (/dev/shm is full: lower the pool capacity or enlarge /dev/shm)"
            if (exc.errno == errno.ENOSPC)
            else ""
        )
        raise ShmError(f"cannot allocate {size} bytes for {path}: {exc}{hint}") from exc
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def _unlink_names(names: list[str], owner: int) -> None:
    # Runs from close(), GC or atexit; a forked child must not unlink its parent's segments.
    if os.getpid() != owner:
        return
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    names.clear()


def _unmap(seg: _Segment) -> None:
    seg.view.release()
    # BufferError: a caller still holds a slot view; the mapping goes when that view is collected.
    with contextlib.suppress(BufferError):
        seg.mm.close()


class SharedMemoryPool:
    """Producer-owned shared-memory slots, reused across payloads. Thread-safe.

    The first segment (``segment_bytes``, default min(capacity, 64 MiB)) is created and
    pre-faulted up front; more are added on demand up to ``capacity_bytes``. A payload larger
    than ``segment_bytes`` gets a segment of its own size. Fully idle segments are dropped when
    room is needed for a new one, or on :meth:`trim` (the producer's sender calls it now and
    then, see ShmSender._free_sent); ``on_segment_removed(name)`` is then
    called (outside the pool's lock) so consumers can be told to ``forget`` it.

    :meth:`alloc` blocks while the pool is full and raises :class:`~sage_zmq.errors.Full` on
    timeout; :class:`ShmError` means the OS refused memory. Either way, send the payload inline.
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        segment_bytes: int | None = None,
        name_prefix: str = DEFAULT_PREFIX,
        prefault: bool = True,
        sweep: bool = True,
        on_segment_removed: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise SlotSizeError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if segment_bytes is not None and (not isinstance(segment_bytes, int) or segment_bytes <= 0):
            raise SlotSizeError(f"segment_bytes must be a positive int, got {segment_bytes!r}")
        if not _valid_name(name_prefix):
            raise ValueError(
                f"name_prefix {name_prefix!r} may only hold letters, digits, '_', '.', '-' "
                "and must not start with '.'"
            )
        self._capacity = _round_up(capacity_bytes, _PAGE)
        seg_bytes = min(segment_bytes or DEFAULT_SEGMENT_BYTES, capacity_bytes)
        self._segment_bytes = _round_up(seg_bytes, _PAGE)
        self._prefix = name_prefix
        self._prefault = prefault
        self._on_segment_removed = on_segment_removed
        self._pid = os.getpid()
        self._token = secrets.token_hex(4)
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        # Reentrant: a consumer view collected by the GC inside our own critical section may
        # call release() on this thread (in-process use, on_release=pool.release).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0  # allocators blocked in _cond.wait: releases notify only then
        self._segments: list[_Segment] = []
        self._slots: dict[int, tuple[_Segment, Slot, int]] = {}
        self._names: list[str] = []  # shared with the finalizer, which must not hold self
        self._reserved = self._used = 0
        self._allocs = self._releases = self._waits = self._bad_releases = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _unlink_names, self._names, self._pid)
        if sweep:
            for name in sweep_orphans(name_prefix):
                log.info("removed orphaned shared-memory segment %s", name)
        with self._cond:
            self._add_segment(self._segment_bytes)

    # -- allocation -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def slots_in_use(self) -> int:
        """Slots not yet released (a lock-free snapshot)."""
        return len(self._slots)

    def alloc(self, nbytes: int, timeout: float | None = None, *, grow: bool = True) -> Slot:
        """A slot of ``nbytes``; waits up to ``timeout`` s (None: forever, 0: not at all).

        ``grow=False`` only looks in existing segments: creating and pre-faulting one costs
        far more than copying a payload, so a caller that can get room back another way
        (reading releases) tries that first.
        """
        if nbytes.__class__ is not int or nbytes <= 0:
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
                raise SlotSizeError(f"nbytes must be a positive int, got {nbytes!r}")
            nbytes = int(nbytes)
        need = -(-nbytes // ALIGN) * ALIGN
        if need > self._capacity:
            raise PayloadTooLarge(
                f"payload of {nbytes} bytes exceeds the shared-memory pool capacity of "
                f"{self._capacity} bytes; send it inline or raise the capacity"
            )
        removed: list[str] = []
        with self._lock:  # the RLock itself: entering the Condition costs a Python call
            if self._closed:
                raise PoolClosed("the shared-memory pool is closed")
            placed = self._place(need, removed, grow)
            if placed is None:
                placed = self._wait_for_room(nbytes, need, removed, grow, timeout)
            seg, off = placed
            slot_id = next(self._ids)
            view = seg.view[off : off + nbytes]
            slot = _new_slot(slot_id, seg.name, off, nbytes, view, seg.address + off)
            self._slots[slot_id] = (seg, slot, need)
            seg.live += 1
            self._used += need
            self._allocs += 1
        if removed:
            self._notify_removed(removed)
        return slot

    def _wait_for_room(
        self, nbytes: int, need: int, removed: list[str], grow: bool, timeout: float | None
    ) -> tuple[_Segment, int]:
        # Called with the lock held, after a look that found no room.
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Full(
                    f"shared-memory pool has no room for {nbytes} bytes within {timeout} s "
                    f"({self._used} of {self._capacity} bytes in use by "
                    f"{len(self._slots)} slots); send the payload inline"
                )
            if not waited:
                waited = True
                self._waits += 1
            self._waiters += 1
            try:
                self._cond.wait(remaining)
            finally:
                self._waiters -= 1
            if self._closed:
                raise PoolClosed("the shared-memory pool is closed")
            placed = self._place(need, removed, grow)
            if placed is not None:
                return placed

    def _place(
        self, need: int, removed: list[str], grow: bool = True
    ) -> tuple[_Segment, int] | None:
        for seg in self._segments:
            off = seg.take(need)
            if off is not None:
                return seg, off
        if not grow:
            return None
        headroom = self._capacity - self._reserved
        if headroom < need:
            idle = sorted((s for s in self._segments if s.idle), key=lambda s: s.size)
            if headroom + sum(s.size for s in idle) < need:
                return None
            for seg in idle:  # smallest first, so big pre-faulted segments survive if possible
                if headroom >= need:
                    break
                self._drop_segment(seg)
                removed.append(seg.name)
                headroom += seg.size
        size = min(max(self._segment_bytes, _round_up(need, _PAGE)), headroom)
        seg = self._add_segment(size)
        off = seg.take(need)
        assert off is not None
        return seg, off

    def _add_segment(self, size: int) -> _Segment:
        name = segment_name(self._prefix, self._pid, self._token, next(self._seq))
        self._names.append(name)  # before creating, so atexit covers a half-made segment too
        try:
            mm = _create_segment(name, size, self._prefault)
        except BaseException:
            self._names.remove(name)
            raise
        seg = _Segment(name, size, mm)
        self._segments.append(seg)
        self._reserved += size
        return seg

    def _drop_segment(self, seg: _Segment) -> None:
        self._segments.remove(seg)
        self._reserved -= seg.size
        if os.getpid() == self._pid:
            try:
                os.unlink(os.path.join(SHM_DIR, seg.name))
            except FileNotFoundError:
                log.warning(
                    "shared-memory segment %s vanished before its pool removed it", seg.name
                )
        self._names.remove(seg.name)
        _unmap(seg)

    def _notify_removed(self, names: list[str]) -> None:
        if self._on_segment_removed is None:
            return
        for name in names:
            try:
                self._on_segment_removed(name)
            except Exception:
                log.exception("on_segment_removed(%r) failed", name)

    # -- release ----------------------------------------------------------------------------

    def release(self, slot_id: int) -> bool:
        """Return a slot to the pool. An unknown or already released id is logged, counted in
        ``bad_releases`` and ignored (ids are never reused, so it cannot free someone else's slot).
        """
        with self._lock:
            entry = self._slots.pop(slot_id, None)
            if entry is None:
                self._bad_releases += 1
                log.warning("release of unknown or already released shm slot %r ignored", slot_id)
                return False
            seg, slot, need = entry
            # try/except, not contextlib.suppress: this runs once per payload.
            try:  # noqa: SIM105
                slot.buffer.release()
            except BufferError:
                pass  # the producer still holds an array over the slot; nothing more to do
            seg.give(slot.offset, need)
            seg.live -= 1
            if not seg.live:
                seg.idle_since = time.monotonic()
            self._used -= need
            self._releases += 1
            if self._waiters:
                self._cond.notify_all()
        return True

    def in_use(self) -> list[int]:
        """Ids of the slots not yet released (e.g. to reclaim a vanished consumer's slots)."""
        with self._cond:
            return list(self._slots)

    def trim(self, idle_for: float = 0.0) -> list[str]:
        """Drop every segment except the first that has been fully idle for ``idle_for``
        seconds or more; return the names removed."""
        with self._cond:
            since = time.monotonic() - idle_for
            doomed = [s for s in self._segments[1:] if s.idle and s.idle_since <= since]
            for seg in doomed:
                self._drop_segment(seg)
        removed = [s.name for s in doomed]
        self._notify_removed(removed)
        return removed

    # -- introspection / lifetime -----------------------------------------------------------

    def statistics(self) -> PoolStatistics:
        with self._cond:
            return PoolStatistics(
                capacity=self._capacity,
                reserved=self._reserved,
                used=self._used,
                slots_in_use=len(self._slots),
                allocs=self._allocs,
                releases=self._releases,
                waits=self._waits,
                bad_releases=self._bad_releases,
                segments=tuple(s.name for s in self._segments),
            )

    def free_runs(self) -> dict[str, list[tuple[int, int]]]:
        """Free (offset, length) runs per segment; for tests and debugging."""
        with self._cond:
            return {s.name: s.free_runs() for s in self._segments}

    def close(self) -> None:
        """Unlink all segments and wake blocked allocators (they raise PoolClosed).

        Consumers that already mapped a segment keep their views valid; the memory is returned
        to the OS once the last mapping goes.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            segments, self._segments = self._segments, []
            for _seg, slot, _need in self._slots.values():
                with contextlib.suppress(BufferError):
                    slot.buffer.release()
            self._slots.clear()
            self._reserved = self._used = 0
        self._finalizer()
        for seg in segments:
            _unmap(seg)

    def __enter__(self) -> SharedMemoryPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._used}/{self._capacity} bytes used"
        return f"<SharedMemoryPool {self._prefix}{self._pid}-{self._token} {state}>"


# --------------------------------------------------------------------------------------------
# consumer side


class _Lease:
    """Owner of one slot view; every array/memoryview handed out has it in its ``.base`` chain,
    so it dies (and its cache fires ``on_release``) only when the last view is gone.

    It exposes the slot's bytes through a fixed ``__array_interface__`` (numpy reads the
    address from it) and holds its segment's export, which keeps the mapping alive.
    """

    __slots__ = ("__array_interface__", "__weakref__", "_export", "cache", "key")

    def __init__(
        self, cache: SegmentCache, key: tuple[str, int], m: _Mapping, offset: int, nbytes: int
    ) -> None:
        self._export = m.export
        self.cache = cache
        self.key = key
        self.__array_interface__ = byte_interface(m.address + offset, nbytes, m.readonly)

    def release(self) -> bool:
        """End the lease now (fires ``on_release``); False if it had already ended."""
        return self.cache._end(self.key)


class _LeaseRef(weakref.ref[_Lease]):
    __slots__ = ("key",)
    key: tuple[str, int]


class _Mapping:
    __slots__ = ("address", "export", "leases", "mm", "readonly", "size")

    def __init__(self, mm: mmap.mmap, size: int, readonly: bool) -> None:
        self.mm = mm
        self.size = size
        self.leases = 0
        self.readonly = readonly
        # One export per mapping, shared by its leases: while any lease holds it the mmap
        # cannot be closed under a view; forget() drops it, and the last lease unmaps.
        self.export: np.ndarray | None = np.frombuffer(mm, np.uint8)
        self.address = address_of(self.export)


def _find_lease(obj: object) -> _Lease | None:
    seen = 0
    while obj is not None and seen < 64:
        if isinstance(obj, _Lease):
            return obj
        if isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, np.ndarray):
            obj = obj.base
        else:
            return None
        seen += 1
    return None


class SegmentCache:
    """Consumer side: maps each producer segment once, hands out zero-copy views of slots.

    ``on_release(slot_id)`` runs exactly once per view, in whichever thread drops the last
    reference (or calls :meth:`release`), possibly from the garbage collector: keep it short and
    thread-safe (e.g. push onto a queue that the socket thread drains; never touch a ZeroMQ socket
    from it). It is not called at interpreter exit. Views are read-only unless ``writable``.
    """

    def __init__(self, *, writable: bool = False, prefault: bool = True) -> None:
        self._writable = writable
        self._prefault = prefault
        self._lock = threading.RLock()  # finalizers may run inside our own critical sections
        self._maps: dict[str, _Mapping] = {}
        self._leases: dict[tuple[str, int], tuple[_LeaseRef, int, OnRelease]] = {}

    # -- mapping ----------------------------------------------------------------------------

    def _mapping(self, ref: SlotRef) -> _Mapping:
        m = self._maps.get(ref.segment)
        if m is None:
            m = self._map(ref.segment)
            self._maps[ref.segment] = m
        if ref.offset + ref.nbytes > m.size:
            raise DecodeError(
                f"shm ref {tuple(ref)} reaches past the end of segment {ref.segment} "
                f"({m.size} bytes)"
            )
        return m

    def _map(self, name: str) -> _Mapping:
        path = os.path.join(SHM_DIR, name)
        flags = (os.O_RDWR if self._writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise ShmError(
                f"shared-memory segment {name} is gone: its producer closed it or exited"
            ) from None
        except OSError as exc:
            raise ShmError(f"cannot open shared-memory segment {path}: {exc}") from exc
        try:
            st = owned_file(fd, path)
            if st.st_size == 0:
                raise ShmError(f"shared-memory segment {path} is empty")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self._writable else 0)
            map_flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if self._prefault else 0)
            mm = mmap.mmap(fd, st.st_size, flags=map_flags, prot=prot)
        finally:
            os.close(fd)
        return _Mapping(mm, st.st_size, readonly=not self._writable)

    def _lease(self, ref: SlotRef, on_release: OnRelease) -> _Lease:
        key = (ref.segment, ref.slot_id)
        with self._lock:
            if key in self._leases:
                raise DecodeError(f"shm slot {ref.slot_id} of {ref.segment} is already viewed")
            m = self._mapping(ref)
            lease = _Lease(self, key, m, ref.offset, ref.nbytes)
            # A weakref callback rather than weakref.finalize: a finalizer costs microseconds
            # to create and call, and a payload goes through here on every get.
            watch = _LeaseRef(lease, self._lease_collected)
            watch.key = key
            self._leases[key] = (watch, ref.slot_id, on_release)
            m.leases += 1
        return lease

    def _lease_collected(self, watch: _LeaseRef) -> None:
        self._end(watch.key)

    def _end(
        self, key: tuple[str, int], _finalizing: Callable[[], bool] = sys.is_finalizing
    ) -> bool:
        """End a lease once, from whichever comes first: its last view dying or a release."""
        with self._lock:
            entry = self._leases.pop(key, None)
            if entry is None:
                return False
            m = self._maps.get(key[0])
            if m is not None:
                m.leases -= 1
        if _finalizing():  # bound at definition: module globals may be gone by then
            return True  # at exit the control channel is gone; nothing to tell
        _watch, slot_id, on_release = entry
        try:
            on_release(slot_id)
        except Exception:
            log.exception("on_release(%d) for shm segment %s failed", slot_id, key[0])
        return True

    # -- views ------------------------------------------------------------------------------

    def view(self, ref: SlotRef | Sequence[Any], on_release: OnRelease) -> memoryview:
        """A zero-copy memoryview (format 'B') of the slot."""
        lease = self._lease(SlotRef.parse(ref), on_release)
        return np.asarray(lease).data

    def array(
        self,
        ref: SlotRef | Sequence[Any],
        dtype: npt.DTypeLike,
        shape: int | Sequence[int],
        strides: Sequence[int] | None = None,
        *,
        on_release: OnRelease,
    ) -> np.ndarray:
        """A zero-copy numpy array over the slot."""
        r = SlotRef.parse(ref)
        dt = _safe_dtype(dtype)
        # Validate before leasing so a bad ref does not fire on_release for a view never made.
        with self._lock:
            self._mapping(r)
        shp = _check_layout(r, dt, shape, strides)
        lease = self._lease(r, on_release)
        return np.ndarray(shp, dtype=dt, buffer=np.asarray(lease), strides=strides)

    def exact_array(
        self, ref: SlotRef, dtype: np.dtype[Any], shape: tuple[int, ...], on_release: OnRelease
    ) -> np.ndarray:
        """:meth:`array` for a C-ordered layout already checked to fill the slot exactly
        (:func:`~sage_zmq.shm.transfer.unpack_ref` checks it): the per-payload path."""
        lease = self._lease(ref, on_release)
        return np.asarray(lease).view(dtype).reshape(shape)

    def copy_out(
        self,
        ref: SlotRef | Sequence[Any],
        *,
        on_release: OnRelease | None = None,
        dtype: npt.DTypeLike | None = None,
        shape: int | Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
    ) -> bytes | np.ndarray:
        """Copy the slot out (bytes, or an owned array if ``dtype`` is given), then release it."""
        r = SlotRef.parse(ref)
        with self._lock:
            m = self._mapping(r)
            if dtype is None:
                out: bytes | np.ndarray = m.mm[r.offset : r.offset + r.nbytes]
            else:
                dt = _safe_dtype(dtype)
                shp = _check_layout(
                    r, dt, r.nbytes // dt.itemsize if shape is None else shape, strides
                )
                src = np.ndarray(shp, dtype=dt, buffer=m.mm, offset=r.offset, strides=strides)
                out = src.copy()
                del src
        if on_release is not None:
            on_release(r.slot_id)
        return out

    def release(self, target: np.ndarray | memoryview | SlotRef | Sequence[Any]) -> bool:
        """Release a view now (fires its on_release unless already fired).

        ``target`` is a view returned by this cache (or one derived from it) or its ref. The
        caller promises not to touch that view afterwards: the producer may reuse the slot.
        """
        if isinstance(target, np.ndarray | memoryview):
            lease = _find_lease(target)
            if lease is None or lease.cache is not self:
                raise ValueError("release() needs a view returned by this SegmentCache")
            return self._end(lease.key)
        r = SlotRef.parse(target)
        return self._end((r.segment, r.slot_id))

    # -- segments ---------------------------------------------------------------------------

    def forget(self, segment: str) -> None:
        """Stop caching a segment (its producer dropped it). Unmapped now if no view uses it,
        otherwise when the last view of it is collected."""
        with self._lock:
            m = self._maps.pop(segment, None)
        if m is None:
            return
        m.export = None
        if m.leases:
            return  # live views hold the export; CPython unmaps when the last one goes
        with contextlib.suppress(BufferError):
            m.mm.close()

    def close(self) -> None:
        """Forget every segment. Views still alive stay valid and still fire on_release."""
        with self._lock:
            names = list(self._maps)
        for name in names:
            self.forget(name)

    @property
    def mapped_count(self) -> int:
        """How many segments are mapped (a lock-free snapshot)."""
        return len(self._maps)

    @property
    def mapped(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._maps)

    @property
    def live_views(self) -> int:
        with self._lock:
            return len(self._leases)

    def __enter__(self) -> SegmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise DecodeError(f"shm ref carries an invalid dtype {dtype!r}: {exc}") from exc
    if dt.hasobject:
        # Object pointers from another process would be wild pointers here.
        raise DecodeError(f"dtype {dt} holds Python objects and cannot live in shared memory")
    return dt


def _check_layout(
    ref: SlotRef, dt: np.dtype[Any], shape: int | Sequence[int], strides: Sequence[int] | None
) -> tuple[int, ...]:
    """Normalised shape, after checking the array fits inside the slot."""
    shp = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    if any(not isinstance(d, int | np.integer) or d < 0 for d in shp):
        raise DecodeError(f"shape {shp} must be a sequence of non-negative ints")
    if strides is None:
        extent = math.prod(shp) * dt.itemsize
    else:
        st = tuple(strides)
        if len(st) != len(shp) or any(not isinstance(s, int | np.integer) for s in st):
            raise DecodeError(f"strides {st} must be {len(shp)} ints to match shape {shp}")
        if any(s < 0 for s in st):
            raise DecodeError(f"negative strides {st} are not supported for shm views")
        extent = 0 if 0 in shp else sum((d - 1) * s for d, s in zip(shp, st, strict=True))
        extent += 0 if 0 in shp else dt.itemsize
    if extent > ref.nbytes:
        raise DecodeError(
            f"an array of shape {shp}, dtype {dt}, strides {strides} needs {extent} bytes "
            f"but shm slot {ref.slot_id} holds {ref.nbytes}"
        )
    return tuple(int(d) for d in shp)


__all__ = [
    "ALIGN",
    "DEFAULT_SEGMENT_BYTES",
    "Full",
    "PayloadTooLarge",
    "PoolClosed",
    "PoolStatistics",
    "SegmentCache",
    "SharedMemoryPool",
    "ShmError",
    "Slot",
    "SlotRef",
    "SlotSizeError",
]
