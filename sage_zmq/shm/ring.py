"""A release ring: a consumer hands slots back to their producer through shared memory.

A RELEASE frame costs each side a trip through ZeroMQ: a syscall, a wake-up of the I/O
thread, on a small VM a context switch. Sent one per payload they cost more than a 1 MiB copy
saves; collected into batches they keep slots out of the pool for longer, so the producer's
copies land in memory that has left the cache. A ring lets the consumer write each release
into memory the producer reads at its next allocation, with no frame at all
(``transports/PROTOCOL.md`` §6, "Release ring").

The consumer creates one ring per producer connection and names it in its CREDITs; the
producer maps it and writes its pid into the header (``attach``). Until then, and whenever
the ring is full, releases go as RELEASE frames, so a producer that ignores the ring loses
nothing.

Layout (native byte order; both ends are on one host): eight 64-bit header words (magic,
capacity, the attached reader's pid, five reserved) and ``capacity`` 64-bit entries. An entry
is 0 when empty, else ``slot + 1``. One writer (the consumer) and one reader (the producer),
each with its own position: the writer fills an entry only when it reads 0 there, the reader
takes an entry only when it reads non-zero there and then writes 0. Each entry is one aligned
8-byte word, so neither side ever sees half of one.

Order matters once: the consumer's reads of a slot must be done before the producer sees the
slot's release and writes there. x86 never lets a store pass an earlier load; weaker memory
models (ARM, POWER) do, and Python has no fence to prevent it. And an entry must be written in
one store, which 32-bit x86 does not promise for 8 bytes. So rings are used on x86-64 only
(:data:`SUPPORTED`); elsewhere releases travel as frames, as before.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import secrets
import stat
import sys
import time
import weakref

from sage_zmq.shm.pool import ShmError, _create_segment, _unlink_names, _valid_name, owned_file
from sage_zmq.shm.sweep import DEFAULT_PREFIX, SHM_DIR, owner_pid, pid_alive, segment_name

MAGIC = int.from_bytes(b"SZRING01", sys.byteorder)
HEADER_WORDS = 8
ENTRIES = 4096
"""Releases a ring holds before the consumer falls back to frames (32 KiB of entries)."""

SUPPORTED = platform.machine().lower() in {"x86_64", "amd64"} and sys.maxsize > 2**32
"""Whether this CPU orders a store after earlier loads and stores 8 aligned bytes at once (see
the module docstring); a 32-bit Python on x86-64 is left out too."""

_MAGIC, _CAPACITY, _READER = 0, 1, 2
_ID_LIMIT = 1 << 63  # §6: slot ids are below 2^63, so slot + 1 fits an entry
_MAX_CAPACITY = 1 << 20  # entries a reader accepts (8 MiB): a ring needs no more


class ReleaseRing:
    """One ring, as its consumer (:meth:`create`, writes) or its producer (:meth:`open`, reads)
    sees it. Neither end is thread-safe: each is used by the thread that owns its socket."""

    def __init__(self, name: str, mm: mmap.mmap, *, owner: bool) -> None:
        self.name = name
        self._mm = mm
        self._words = memoryview(mm).cast("Q")
        self.capacity = int(self._words[_CAPACITY])
        self._pos = 0
        self._names = [name] if owner else []
        self._finalizer = weakref.finalize(self, _unlink_names, self._names, os.getpid())
        self.was_read = False  # a reader attached at some point (the consumer's bookkeeping)
        self.created = time.monotonic()

    # -- ends -------------------------------------------------------------------------------

    @classmethod
    def create(cls, capacity: int | None = None, *, prefix: str = DEFAULT_PREFIX) -> ReleaseRing:
        """A new ring in ``/dev/shm`` (mode 0600), owned and unlinked by this process."""
        if capacity is None:
            capacity = ENTRIES  # read now, so that ENTRIES can be changed (tests)
        name = segment_name(prefix, os.getpid(), secrets.token_hex(4), 0)
        mm = _create_segment(name, 8 * (HEADER_WORDS + capacity), prefault=True)
        words = memoryview(mm).cast("Q")
        words[_CAPACITY] = capacity
        words[_MAGIC] = MAGIC
        words.release()
        return cls(name, mm, owner=True)

    @classmethod
    def open(cls, name: str) -> ReleaseRing:
        """Map the ring a consumer named, after the checks §6 asks of any segment."""
        if not isinstance(name, str) or not _valid_name(name):
            raise ShmError(f"release ring name {name!r} is not a valid segment name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ShmError(f"cannot open release ring {path}: {exc}") from exc
        try:
            st = owned_file(fd, path)
            if (
                st.st_size < 8 * (HEADER_WORDS + 1)
                or st.st_size > 8 * (HEADER_WORDS + _MAX_CAPACITY)
                or st.st_size % 8
            ):
                raise ShmError(f"release ring {path} has a bad size ({st.st_size} bytes)")
            try:
                mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED)
            except OSError as exc:
                raise ShmError(f"cannot map release ring {path}: {exc}") from None
        finally:
            os.close(fd)
        words = memoryview(mm).cast("Q")
        ok = words[_MAGIC] == MAGIC and words[_CAPACITY] == st.st_size // 8 - HEADER_WORDS
        words.release()
        if not ok:
            mm.close()
            raise ShmError(f"{path} is not a release ring (bad magic or capacity)")
        return cls(name, mm, owner=False)

    # -- the reader's header word -----------------------------------------------------------

    @property
    def reader(self) -> int:
        """The pid of the producer reading this ring (0: none, use frames)."""
        if self._mm.closed:
            return 0
        return int(self._words[_READER])

    def attach(self) -> None:
        self._words[_READER] = os.getpid()

    def detach(self) -> None:
        if not self._mm.closed and self._words[_READER] == os.getpid():
            self._words[_READER] = 0

    # -- entries ----------------------------------------------------------------------------

    def put(self, slot_ids: list[int]) -> int:
        """Write releases in order until the ring is full; returns how many went in."""
        words, cap, i = self._words, self.capacity, self._pos
        done = 0
        for slot_id in slot_ids:
            at = HEADER_WORDS + i
            if words[at] or not 0 <= slot_id < _ID_LIMIT:
                break  # full (the reader has not taken this one yet), or an id for a frame
            words[at] = slot_id + 1
            done += 1
            i = i + 1 if i + 1 < cap else 0
        self._pos = i
        return done

    def take(self) -> list[int]:
        """The releases written since the last take, oldest first (empty: nothing new)."""
        words, i = self._words, self._pos
        at = HEADER_WORDS + i
        if not words[at]:
            return []
        cap = self.capacity
        out: list[int] = []
        for _ in range(cap):  # one lap at most: a writer that never stops cannot hold us here
            value = words[at]
            if not value:
                break
            words[at] = 0
            out.append(value - 1)
            i = i + 1 if i + 1 < cap else 0
            at = HEADER_WORDS + i
        self._pos = i
        return out

    # -- the end ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def close(self) -> None:
        """Unmap. The creating process unlinks the file; so does a reader whose consumer
        died (SIGKILL: nobody else would, until some later sweep)."""
        if self._mm.closed:
            return
        self.detach()
        self._words.release()
        with contextlib.suppress(BufferError):
            self._mm.close()
        self._finalizer()
        owner = owner_pid(self.name)
        if owner is not None and owner != os.getpid() and not pid_alive(owner):
            path = os.path.join(SHM_DIR, self.name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                    os.unlink(path)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"reader={self.reader}"
        return f"<ReleaseRing {self.name} capacity={self.capacity} {state}>"
