"""Consumer-side dedup state: the highest delivered seq (and last epoch) per producer id.

With a path, the state lives in a shared ``mmap`` of a file, updated in place: ``mark`` is a
memory store, which lands in the page cache at once and so survives SIGKILL of the process at
any instant; :meth:`DedupState.sync` (msync) adds survival of a machine crash.

File layout (native byte order, i.e. little-endian on the x86-64/arm64 hosts we run on)::

    header  64 bytes   magic b"SGDEDUP1" | u32 slot size | zero padding
    slot   128 bytes   u64 seq | u64 epoch | u64 tag | name (UTF-8, zero padded)

``tag`` is 0 for a free slot, else ``1<<63 | len(name)<<32 | crc32(name)``. A slot is
claimed by writing name, seq and epoch first and the tag last, and released by clearing the
tag first, so a process killed half way leaves a free slot, never a wrong one; a tag that does
not match its name is treated as torn and ignored. Every u64 sits 8-byte aligned and is
written with one native 8-byte store (``memoryview.cast("Q")``); we rely on such stores not
tearing, true of x86-64 and arm64. A slot never shares a u64 with another, so a torn write
could only damage its own slot. The table doubles (ftruncate + remap) when full.
"""

from __future__ import annotations

import fcntl
import heapq
import mmap
import os
import zlib
from types import TracebackType

from sage_zmq.errors import ConfigError, SageZmqError
from sage_zmq.flow.wal import MAX_PRODUCER_ID_BYTES, PersistLockedError

_MAGIC = b"SGDEDUP1"
_HEADER = 64
_SLOT = 128
_WORDS = _SLOT // 8
_NAME_OFF = 24
_TAG_BIT = 1 << 63
_MAX_U64 = 2**64 - 1
assert _SLOT - _NAME_OFF >= MAX_PRODUCER_ID_BYTES


class DedupClosed(SageZmqError):
    """The DedupState was closed; open a new one on the same path to continue."""


def _tag(name: bytes) -> int:
    return _TAG_BIT | (len(name) << 32) | zlib.crc32(name)


