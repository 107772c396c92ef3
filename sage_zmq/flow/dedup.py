"""Consumer-side dedup state: the highest delivered seq (and last epoch) per producer id.

With a path, the state lives in a shared ``mmap`` of a file, updated in place: ``mark`` is a
memory store, which lands in the page cache at once and so survives SIGKILL of the process at
any instant; :meth:`DedupState.sync` (msync) adds survival of a machine crash.

File layout, format 2 (native byte order, i.e. little-endian on the x86-64/arm64 hosts we run
on)::

    header 256 bytes   magic b"SGDEDUP2" | u32 slot size | u32 header size | u64 used | zeros
    slot   256 bytes   u64 seq | u64 seq ^ K | u64 epoch | u64 epoch ^ K | u64 tag |
                       name (UTF-8, zero padded to the end of the slot)

``used`` is the number of claimed slots in its low half and a crc32 of it in its high half.
``tag`` is 0 for a free slot, else ``1<<63 | len(name)<<32 | crc32(name)`` (bit 62 set while
an epoch is being changed). Every u64 sits 8-byte aligned and is written with one native 8-byte
store (``memoryview.cast("Q")``); we rely on such stores not tearing, true of x86-64 and arm64.
Slots are aligned to their size, so none straddles a disk sector or a page.

Why the check words: the file is the only record of what the application already consumed, so
damage to it (a truncated file, overwritten bytes, a zeroed slot) must not pass for a valid
state, which would deliver records again or skip them without a word. Each value is stored,
then its check ``value ^ K``; opening verifies every pair. A process killed between the two
stores of a ``mark`` leaves a check that decodes to a *lower* seq: the mark never completed, so
the record was still held by the application, and the lower seq is the right one (see
PROTOCOL.md §5). Any other mismatch, a tag that does not match its name, a ``used`` count above
the claimed slots, or a file that is not whole slots, is damage: opening raises
:class:`DedupCorruptionError` naming the file, what is wrong, and what to do.

A slot is claimed by writing name, seq and epoch first, then the tag, then ``used``; it is
released by lowering ``used``, then clearing the tag: a process killed half way leaves a free
slot or a whole one, and ``used`` at most one below the claimed slots (which opening accepts
and repairs). The table doubles (ftruncate + remap) when full. A new file is written whole
under a temporary name and then linked into place, so a half-created file never exists.
Format-1 files (64-byte header, 128-byte slots without check words) are converted on open.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import mmap
import os
import struct
import zlib
from types import TracebackType

from sage_zmq.errors import ConfigError, SageZmqError
from sage_zmq.flow.wal import MAX_PRODUCER_ID_BYTES, PersistLockedError

logger = logging.getLogger(__name__)

_MAGIC = b"SGDEDUP2"
_HEADER = 256
_SLOT = 256
_USED_W = 2  # word index of ``used`` in the header
_SEQ, _SEQ_CK, _EPOCH, _EPOCH_CK, _TAGW = range(5)  # word offsets within a slot
_NAME_OFF = 40
_KEY = 0xA5C3_5A3C_96E1_690F  # nonzero halves: a zeroed word never checks against zero
_TAG_BIT = 1 << 63
_PENDING = 1 << 62  # in a tag: an epoch change was under way
_MAX_U64 = 2**64 - 1
_V1_MAGIC = b"SGDEDUP1"
_V1_HEADER = 64
_V1_SLOT = 128
assert _SLOT - _NAME_OFF >= MAX_PRODUCER_ID_BYTES


class DedupClosed(SageZmqError):
    """The DedupState was closed; open a new one on the same path to continue."""


class DedupCorruptionError(SageZmqError):
    """The dedup state file is damaged: using it could deliver records twice or skip them."""


def _tag(name: bytes) -> int:
    return _TAG_BIT | (len(name) << 32) | zlib.crc32(name)


def _used_word(n: int) -> int:
    return n | zlib.crc32(_MAGIC + n.to_bytes(4, "little")) << 32


def _check_u64(what: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_U64:
        raise ValueError(f"{what} must be an int in [0, 2**64), got {value!r}")
    return value


def _image(slots: int, entries: list[tuple[bytes, int, int]]) -> bytearray:
    """A whole format-2 file holding ``entries`` (name, seq, epoch) in its first slots."""
    buf = bytearray(_HEADER + slots * _SLOT)
    struct.pack_into("=8sIIQ", buf, 0, _MAGIC, _SLOT, _HEADER, _used_word(len(entries)))
    for slot, (name, seq, epoch) in enumerate(entries):
        off = _HEADER + slot * _SLOT
        struct.pack_into("=5Q", buf, off, seq, seq ^ _KEY, epoch, epoch ^ _KEY, _tag(name))
        buf[off + _NAME_OFF : off + _NAME_OFF + len(name)] = name
    return buf


def _read_v1(path: str, data: bytes) -> list[tuple[bytes, int, int]]:
    """The (name, seq, epoch) of every slot of a format-1 file; damage raises."""
    size = len(data)
    if size < _V1_HEADER + _V1_SLOT or (size - _V1_HEADER) % _V1_SLOT:
        raise DedupCorruptionError(
            _damaged(path, f"a format-1 file of {size} bytes, not whole slots")
        )
    entries: dict[bytes, tuple[bytes, int, int]] = {}
    for off in range(_V1_HEADER, size, _V1_SLOT):
        seq, epoch, tag = struct.unpack_from("=3Q", data, off)
        if tag == 0:
            continue
        n = (tag >> 32) & 0x7FFF_FFFF
        name = bytes(data[off + 24 : off + 24 + n]) if n <= MAX_PRODUCER_ID_BYTES else b""
        if not name or _tag(name) != tag:
            raise DedupCorruptionError(
                _damaged(path, f"format-1 slot at byte {off} fails its name check")
            )
        if name in entries:
            raise DedupCorruptionError(_damaged(path, f"two slots hold producer {name!r}"))
        entries[name] = (name, seq, epoch)
    return list(entries.values())


def _damaged(path: str, what: str, producers: list[str] | None = None) -> str:
    held = (
        f" (it held producers {', '.join(map(repr, producers[:5]))}"
        f"{' and more' if len(producers) > 5 else ''})"
        if producers
        else ""
    )
    return (
        f"dedup state {path} is damaged: {what}. It records which records this consumer "
        "already consumed, so using it could deliver records a second time, or skip some, "
        "without a word. Restore it from a backup if you have one; otherwise remove it to "
        f"start afresh, accepting that records consumed before may be delivered once "
        f"more{held}"
    )


class DedupState:
    """Per-producer high-water mark of delivered seqs; in memory when ``path`` is None.

    One process may hold a path at a time (flock). Seqs only move up: ``mark`` with a seq at
    or below the recorded one is a no-op. Opening a damaged file raises
    :class:`DedupCorruptionError`; see the module docstring.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, initial_slots: int = 64) -> None:
        if not isinstance(initial_slots, int) or initial_slots < 1:
            raise ConfigError(f"initial_slots must be an int >= 1, got {initial_slots!r}")
        self._path = None if path is None else os.fspath(path)
        self._fd = -1
        self._index: dict[str, int] = {}  # producer -> word index of its slot
        self._free: list[int] = []  # heap of free slot numbers
        self._used = 0
        if self._path is None:
            self._mm = mmap.mmap(-1, _HEADER + initial_slots * _SLOT)
            self._mm[:] = _image(initial_slots, [])
        else:
            self._mm = self._open_file(self._path, initial_slots)
        self._mv = memoryview(self._mm)
        self._q = self._mv.cast("Q")  # released (so any access raises) once closed
        self._closed = False
        self._slots = (len(self._mm) - _HEADER) // _SLOT
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _open_file(self, path: str, initial_slots: int) -> mmap.mmap:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        for _ in range(16):
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                self._install(path, _image(initial_slots, []), replace=False)
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise PersistLockedError(
                        f"dedup state {path} is already open (in this or another process); "
                        "each consumer needs its own state file"
                    ) from None
                st = os.fstat(fd)
                with contextlib.suppress(FileNotFoundError):
                    now = os.stat(path)
                    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                        image = self._check_file(fd, path, st.st_size, initial_slots)
                        if image is None:
                            self._fd, fd = fd, -1
                            return mmap.mmap(self._fd, st.st_size)
                        # Rewritten whole (a format-1 file, or an empty one that an older
                        # version left when it died creating it), under our lock.
                        self._install(path, image, replace=True)
                # Replaced since we opened it (by us just now, or by another process): the
                # lock we hold is on a file nobody else will open; take the current one.
            finally:
                if fd >= 0:
                    os.close(fd)
        raise SageZmqError(f"dedup state {path} keeps being replaced; is another tool at it?")

    @staticmethod
    def _install(path: str, image: bytearray, *, replace: bool) -> None:
        """Put a whole file at ``path`` at once: a crash leaves the old one or the new one."""
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(image)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # unlike rename, never replaces a file in use
                except FileExistsError:
                    pass  # another process was first
                except OSError:  # no hard links here (some FUSE, vfat): rename if still free
                    if not os.path.exists(path):
                        os.rename(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @staticmethod
    def _check_file(fd: int, path: str, size: int, initial_slots: int) -> bytearray | None:
        """None if ``fd`` holds a format-2 table; else a whole file to replace it with."""
        if size == 0:
            return _image(initial_slots, [])  # nothing was ever recorded in it
        head = os.pread(fd, _HEADER, 0)
        if head[:8] == _V1_MAGIC and int.from_bytes(head[8:12], "little") == _V1_SLOT:
            entries = _read_v1(path, os.pread(fd, size, 0))
            slots = max(initial_slots, (size - _V1_HEADER) // _V1_SLOT)
            logger.info(
                "dedup state %s: converted from format 1 (%d producers)", path, len(entries)
            )
            return _image(slots, entries)
        if head[:8] != _MAGIC:
            raise ConfigError(
                f"{path} is not a sage-zmq dedup state file (bad header {head[:12]!r}); point "
                "persistence at a directory of its own, or, if it is this consumer's own state "
                "and got damaged, remove it (records consumed before may be delivered again)"
            )
        if size < _HEADER + _SLOT:
            raise DedupCorruptionError(
                _damaged(
                    path,
                    f"it was cut short to {size} bytes (a table is at least {_HEADER + _SLOT})",
                )
            )
        slot, header = struct.unpack_from("=II", head, 8)
        if (slot, header) != (_SLOT, _HEADER) or any(head[24:]):
            raise DedupCorruptionError(_damaged(path, "its header is damaged"))
        if (size - _HEADER) % _SLOT:
            raise DedupCorruptionError(
                _damaged(
                    path, f"its size, {size} bytes, is not a whole number of slots (cut short?)"
                )
            )
        return None

    def _load(self) -> None:
        q = self._words()
        where = self._path or "memory"
        used_word = q[_USED_W]
        used = used_word & 0xFFFF_FFFF
        problems: list[str] = []
        if used_word != _used_word(used):
            problems.append("its count of producers fails its check")
        torn: list[str] = []
        for slot in range(self._slots):
            w = (_HEADER + slot * _SLOT) // 8
            tag = q[w + _TAGW]
            if tag == 0:
                self._free.append(slot)
                continue
            pending, tag = tag & _PENDING, tag & ~_PENDING
            n = (tag >> 32) & 0x3FFF_FFFF
            off = w * 8 + _NAME_OFF
            raw = bytes(self._mv[off : off + n]) if n <= MAX_PRODUCER_ID_BYTES else b""
            try:
                name = raw.decode("utf-8") if raw and _tag(raw) == tag else None
            except UnicodeDecodeError:
                name = None
            if name is None:
                problems.append(f"slot {slot} (byte {w * 8}) fails its name check")
                continue
            seq = q[w + _SEQ]
            if seq ^ _KEY != q[w + _SEQ_CK]:
                before = q[w + _SEQ_CK] ^ _KEY
                if before < seq:
                    # A mark cut short between its two stores: it never completed, so the
                    # record was still the application's, not consumed (PROTOCOL.md §5).
                    q[w + _SEQ] = before
                    torn.append(f"{name!r} {seq} -> {before}")
                else:
                    problems.append(f"the consumed seq of producer {name!r} fails its check")
                    continue
            epoch = q[w + _EPOCH]
            if pending:  # an epoch change cut short: either value is one it had
                q[w + _EPOCH_CK] = epoch ^ _KEY
                q[w + _TAGW] = tag
            elif epoch ^ _KEY != q[w + _EPOCH_CK]:
                problems.append(f"the epoch of producer {name!r} fails its check")
                continue
            if name in self._index:
                problems.append(f"two slots hold producer {name!r}")
                continue
            self._index[name] = w
        claimed = len(self._index)
        if not problems and claimed not in (used, used + 1):
            # One more is a claim or release cut short (see the module docstring); fewer
            # means slots were wiped, and with them what their producers had consumed.
            problems.append(
                f"it counts {used} producers but holds {claimed}: "
                + ("slots were wiped" if claimed < used else "slots appeared")
            )
        if problems:
            shown = "; ".join(problems[:3]) + (
                f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            )
            raise DedupCorruptionError(_damaged(where, shown, list(self._index)))
        self._set_used(claimed)  # repairs a count one short (a cut-short claim or release)
        if torn:
            logger.warning(
                "dedup state %s: a mark was cut short by the process dying; its record counts "
                "as not consumed and is delivered again (%s)",
                where,
                ", ".join(torn),
            )
        heapq.heapify(self._free)

    def _words(self) -> memoryview:
        if self._closed:
            raise DedupClosed(f"{self!r} is closed; open a new DedupState")
        return self._q

    def _set_used(self, n: int) -> None:
        self._q[_USED_W] = _used_word(n)
        self._used = n

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
                q[w + 1] = seq ^ _KEY  # second: see the module docstring
            if epoch is not None and q[w + _EPOCH] != epoch:
                self._set_epoch(w, epoch)
        except (TypeError, ValueError):
            self._words()
            _check_u64("seq", seq)
            if epoch is not None:
                _check_u64("epoch", epoch)
            raise

    # -- the rest --------------------------------------------------------------------------

    def _set_epoch(self, w: int, epoch: int) -> None:
        _check_u64("epoch", epoch)
        q = self._q
        tag = q[w + _TAGW]
        # The pending bit brackets the two stores: a process killed between them leaves a
        # pair that would otherwise look damaged.
        q[w + _TAGW] = tag | _PENDING
        q[w + _EPOCH] = epoch
        q[w + _EPOCH_CK] = epoch ^ _KEY
        q[w + _TAGW] = tag

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
        epoch = 0 if epoch is None else _check_u64("epoch", epoch)
        if not self._free:
            self._grow()
            q = self._words()
        slot = heapq.heappop(self._free)
        w = (_HEADER + slot * _SLOT) // 8
        off = w * 8 + _NAME_OFF
        self._mv[off : w * 8 + _SLOT] = name.ljust(_SLOT - _NAME_OFF, b"\0")
        q[w + _SEQ] = seq
        q[w + _SEQ_CK] = seq ^ _KEY
        q[w + _EPOCH] = epoch
        q[w + _EPOCH_CK] = epoch ^ _KEY
        q[w + _TAGW] = _tag(name)  # the slot becomes valid only once complete
        self._set_used(self._used + 1)
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
        return None if w is None or q[w + _EPOCH] == 0 else int(q[w + _EPOCH])

    def reset(self, producer: str) -> None:
        """Forget ``producer`` (e.g. a new producer incarnation that restarts its seqs)."""
        q = self._words()
        w = self._index.pop(producer, None)
        if w is None:
            return
        self._set_used(self._used - 1)  # first: see the module docstring
        q[w + _TAGW] = 0  # then: a crash after this leaves a free slot, not a half-reset one
        for i in (_SEQ, _SEQ_CK, _EPOCH, _EPOCH_CK):
            q[w + i] = 0
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


__all__ = ["DedupClosed", "DedupCorruptionError", "DedupState"]
