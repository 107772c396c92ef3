"""A per-producer write-ahead log of records accepted by ``put`` and not yet acknowledged.

Titanic-style append-only files, no database. Layout of ``directory/<producer_id>/``::

    lock                    flock'd while open: one writer per producer id
    meta                    JSON {format, producer_id, epoch, next_seq}, replaced atomically
    acked                   decimal ack watermark, replaced atomically
    00000000000000000042.seg  segment; the name is the first seq it may hold

Each entry is a 24-byte header ``magic "SGW1" | u32 length | u64 first_seq | u32 count |
u32 crc32(header[:20] + payload)`` followed by ``length`` opaque payload bytes, little-endian.
Segments roll at ``segment_bytes``; a segment is deleted whole once every seq in it is acked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from sage_zmq.errors import ConfigError, SageZmqError
from sage_zmq.flow.clock import Clock, SystemClock

logger = logging.getLogger(__name__)

FsyncPolicy = Literal["batch", "interval", "never"]
CorruptionPolicy = Literal["raise", "truncate"]

MAGIC = b"SGW1"
_PREFIX = struct.Struct("<4sIQI")  # magic, payload length, first_seq, count
HEADER_SIZE = _PREFIX.size + 4  # + crc32
MAX_PAYLOAD = 2**32 - 1
MAX_SEQ = 2**64 - 1
# Producer ids also key DedupState slots, which hold at most this many UTF-8 bytes.
MAX_PRODUCER_ID_BYTES = 104
FORMAT_VERSION = 1

_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
_FSYNC_POLICIES = ("batch", "interval", "never")
_CORRUPTION_POLICIES = ("raise", "truncate")


class WalError(SageZmqError):
    """The write-ahead log was misused (closed, seq going backwards, ack beyond the end)."""


class WalCorruptionError(WalError):
    """A segment holds a bad entry followed by valid ones: data would be silently skipped."""


class PersistLockedError(SageZmqError):
    """Another open handle (this or another process) owns this persistent state."""


@dataclass(frozen=True)
class WalStatistics:
    """Counts for the segments on disk now; ``fsyncs`` counts every fsync since open."""

    entries: int
    bytes: int
    segments: int
    fsyncs: int
    unacked_entries: int
    corrupt_tail_bytes: int
    acked: int
    next_seq: int


@dataclass
class _Segment:
    base: int
    path: str
    size: int
    entries: int
    end_seq: int  # seq after its last entry; ``base`` while empty


def check_producer_id(producer_id: object) -> str:
    """Return ``producer_id`` if it is usable as a directory name and a dedup key."""
    if not isinstance(producer_id, str) or not producer_id:
        raise ConfigError(f"producer_id must be a non-empty str, got {producer_id!r}")
    if len(producer_id.encode("utf-8")) > MAX_PRODUCER_ID_BYTES:
        raise ConfigError(
            f"producer_id {producer_id[:40]!r}... is longer than {MAX_PRODUCER_ID_BYTES} UTF-8 "
            "bytes; use a shorter id (e.g. a uuid4 hex)"
        )
    if producer_id.startswith(".") or any(c in producer_id for c in "/\\\0"):
        raise ConfigError(
            f"producer_id {producer_id!r} is not a safe file name: it must not start with '.' "
            "or contain '/', '\\' or NUL"
        )
    return producer_id


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _parse_entry(buf: bytes, pos: int) -> tuple[int, int, int] | str:
    """``(first_seq, count, end_pos)`` of the entry at ``pos``, or why it is not valid."""
    left = len(buf) - pos
    if left < HEADER_SIZE:
        return f"torn header ({left} of {HEADER_SIZE} bytes)"
    magic, length, first_seq, count = _PREFIX.unpack_from(buf, pos)
    if magic != MAGIC:
        return f"bad magic {magic!r}"
    end = pos + HEADER_SIZE + length
    if end > len(buf):
        return f"torn entry ({left} of {HEADER_SIZE + length} bytes)"
    (crc,) = struct.unpack_from("<I", buf, pos + _PREFIX.size)
    body = memoryview(buf)[pos + HEADER_SIZE : end]
    if zlib.crc32(body, zlib.crc32(memoryview(buf)[pos : pos + _PREFIX.size])) != crc:
        return "CRC mismatch"
    if count == 0:
        return "entry with zero records"
    return first_seq, count, end


def _find_valid_entries(buf: bytes, start: int) -> tuple[int | None, int]:
    """Offset of the first valid-looking entry at or after ``start``, and the highest end seq."""
    first_hit: int | None = None
    top = 0
    idx = buf.find(MAGIC, start)
    while idx != -1:
        parsed = _parse_entry(buf, idx)
        if not isinstance(parsed, str):
            first_hit = idx if first_hit is None else first_hit
            top = max(top, parsed[0] + parsed[1])
        idx = buf.find(MAGIC, idx + 1)
    return first_hit, top


class WriteAheadLog:
    """Append-only log of unacked batches for one producer; see the module docstring.

    ``fsync``: ``"batch"`` fsyncs every append; ``"interval"`` fsyncs on the first append at
    least ``fsync_interval`` seconds after the previous fsync, and on :meth:`sync` / close
    (call :meth:`sync` from a periodic tick so a quiet tail does not stay unsynced);
    ``"never"`` leaves it to the OS, which survives a process kill but not a machine crash.
    The ack watermark is saved at most every ``fsync_interval`` (and on sync / close): after
    a crash, up to that much acked data is replayed again, for the consumer to drop.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        producer_id: str,
        fsync: FsyncPolicy = "batch",
        fsync_interval: float = 0.1,
        segment_bytes: int = 64 * 1024 * 1024,
        on_corruption: CorruptionPolicy = "raise",
        clock: Clock | None = None,
    ) -> None:
        self._producer_id = check_producer_id(producer_id)
        if fsync not in _FSYNC_POLICIES:
            raise ConfigError(f"fsync must be one of {_FSYNC_POLICIES}, got {fsync!r}")
        if on_corruption not in _CORRUPTION_POLICIES:
            raise ConfigError(
                f"on_corruption must be one of {_CORRUPTION_POLICIES}, got {on_corruption!r}"
            )
        if not isinstance(fsync_interval, int | float) or not fsync_interval > 0:
            raise ConfigError(f"fsync_interval must be a number > 0, got {fsync_interval!r}")
        if not isinstance(segment_bytes, int) or segment_bytes <= HEADER_SIZE:
            raise ConfigError(
                f"segment_bytes must be an int > {HEADER_SIZE}, got {segment_bytes!r}"
            )
        self._policy: FsyncPolicy = fsync
        self._interval = float(fsync_interval)
        self._segment_bytes = segment_bytes
        self._on_corruption = on_corruption
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._durable = fsync != "never"
        self._fsyncs = 0
        self._dirty = False
        self._closed = False
        self._fd = -1
        self._lock_fd = -1
        self._segments: list[_Segment] = []
        self._unacked: deque[int] = deque()  # end seq of each entry not yet fully acked
        self._mutex = threading.Lock()
        self._cut_floor = 0
        self.corrupt_tail_bytes = 0
        self.recovered_with_corruption = False

        root = os.fspath(directory)
        os.makedirs(root, mode=0o700, exist_ok=True)
        self._dir = os.path.join(root, self._producer_id)
        if not os.path.isdir(self._dir):
            os.mkdir(self._dir, 0o700)
            os.chmod(self._dir, 0o700)  # mkdir's mode is filtered by the umask
        self._lock()
        try:
            self._recover()
        except BaseException:
            self._release()
            raise
        self._last_sync = self._acked_saved_at = self._clock.monotonic()
        self._acked_saved = self._acked

    # -- opening ---------------------------------------------------------------------------

    def _lock(self) -> None:
        path = os.path.join(self._dir, "lock")
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise PersistLockedError(
                f"write-ahead log {self._dir} is already open (in this or another process); "
                "each producer id needs its own log: close the other handle or use another id"
            ) from None

    def _recover(self) -> None:
        for name in os.listdir(self._dir):
            if name.endswith(".tmp"):  # an atomic replace that never finished
                os.unlink(os.path.join(self._dir, name))
        old_epoch, next_seq_hint = self._read_meta()
        self._epoch = old_epoch + 1
        self._acked = self._read_acked()
        ends = self._scan_segments()
        while len(self._segments) > 1 and self._segments[0].end_seq <= self._acked:
            os.unlink(self._segments.pop(0).path)
        self._unacked.extend(e for e in ends if e > self._acked)
        floor = max(next_seq_hint, self._cut_floor)
        if self._segments:
            last = self._segments[-1]
            floor = max(floor, last.base, last.end_seq)
        # Never reuse a seq: a consumer may have delivered it and would drop the new record.
        self._next_seq = max(floor, self._acked)
        self._write_meta()
        if not self._segments:
            self._new_segment(self._next_seq)
        else:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)

    def _read_meta(self) -> tuple[int, int]:
        """``(epoch, next_seq)`` recorded by the previous open, ``(0, 0)`` for a new log."""
        path = os.path.join(self._dir, "meta")
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            return 0, 0
        except ValueError as exc:
            raise WalCorruptionError(
                f"write-ahead log meta file {path} is not valid JSON ({exc}); it holds the "
                "producer epoch, so it is not guessed: restore it or remove the directory"
            ) from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise WalCorruptionError(
                f"{path} is not a format-{FORMAT_VERSION} sage-zmq write-ahead log meta file"
            )
        if meta.get("producer_id") != self._producer_id:
            raise WalCorruptionError(
                f"{path} belongs to producer {meta.get('producer_id')!r}, not "
                f"{self._producer_id!r}; was the directory copied or renamed?"
            )
        epoch, next_seq = meta.get("epoch"), meta.get("next_seq")
        if not isinstance(epoch, int) or not isinstance(next_seq, int):
            raise WalCorruptionError(f"{path} lacks integer 'epoch' and 'next_seq' fields")
        return epoch, next_seq

    def _write_meta(self) -> None:
        meta = {
            "format": FORMAT_VERSION,
            "producer_id": self._producer_id,
            "epoch": self._epoch,
            "next_seq": self._next_seq,
        }
        # The epoch must never repeat, so it is made durable unless durability is off.
        self._replace("meta", json.dumps(meta).encode(), durable=self._durable)

    def _read_acked(self) -> int:
        path = os.path.join(self._dir, "acked")
        try:
            with open(path, "rb") as f:
                text = f.read()
            return int(text)
        except FileNotFoundError:
            return 0
        except ValueError:
            # Only costs duplicates (which the consumer drops), so warn rather than fail.
            logger.warning(
                "WalCorruption: ack watermark %s is unreadable (%r); replaying from the oldest "
                "segment",
                path,
                text[:32],
            )
            return 0

    def _replace(self, name: str, data: bytes, *, durable: bool) -> None:
        path = os.path.join(self._dir, name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            if durable:
                self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            self._fsync_dir()

    def _scan_segments(self) -> list[int]:
        """Load and validate every segment; return the end seq of every valid entry."""
        found = []
        for name in os.listdir(self._dir):
            m = _SEGMENT_RE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self._dir, name)))
        found.sort()
        ends: list[int] = []
        bad: tuple[int, int, str] | None = None  # segment index, offset, reason
        prev_end = 0
        for i, (base, path) in enumerate(found):
            with open(path, "rb") as f:
                buf = f.read()
            seg = _Segment(base, path, len(buf), 0, base)
            self._segments.append(seg)
            pos = 0
            while pos < len(buf) and bad is None:
                parsed = _parse_entry(buf, pos)
                if isinstance(parsed, str):
                    bad = (i, pos, parsed)
                    break
                first, count, end = parsed
                if first < max(prev_end, base):
                    bad = (i, pos, f"seq {first} goes backwards (expected >= {prev_end})")
                    break
                prev_end = seg.end_seq = first + count
                seg.entries += 1
                ends.append(prev_end)
                pos = end
            if bad is not None:
                self._cut(bad, found, buf)
                break
        return ends

    def _cut(
        self,
        bad: tuple[int, int, str],
        found: list[tuple[int, str]],
        buf: bytes,
    ) -> None:
        """Handle a bad entry at ``bad``: cut a torn tail, refuse to skip valid entries."""
        idx, pos, reason = bad
        path = found[idx][1]
        later: str | None = None
        hit, top = _find_valid_entries(buf, pos + 1)
        if hit is not None:
            later = f"{path} byte {hit}"
        for base, other in found[idx + 1 :]:
            with open(other, "rb") as f:
                hit, other_top = _find_valid_entries(f.read(), 0)
            top = max(top, base, other_top)
            if hit is not None and later is None:
                later = f"{other} byte {hit}"
        # Seqs in the dropped region may have reached a consumer: never hand them out again.
        self._cut_floor = top
        cut = len(buf) - pos + sum(os.path.getsize(p) for _, p in found[idx + 1 :])
        if later is not None and self._on_corruption == "raise":
            raise WalCorruptionError(
                f"write-ahead log {path} is corrupt at byte {pos} ({reason}) but a valid entry "
                f"follows at {later}; refusing to skip it silently. Inspect the file, or open "
                f"with on_corruption='truncate' to drop everything from byte {pos} on "
                f"({cut} bytes)"
            )
        with open(path, "r+b") as f:
            f.truncate(pos)
            if self._durable:
                self._fsync(f.fileno())
        for _, other in found[idx + 1 :]:
            os.unlink(other)
        seg = self._segments[idx]
        seg.size = pos
        del self._segments[idx + 1 :]
        self.corrupt_tail_bytes = cut
        self.recovered_with_corruption = True
        logger.warning(
            "WalCorruption: %s at byte %d of %s (%s); kept the valid prefix, cut %d bytes%s",
            "bad entry" if later is None else "mid-log corruption (on_corruption='truncate')",
            pos,
            path,
            reason,
            cut,
            "" if later is None else f", including valid entries from {later}",
        )

    # -- writing ---------------------------------------------------------------------------

    def _fsync(self, fd: int) -> None:
        os.fsync(fd)
        self._fsyncs += 1

    def _fsync_dir(self) -> None:
        _fsync_dir(self._dir)
        self._fsyncs += 1

    def _new_segment(self, base: int) -> None:
        path = os.path.join(self._dir, f"{base:020d}.seg")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._segments.append(_Segment(base, path, 0, 0, base))
        if self._durable:
            self._fsync_dir()

    def _roll(self, base: int) -> None:
        # The old segment must be durable before a later one exists, or recovery would see
        # a hole followed by valid entries and report mid-log corruption.
        if self._dirty and self._durable:
            self._fsync(self._fd)
        self._dirty = False
        os.close(self._fd)
        self._fd = -1
        self._new_segment(base)

    def _check_open(self) -> None:
        if self._closed:
            raise WalError(f"write-ahead log {self._dir} is closed; open a new WriteAheadLog")

    def append(self, first_seq: int, count: int, payload: bytes | bytearray | memoryview) -> None:
        """Log one batch of ``count`` records numbered from ``first_seq`` (opaque payload)."""
        with self._mutex:
            self._append(first_seq, count, payload)

    def _append(self, first_seq: int, count: int, payload: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if not isinstance(first_seq, int) or first_seq < self._next_seq:
            raise WalError(
                f"append first_seq={first_seq!r} but the log is at next_seq={self._next_seq}; "
                "seqs must not go backwards (number batches from wal.next_seq)"
            )
        if not isinstance(count, int) or count < 1 or first_seq + count - 1 > MAX_SEQ:
            raise WalError(f"append count must be an int >= 1 within u64 seqs, got {count!r}")
        size = len(payload)
        if size > MAX_PAYLOAD:
            raise WalError(f"append payload is {size} bytes; at most {MAX_PAYLOAD} per entry")
        prefix = _PREFIX.pack(MAGIC, size, first_seq, count)
        crc = zlib.crc32(payload, zlib.crc32(prefix))
        entry = b"".join((prefix, struct.pack("<I", crc), payload))
        seg = self._segments[-1]
        if seg.size > 0 and seg.size + len(entry) > self._segment_bytes:
            self._roll(first_seq)
            seg = self._segments[-1]
        try:
            _write_all(self._fd, entry)
        except BaseException:
            # Leave no partial entry behind: later appends would follow garbage and recovery
            # would (rightly) call that mid-log corruption.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)
            raise
        seg.size += len(entry)
        seg.entries += 1
        seg.end_seq = self._next_seq = first_seq + count
        self._unacked.append(self._next_seq)
        self._dirty = True
        if self._policy == "batch" or (
            self._policy == "interval"
            and self._clock.monotonic() - self._last_sync >= self._interval
        ):
            self._sync_now()

    def _save_acked(self) -> None:
        # Throttled and not fsynced: replacing a file costs ~250 us on ext4, and a stale
        # watermark after a crash only replays acked entries, which the consumer drops.
        if self._acked != self._acked_saved:
            self._replace("acked", b"%d\n" % self._acked, durable=False)
            self._acked_saved = self._acked
        self._acked_saved_at = self._clock.monotonic()

    def _sync_now(self) -> None:
        self._fsync(self._fd)
        self._dirty = False
        self._last_sync = self._clock.monotonic()

    def sync(self) -> None:
        """fsync what was appended since the last fsync; save a pending ack watermark."""
        with self._mutex:
            self._check_open()
            if self._dirty:
                self._sync_now()
            self._save_acked()

    def truncate(self, acked: int) -> None:
        """Every seq < ``acked`` is acknowledged: drop fully acked segments (no rewrite)."""
        with self._mutex:
            self._truncate(acked)

    def _truncate(self, acked: int) -> None:
        self._check_open()
        if not isinstance(acked, int) or acked < 0:
            raise WalError(f"truncate needs an int ack watermark >= 0, got {acked!r}")
        if acked > self._next_seq:
            raise WalError(
                f"truncate({acked}) acknowledges seqs never appended (next_seq is "
                f"{self._next_seq}); the ack watermark is 'every seq below this is acked'"
            )
        if acked <= self._acked:
            return
        self._acked = acked
        if self._clock.monotonic() - self._acked_saved_at >= self._interval:
            self._save_acked()
        while self._unacked and self._unacked[0] <= acked:
            self._unacked.popleft()
        while len(self._segments) > 1 and self._segments[0].end_seq <= acked:
            os.unlink(self._segments.pop(0).path)

    # -- reading ---------------------------------------------------------------------------

    def replay(self) -> Iterator[tuple[int, int, bytes]]:
        """Yield ``(first_seq, count, payload)`` of each entry not fully acked, oldest first.

        A partially acked entry is yielded whole; the consumer drops the duplicates.
        """
        with self._mutex:
            self._check_open()
            acked = self._acked
            snapshot = [(s.path, s.size) for s in self._segments]
        return self._replay(snapshot, acked)

    def _replay(
        self, snapshot: list[tuple[str, int]], acked: int
    ) -> Iterator[tuple[int, int, bytes]]:
        for path, size in snapshot:
            try:
                with open(path, "rb") as f:
                    buf = f.read(size)
            except FileNotFoundError:
                continue  # truncated away meanwhile: every entry in it is acked
            pos = 0
            while pos < len(buf):
                parsed = _parse_entry(buf, pos)
                if isinstance(parsed, str):
                    raise WalCorruptionError(
                        f"write-ahead log {path} changed under this handle: byte {pos} is no "
                        f"longer a valid entry ({parsed}); is another tool writing to it?"
                    )
                first, count, end = parsed
                if first + count > acked:
                    yield first, count, buf[pos + HEADER_SIZE : end]
                pos = end

    # -- state -----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """1 on the first open of this producer's directory, +1 on every later open."""
        return self._epoch

    @property
    def next_seq(self) -> int:
        """The seq after the last appended entry; a restarted producer numbers from here."""
        return self._next_seq

    @property
    def acked(self) -> int:
        return self._acked

    @property
    def producer_id(self) -> str:
        return self._producer_id

    @property
    def path(self) -> str:
        """This producer's directory."""
        return self._dir

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> WalStatistics:
        with self._mutex:
            return self._statistics()

    def _statistics(self) -> WalStatistics:
        return WalStatistics(
            entries=sum(s.entries for s in self._segments),
            bytes=sum(s.size for s in self._segments),
            segments=len(self._segments),
            fsyncs=self._fsyncs,
            unacked_entries=len(self._unacked),
            corrupt_tail_bytes=self.corrupt_tail_bytes,
            acked=self._acked,
            next_seq=self._next_seq,
        )

    def close(self) -> None:
        """Flush per policy, record next_seq, release the directory. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                if self._dirty and self._policy == "interval":
                    self._sync_now()
                self._save_acked()
                self._write_meta()
            finally:
                self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = -1

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next_seq={self._next_seq} acked={self._acked}"
        return f"<WriteAheadLog {self._dir} epoch={self._epoch} {state}>"


__all__ = [
    "MAX_PRODUCER_ID_BYTES",
    "PersistLockedError",
    "WalCorruptionError",
    "WalError",
    "WalStatistics",
    "WriteAheadLog",
    "check_producer_id",
]