def _check_u64(what: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_U64:
        raise ValueError(f"{what} must be an int in [0, 2**64), got {value!r}")
    return value


class DedupState:
    """Per-producer high-water mark of delivered seqs; in memory when ``path`` is None.

    One process may hold a path at a time (flock). Seqs only move up: ``mark`` with a seq at
    or below the recorded one is a no-op.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, initial_slots: int = 64) -> None:
        if not isinstance(initial_slots, int) or initial_slots < 1:
            raise ConfigError(f"initial_slots must be an int >= 1, got {initial_slots!r}")
        self._path = None if path is None else os.fspath(path)
        self._fd = -1
        self._index: dict[str, int] = {}  # producer -> word index of its seq
        self._free: list[int] = []  # heap of free slot numbers
        if self._path is None:
            size = _HEADER + initial_slots * _SLOT
            self._mm = mmap.mmap(-1, size)
            self._mm[: len(_MAGIC)] = _MAGIC
        else:
            self._mm = self._open_file(self._path, initial_slots)
        self._mv = memoryview(self._mm)
        self._q = self._mv.cast("Q")  # released (so any access raises) once closed
        self._closed = False
        self._slots = (len(self._mm) - _HEADER) // _SLOT
        self._load()

    def _open_file(self, path: str, initial_slots: int) -> mmap.mmap:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PersistLockedError(
                    f"dedup state {path} is already open (in this or another process); each "
                    "consumer needs its own state file"
                ) from None
            size = os.fstat(self._fd).st_size
            if size == 0:
                os.ftruncate(self._fd, _HEADER + initial_slots * _SLOT)
                os.pwrite(self._fd, _MAGIC + _SLOT.to_bytes(4, "little"), 0)
            else:
                head = os.pread(self._fd, 12, 0)
                if head[:8] != _MAGIC or int.from_bytes(head[8:12], "little") != _SLOT:
                    raise ConfigError(
                        f"{path} is not a sage-zmq dedup state file (bad header {head!r}); "
                        "point persistence at a directory of its own, or remove the file"
                    )
                whole = _HEADER + max(1, (size - _HEADER + _SLOT - 1) // _SLOT) * _SLOT
                if whole != size:  # cut short by something else: pad to whole slots
                    os.ftruncate(self._fd, whole)
            return mmap.mmap(self._fd, os.fstat(self._fd).st_size)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _load(self) -> None:
        q = self._words()
        for slot in range(self._slots):
            w = (_HEADER + slot * _SLOT) // 8
            tag = q[w + 2]
            if tag == 0:
                self._free.append(slot)
                continue
            n = (tag >> 32) & 0x7FFF_FFFF
            off = w * 8 + _NAME_OFF
            raw = bytes(self._mv[off : off + n]) if n <= MAX_PRODUCER_ID_BYTES else b""
            try:
                name = raw.decode("utf-8") if raw and _tag(raw) == tag else None
            except UnicodeDecodeError:
                name = None
            if name is None:  # torn claim: the slot was never valid
                q[w + 2] = 0
                self._free.append(slot)
                continue
            prev = self._index.get(name)
            if prev is not None:  # cannot happen via this class; keep the higher mark
                keep, drop = (prev, w) if q[prev] >= q[w] else (w, prev)
                q[drop + 2] = 0
                self._free.append((drop * 8 - _HEADER) // _SLOT)
                w = keep
            self._index[name] = w
        heapq.heapify(self._free)

    def _words(self) -> memoryview:
        if self._closed:
            raise DedupClosed(f"{self!r} is closed; open a new DedupState")
        return self._q

    # -- hot path --------------------------------------------------------------------------

    def is_duplicate(self, producer: str, seq: int) -> bool:
        """True when ``seq`` is at or below the highest seq marked for ``producer``."""
        w = self._index.get(producer)
        if w is None:
            self._words()
            return False
        try:
            return seq <= self._q[w]
        except (TypeError, ValueError):
            self._words()
            raise ValueError(f"seq must be an int, got {seq!r}") from None

    def mark(self, producer: str, seq: int, epoch: int | None = None) -> None:
        """Record ``seq`` (and ``epoch``, if given) as delivered for ``producer``."""
        w = self._index.get(producer)
        if w is None:
            self._claim(producer, seq, epoch)
            return
        q = self._q
        try:
            if seq > q[w]:
                q[w] = seq
            if epoch is not None and q[w + 1] != epoch:
                q[w + 1] = epoch
        except (TypeError, ValueError):
            self._words()
            _check_u64("seq", seq)
            if epoch is not None:
                _check_u64("epoch", epoch)
            raise

    # -- the rest --------------------------------------------------------------------------

    def _claim(self, producer: str, seq: int, epoch: int | None) -> None:
        q = self._words()
        if not isinstance(producer, str) or not producer:
            raise ValueError(f"producer must be a non-empty str, got {producer!r}")
        name = producer.encode("utf-8")
        if len(name) > MAX_PRODUCER_ID_BYTES:
            raise ValueError(
                f"producer id {producer[:40]!r}... is longer than {MAX_PRODUCER_ID_BYTES} "
                "UTF-8 bytes"
            )
        _check_u64("seq", seq)
        _check_u64("epoch", 0 if epoch is None else epoch)
        if not self._free:
            self._grow()
            q = self._words()
        slot = heapq.heappop(self._free)
        w = (_HEADER + slot * _SLOT) // 8
        off = w * 8 + _NAME_OFF
        self._mv[off : off + _SLOT - _NAME_OFF] = name.ljust(_SLOT - _NAME_OFF, b"\0")
        q[w] = seq
        q[w + 1] = 0 if epoch is None else epoch
        q[w + 2] = _tag(name)  # last: the slot becomes valid only once complete
        self._index[producer] = w

    def _grow(self) -> None:
        old = self._slots
        new_size = _HEADER + 2 * old * _SLOT
        if self._fd >= 0:
            os.ftruncate(self._fd, new_size)  # first: if it fails, the old map still works
            mm = mmap.mmap(self._fd, new_size)
        else:
            mm = mmap.mmap(-1, new_size)
            mm[: len(self._mm)] = self._mm
        self._q.release()
        self._mv.release()
        self._mm.close()
        self._mm = mm
        self._mv = memoryview(self._mm)
        self._q = self._mv.cast("Q")
        self._slots = 2 * old
        for slot in range(old, 2 * old):
            heapq.heappush(self._free, slot)

    def last(self, producer: str) -> int | None:
        """The highest seq marked for ``producer``, or None if it was never marked."""
        q = self._words()
        w = self._index.get(producer)
        return None if w is None else int(q[w])

    def epoch(self, producer: str) -> int | None:
        """The producer epoch last passed to :meth:`mark`, or None if none was."""
        q = self._words()
        w = self._index.get(producer)
        return None if w is None or q[w + 1] == 0 else int(q[w + 1])

    def reset(self, producer: str) -> None:
        """Forget ``producer`` (e.g. a new producer incarnation that restarts its seqs)."""
        q = self._words()
        w = self._index.pop(producer, None)
        if w is None:
            return
        q[w + 2] = 0  # first: a crash after this leaves a free slot, not a half-reset one
        q[w] = 0
        q[w + 1] = 0
        heapq.heappush(self._free, (w * 8 - _HEADER) // _SLOT)

    def producers(self) -> dict[str, int]:
        """Snapshot: producer id -> highest marked seq."""
        q = self._words()
        return {p: int(q[w]) for p, w in self._index.items()}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, producer: object) -> bool:
        return producer in self._index

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def capacity(self) -> int:
        """Slots in the table now; it doubles when a new producer finds none free."""
        return self._slots

    def sync(self) -> None:
        """msync the file, so the state also survives a machine crash (no-op in memory)."""
        self._words()
        if self._fd >= 0:
            self._mm.flush()

    def close(self) -> None:
        """Flush and release the file (and its lock). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._q.release()
        self._mv.release()
        if self._fd >= 0:
            self._mm.flush()
        self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> DedupState:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "memory" if self._path is None else self._path
        return f"<DedupState {where} producers={len(self._index)} capacity={self._slots}>"


__all__ = ["DedupClosed", "DedupState"]
