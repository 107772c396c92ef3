"""A per-producer write-ahead log of records accepted by ``put`` and not yet acknowledged.

Titanic-style append-only files, no database. Layout of ``directory/<producer_id>/``::

    lock                    flock'd while open: one writer per producer id
    meta                    JSON {format, producer_id, epoch, next_seq, end, newest, boot},
                            replaced atomically at open, close and segment roll
    acked                   decimal ack watermark, replaced atomically
    00000000000000000042.seg  segment; the name is the first seq it may hold

Each entry is a 32-byte header ``magic "SGW2" | u32 length | u64 first_seq | u64 prev_end |
u32 count | u32 crc32(header[:28] + payload)`` followed by ``length`` opaque payload bytes,
little-endian. ``prev_end`` is the seq after the entry written before it (for the first entry
of a log, the ack watermark then): the entries form a chain, so an entry or a segment that went
missing shows as a break even where ``append`` left a deliberate gap in the seqs. Entries of
format 1 (``"SGW1"``, a 24-byte header without ``prev_end``, written by older versions) are
still read, without that check; new entries are always format 2.

Segments roll at ``segment_bytes``; a segment other than the newest is deleted whole once
every seq in it is acked (the watermark is saved first, so recovery never mistakes a truncated
log for a damaged one). The newest is kept, even by a clean close with everything acked.

Recovery (see :class:`WriteAheadLog`) tells three kinds of trouble apart: a tail whose last
write never completed (cut, with a warning), a damaged entry (an error if a valid entry follows
it, else cut with a warning that names the lost seqs), and missing entries: a break in the
chain, an oldest entry that does not follow the ack watermark, or a log that ends before what
``meta`` recorded at the last open or close. Missing unacknowledged entries are an error: the
consumer accepts a producer's seqs strictly in order, so it would wait for them forever.
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
from typing import Literal, NamedTuple

from sage_zmq.errors import ConfigError, SageZmqError
from sage_zmq.flow.clock import Clock, SystemClock

logger = logging.getLogger(__name__)

FsyncPolicy = Literal["batch", "interval", "never"]
CorruptionPolicy = Literal["raise", "truncate"]

MAGIC = b"SGW2"
_PREFIX = struct.Struct("<4sIQQI")  # magic, payload length, first_seq, prev_end, count
HEADER_SIZE = _PREFIX.size + 4  # + crc32
MAGIC_V1 = b"SGW1"
_PREFIX_V1 = struct.Struct("<4sIQI")  # magic, payload length, first_seq, count
HEADER_SIZE_V1 = _PREFIX_V1.size + 4
MAX_PAYLOAD = 2**32 - 1
MAX_SEQ = 2**64 - 1
# Producer ids also key DedupState slots, which hold at most this many UTF-8 bytes.
MAX_PRODUCER_ID_BYTES = 104
FORMAT_VERSION = 2
_META_FORMATS = (1, 2)  # format-1 meta lacks "end" and "boot"

_SEGMENT_RE = re.compile(r"^(\d{20})\.seg$")
_FSYNC_POLICIES = ("batch", "interval", "never")
_CORRUPTION_POLICIES = ("raise", "truncate")
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class WalError(SageZmqError):
    """The write-ahead log was misused (closed, seq going backwards, ack beyond the end)."""


class WalCorruptionError(WalError):
    """The log is damaged or incomplete in a way that would skip or lose records silently."""


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


@dataclass(frozen=True)
class _Meta:
    epoch: int
    next_seq: int
    end: int | None  # seq after the last entry when meta was saved; None if not recorded
    newest: int | None  # base of the newest segment then (None: there was none)
    boot: str | None  # the machine's boot id when meta was saved
    version: int  # 0 when there is no meta file


class _Entry(NamedTuple):
    first: int
    records: int
    end_pos: int
    prev: int | None  # seq after the entry before it; None in a format-1 entry
    body_pos: int  # where its payload starts


class _Bad(NamedTuple):
    reason: str
    torn: bool  # runs past the end of the file: a write that never completed
    claim: tuple[int, int] | None  # (first_seq, count) per its header, which failed its check


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


def _boot_id() -> str | None:
    """This boot of the machine, where the OS tells it (Linux); None elsewhere."""
    try:
        with open(_BOOT_ID, encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _seqs(first: int, end: int) -> str:
    return f"seq {first}" if end == first + 1 else f"seqs {first}..{end - 1}"


def _parse_entry(buf: bytes, pos: int) -> _Entry | _Bad:
    """The entry at ``pos``, or why it is not a valid one."""
    left = len(buf) - pos
    magic = bytes(buf[pos : pos + 4])
    if magic == MAGIC:
        prefix = _PREFIX
    elif magic == MAGIC_V1:
        prefix = _PREFIX_V1
    elif left < 4 and (MAGIC.startswith(magic) or MAGIC_V1.startswith(magic)):
        return _Bad(f"torn header ({left} of {HEADER_SIZE} bytes)", True, None)
    else:
        return _Bad(f"bad magic {magic!r}", False, None)
    size = prefix.size + 4
    if left < size:
        return _Bad(f"torn header ({left} of {size} bytes)", True, None)
    prev: int | None
    if prefix is _PREFIX:
        _magic, length, first_seq, prev, count = prefix.unpack_from(buf, pos)
    else:
        _magic, length, first_seq, count = prefix.unpack_from(buf, pos)
        prev = None
    end = pos + size + length
    if end > len(buf):
        return _Bad(f"torn entry ({left} of {size + length} bytes)", True, (first_seq, count))
    (crc,) = struct.unpack_from("<I", buf, pos + prefix.size)
    view = memoryview(buf)
    if zlib.crc32(view[pos + size : end], zlib.crc32(view[pos : pos + prefix.size])) != crc:
        return _Bad("CRC mismatch", False, (first_seq, count))
    if count == 0:
        return _Bad("entry with zero records", False, None)
    return _Entry(first_seq, count, end, prev, pos + size)


def _find_valid_entries(buf: bytes, start: int) -> tuple[int | None, int]:
    """Offset of the first valid-looking entry at or after ``start``, and the highest end seq."""
    first_hit: int | None = None
    top = 0
    idx = buf.find(b"SGW", start)  # the magic of either format
    while idx != -1:
        parsed = _parse_entry(buf, idx)
        if isinstance(parsed, _Entry):
            first_hit = idx if first_hit is None else first_hit
            top = max(top, parsed.first + parsed.records)
        idx = buf.find(b"SGW", idx + 1)
    return first_hit, top


class WriteAheadLog:
    """Append-only log of unacked batches for one producer; see the module docstring.

    ``fsync``: ``"batch"`` fsyncs every append; ``"interval"`` fsyncs on the first append at
    least ``fsync_interval`` seconds after the previous fsync, and on :meth:`sync` / close
    (call :meth:`sync` from a periodic tick so a quiet tail does not stay unsynced);
    ``"never"`` leaves it to the OS, which survives a process kill but not a machine crash.
    The ack watermark is saved at most every ``fsync_interval`` (and on sync / close, and
    before a segment is deleted): after a crash, up to that much acked data is replayed again,
    for the consumer to drop.

    ``on_corruption`` decides what opening a log does when recovery would lose records a
    consumer may not have: ``"raise"`` (default) raises :class:`WalCorruptionError`; a repair
    opens the log once with ``"truncate"``, which drops a damaged region with everything after
    it, and gives up missing seqs together with every unacknowledged seq before them (a
    consumer can only be told to skip a producer's seqs from the start: the ack watermark in
    its HELLO). What that recovery did is in :attr:`corruption_report` (and logged).
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
        self._chain = 0  # seq after the last entry appended: the next entry's prev_end
        self._boot = _boot_id()
        self.corrupt_tail_bytes = 0
        self.recovered_with_corruption = False
        #: What recovery cut or gave up, in words (empty when the log opened clean).
        self.corruption_report = ""

        self._root = os.fspath(directory)
        self._dir = os.path.join(self._root, self._producer_id)
        try:
            os.makedirs(self._root, mode=0o700, exist_ok=True)
            if not os.path.isdir(self._dir):
                os.mkdir(self._dir, 0o700)
                os.chmod(self._dir, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise WalError(
                f"cannot keep the write-ahead log in {self._dir}: {exc.strerror or exc}; "
                "metadata['persist'] must name a directory this process can create and write"
            ) from None
        self._lock()
        try:
            self._recover()
        except BaseException:
            self._release()
            raise
        self._last_sync = self._acked_saved_at = self._clock.monotonic()

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
        meta = self._read_meta()
        self._epoch = meta.epoch + 1
        self._acked, acked_known = self._read_acked()
        self._acked_saved = self._acked_durable = self._acked
        ends = self._scan_segments(meta, acked_known)
        if self._acked != self._acked_saved:  # "truncate" gave seqs up: keep that decision
            self._save_acked(durable=True)
        while len(self._segments) > 1 and self._segments[0].end_seq <= self._acked:
            os.unlink(self._segments.pop(0).path)
        self._unacked.extend(e for e in ends if e > self._acked)
        floor = max(meta.next_seq, self._cut_floor)
        if self._segments:
            last = self._segments[-1]
            floor = max(floor, last.base, last.end_seq)
        # Never reuse a seq: a consumer may have delivered it and would drop the new record.
        self._next_seq = max(floor, self._acked)
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
            if self._durable:
                # meta is about to record this log's end as durable: make sure it is (the
                # previous run may have left it in the page cache, e.g. with "interval").
                self._fsync(self._fd)
        else:
            # Before meta names it: a crash in between must not look like a lost segment.
            self._new_segment(self._next_seq)
        self._write_meta()

    def _read_meta(self) -> _Meta:
        """What the previous open or close recorded; epoch and next_seq 0 for a new log."""
        path = os.path.join(self._dir, "meta")
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            return _Meta(0, 0, None, None, None, version=0)
        except ValueError as exc:
            raise WalCorruptionError(
                f"write-ahead log meta file {path} is not valid JSON ({exc}); it holds the "
                "producer epoch, so it is not guessed: restore it or remove the directory"
            ) from exc
        if not isinstance(meta, dict) or meta.get("format") not in _META_FORMATS:
            raise WalCorruptionError(
                f"{path} is not a sage-zmq write-ahead log meta file of format "
                f"{' or '.join(map(str, _META_FORMATS))} (a newer version wrote it?)"
            )
        if meta.get("producer_id") != self._producer_id:
            raise WalCorruptionError(
                f"{path} belongs to producer {meta.get('producer_id')!r}, not "
                f"{self._producer_id!r}; was the directory copied or renamed?"
            )
        epoch, next_seq = meta.get("epoch"), meta.get("next_seq")
        if not isinstance(epoch, int) or not isinstance(next_seq, int):
            raise WalCorruptionError(f"{path} lacks integer 'epoch' and 'next_seq' fields")
        end, newest, boot = meta.get("end"), meta.get("newest"), meta.get("boot")
        version = meta["format"]
        if version >= 2 and (
            not isinstance(end, int) or not (newest is None or isinstance(newest, int))
        ):
            raise WalCorruptionError(f"{path} lacks an integer 'end' or 'newest' field")
        return _Meta(
            epoch,
            next_seq,
            end if isinstance(end, int) else None,
            newest if isinstance(newest, int) else None,
            boot if isinstance(boot, str) else None,
            version=version,
        )

    def _write_meta(self) -> None:
        meta = {
            "format": FORMAT_VERSION,
            "producer_id": self._producer_id,
            "epoch": self._epoch,
            "next_seq": self._next_seq,
            # Every unacked seq below "end" is in a segment now, and the newest segment is
            # this one (segments are never deleted from the end): recovery checks both.
            "end": self._chain,
            "newest": self._segments[-1].base if self._segments else None,
            "boot": self._boot,
        }
        # The epoch must never repeat, so it is made durable unless durability is off.
        self._replace("meta", json.dumps(meta).encode(), durable=self._durable)

    def _read_acked(self) -> tuple[int, bool]:
        """The saved ack watermark, and whether it could be read at all."""
        path = os.path.join(self._dir, "acked")
        try:
            with open(path, "rb") as f:
                text = f.read()
            return int(text), True
        except FileNotFoundError:
            return 0, True
        except ValueError:
            # Only costs duplicates (which the consumer drops), so warn rather than fail.
            logger.warning(
                "WalCorruption: ack watermark %s is unreadable (%r); replaying from the oldest "
                "segment",
                path,
                text[:32],
            )
            return 0, False

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

    def _scan_segments(self, meta: _Meta, acked_known: bool) -> list[int]:
        """Load and validate every segment; return the end seq of every valid entry."""
        found = []
        for name in os.listdir(self._dir):
            m = _SEGMENT_RE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self._dir, name)))
        found.sort()
        same_boot = None if meta.boot is None or self._boot is None else meta.boot == self._boot
        ends: list[int] = []
        chain: int | None = None  # seq after the last valid entry so far
        for i, (base, path) in enumerate(found):
            with open(path, "rb") as f:
                buf = f.read()
            seg = _Segment(base, path, len(buf), 0, base)
            self._segments.append(seg)
            pos = 0
            while pos < len(buf):
                parsed = _parse_entry(buf, pos)
                low = base if chain is None else max(chain, base)
                if isinstance(parsed, _Entry) and parsed.first < low:
                    parsed = _Bad(
                        f"seq {parsed.first} goes backwards (expected >= {low})", False, None
                    )
                if isinstance(parsed, _Bad):
                    self._check_tail(meta, found, chain, acked_known, newest_only=True)
                    self._cut(i, pos, parsed, found, buf, chain, meta, same_boot)
                    self._chain = self._acked if chain is None else chain
                    return ends
                if parsed.prev is not None:
                    self._check_link(parsed, chain, f"{path} byte {pos}", acked_known, pos == 0)
                chain = seg.end_seq = parsed.first + parsed.records
                seg.entries += 1
                ends.append(chain)
                pos = parsed.end_pos
        self._check_tail(meta, found, chain, acked_known)
        self._chain = self._acked if chain is None else chain
        return ends

    def _check_tail(
        self,
        meta: _Meta,
        found: list[tuple[int, str]],
        chain: int | None,
        acked_known: bool,
        *,
        newest_only: bool = False,
    ) -> None:
        """Is the end of the log still where meta recorded it at the last open or close?"""
        if not acked_known:
            return  # every check below needs the watermark
        acked = self._acked
        at = acked if chain is None else max(chain, acked)
        bases = {base for base, _ in found}
        newest_gone = (
            meta.version >= 2 and meta.newest is not None and meta.newest not in bases
        ) or (
            meta.version == 1 and not found  # that version never deleted its last segment
        )
        if newest_gone:
            # Whatever was put after that open went with it, and how far it got is unknown.
            known = max(meta.end or 0, meta.next_seq)
            name = f"{meta.newest:020d}.seg" if meta.newest is not None else "its last segment"
            self._missing(
                at,
                None,
                max(at, known),
                f"{name} was its newest segment when it was last opened, and it is gone"
                + ("" if found else " (no segment file is left)"),
            )
            return
        end = meta.end
        if end is not None and end > at and not newest_only:
            self._missing(
                at,
                end,
                end,
                f"it held entries up to seq {end - 1} when it was last opened or closed, but "
                f"now ends at seq {at} ({found[-1][1] if found else 'no segment file left'}): "
                "its newest segment was cut short",
            )

    def _check_link(
        self, entry: _Entry, chain: int | None, where: str, acked_known: bool, seg_start: bool
    ) -> None:
        """Does ``entry`` follow the entry before it? Missing unacked entries are an error."""
        prev = entry.prev
        assert prev is not None
        acked = self._acked
        if chain is None:
            # The oldest entry: everything before it must be acked (deleted whole segments).
            if acked_known and prev > acked:
                self._missing(
                    acked,
                    prev,
                    entry.first,
                    f"its oldest entry ({where}) follows one that ended at seq {prev}, but the "
                    f"ack watermark is {acked}: a segment before it was removed",
                )
        elif prev > chain and prev > acked:
            gone = "the segment before it was removed or cut" if seg_start else "entries are gone"
            self._missing(
                max(chain, acked),
                prev,
                entry.first,
                f"the entry at {where} follows one that ended at seq {prev}, but the entry "
                f"before it in the log ends at seq {chain}: {gone}",
            )
        elif prev < chain and chain > acked:
            # Nothing is missing, but the entries do not belong together (a segment restored
            # from an older copy, or one from another log): refuse to guess which is right.
            if self._on_corruption == "raise":
                raise WalCorruptionError(
                    f"write-ahead log {self._dir}: the entry at {where} follows one that ended "
                    f"at seq {prev}, but the entry before it in the log ends at seq {chain}: "
                    "segments from different histories (restored from a copy?). Inspect them, "
                    "or open once with on_corruption='truncate' to keep them as they are"
                )
            self._note(f"the entry at {where} does not follow the one before it; kept both")

    def _missing(self, lo: int, hi: int | None, resume: int, why: str) -> None:
        """Seqs ``lo..hi-1`` (at or above the ack watermark) are gone from the log.

        ``hi`` None: from ``lo`` on, up to wherever the producer got (not recorded). The
        consumer takes a producer's seqs strictly in order and would wait for them forever, so
        without a repair the producer must not start. ``resume`` is the first seq still logged
        after them (or the first not known to be used): "truncate" acknowledges everything
        below it.
        """
        acked = self._acked
        lost = f"every seq from {lo} on" if hi is None else _seqs(lo, hi)
        # Giving seqs up moves the ack watermark past them, and with it past the unacked
        # entries still logged before them (the only skip a consumer understands, §5 Failover).
        before = f" and {_seqs(acked, lo)} logged before them" if lo > acked else ""
        if self._on_corruption == "raise":
            if hi is None:
                fix = (
                    "Restore the missing file if you can. Otherwise the seqs this producer used "
                    "after that open are unknown (a consumer may hold some of them), so its "
                    f"numbering cannot go on safely: start it under a new producer_id (and "
                    f"remove {self._dir})"
                )
            else:
                fix = (
                    f"Restore the missing file(s) if you can; otherwise, to give up {lost}"
                    f"{before} and go on, open the log once with WriteAheadLog("
                    f"{self._root!r}, producer_id={self._producer_id!r}, "
                    "on_corruption='truncate') and close it, then restart the producer"
                )
            raise WalCorruptionError(
                f"write-ahead log {self._dir} is missing entries: {why}. Lost: {lost} (put, "
                f"never acknowledged by a consumer, which would wait for them forever). {fix}"
            )
        self._acked = max(acked, resume)
        reuse = (
            "; seqs used after the last open are not known and may be used again (a consumer "
            "that received them drops the new records)"
            if hi is None
            else ""
        )
        self._note(
            f"{why}; gave up {lost}{before} (ack watermark {acked} -> {self._acked}, "
            f"on_corruption='truncate'){reuse}"
        )

    def _note(self, what: str) -> None:
        self.recovered_with_corruption = True
        self.corruption_report = (
            f"{self.corruption_report}; {what}" if self.corruption_report else what
        )
        logger.warning("WalCorruption: write-ahead log %s: %s", self._dir, what)

    def _cut(
        self,
        idx: int,
        pos: int,
        bad: _Bad,
        found: list[tuple[int, str]],
        buf: bytes,
        chain: int | None,
        meta: _Meta,
        same_boot: bool | None,
    ) -> None:
        """Handle a bad entry at ``pos``: cut a bad tail, refuse to skip valid entries."""
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
                f"write-ahead log {path} is corrupt at byte {pos} ({bad.reason}) but a valid "
                f"entry follows at {later}; refusing to skip it silently. Inspect the file, or "
                f"open with on_corruption='truncate' to drop everything from byte {pos} on "
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
        if later is not None:
            what = (
                f"mid-log corruption at byte {pos} of {path} ({bad.reason}); cut {cut} bytes, "
                f"including valid entries from {later} (on_corruption='truncate')"
            )
        else:
            what = self._describe_tail(pos, bad, path, buf, chain, meta, same_boot, cut)
        self._note(what)

    def _describe_tail(
        self,
        pos: int,
        bad: _Bad,
        path: str,
        buf: bytes,
        chain: int | None,
        meta: _Meta,
        same_boot: bool | None,
        cut: int,
    ) -> str:
        """Why the log's last bytes were cut, and which seqs that lost, as far as known."""
        after = chain if chain is not None else self._acked
        head = f"the last entry, at byte {pos} of {path}, is invalid ({bad.reason})"
        if meta.end is not None and meta.end > after:
            # Those entries were complete (and synced, unless fsync='never') when meta was
            # saved: whatever the bytes look like now, this is damage, not a torn write.
            return (
                f"{head}, but the log held seqs up to {meta.end - 1} when it was last opened or "
                "closed: the file was damaged (cut short or overwritten) after they were "
                f"written, not torn by a crash; cut {cut} bytes; lost: {_seqs(after, meta.end)}"
            )
        if bad.torn:
            return (
                f"{head}: an append that never completed (the process or the machine stopped "
                f"during it), so with fsync='batch' its put had not returned; cut {cut} bytes"
            )
        if not any(buf[pos:]) and cut == len(buf) - pos:
            return (
                f"{head}: {cut} zero bytes, what an append leaves when the machine stops "
                f"before its data reaches the disk; cut them"
            )
        if bad.reason.startswith("bad magic"):
            return (
                f"{head}: {cut} bytes that are not an entry (damage, or written by something "
                "else); cut them, with any entry they overwrote"
            )
        if same_boot:
            # One write() per entry: a process that dies during it leaves the entry short,
            # never complete with a wrong checksum; only a machine crash could do that.
            cause = "damaged after it was written (the machine has not restarted since)"
        else:
            cause = (
                "damaged after it was written, or (if the machine crashed) its data never "
                "fully reached the disk"
            )
        if bad.claim is not None and bad.claim[0] == after and bad.claim[1] >= 1:
            lost = f"{_seqs(bad.claim[0], bad.claim[0] + bad.claim[1])} (per its header)"
        else:
            lost = "the seqs it held"
        return f"{head}, yet complete: {cause}, not a torn write; cut {cut} bytes; lost: {lost}"

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
        # meta names the newest segment, so that losing it (with what was put since the last
        # open) is detected; once per roll, i.e. per segment_bytes, and under the same mutex
        # as truncate, so the older segment cannot be deleted before meta names the new one.
        self._write_meta()

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
        prefix = _PREFIX.pack(MAGIC, size, first_seq, self._chain, count)
        crc = zlib.crc32(payload, zlib.crc32(prefix))
        entry = b"".join((prefix, struct.pack("<I", crc), payload))
        seg = self._segments[-1]
        if seg.size > 0 and seg.size + len(entry) > self._segment_bytes:
            self._roll(first_seq)
            seg = self._segments[-1]
        try:
            _write_all(self._fd, entry)
        except BaseException as exc:
            # Leave no partial entry behind: later appends would follow garbage and recovery
            # would (rightly) call that mid-log corruption.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)
            if isinstance(exc, OSError):  # a full disk, a file size limit: not accepted
                raise WalError(
                    f"cannot write the write-ahead log in {self._dir}: "
                    f"{exc.strerror or exc}; the record was not accepted: make room there "
                    "and put it again"
                ) from exc
            raise
        seg.size += len(entry)
        seg.entries += 1
        seg.end_seq = self._next_seq = self._chain = first_seq + count
        self._unacked.append(self._next_seq)
        self._dirty = True
        if self._policy == "batch" or (
            self._policy == "interval"
            and self._clock.monotonic() - self._last_sync >= self._interval
        ):
            self._sync_now()

    def _save_acked(self, *, durable: bool = False) -> None:
        # Throttled and not fsynced: replacing a file costs ~250 us on ext4, and a stale
        # watermark after a crash only replays acked entries, which the consumer drops. It is
        # made durable before segments are deleted: recovery checks that the oldest entry left
        # follows the watermark, and a stale one would look like a lost segment.
        durable = durable and self._durable
        if self._acked != (self._acked_durable if durable else self._acked_saved):
            self._replace("acked", b"%d\n" % self._acked, durable=durable)
            self._acked_saved = self._acked
            if durable:
                self._acked_durable = self._acked
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
        if len(self._segments) > 1 and self._segments[0].end_seq <= acked:
            self._save_acked(durable=True)  # first: see _save_acked
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
            snapshot = [(s.path, s.size, s.end_seq) for s in self._segments]
        return self._replay(snapshot, acked)

    def _replay(
        self, snapshot: list[tuple[str, int, int]], acked: int
    ) -> Iterator[tuple[int, int, bytes]]:
        chain: int | None = None
        for path, size, end_seq in snapshot:
            try:
                with open(path, "rb") as f:
                    buf = f.read(size)
            except FileNotFoundError:
                if end_seq > self._acked:  # not truncated away: something else removed it
                    raise WalCorruptionError(
                        f"write-ahead log segment {path} disappeared under this handle while "
                        f"it held unacknowledged seqs (below {end_seq}); is another tool "
                        "deleting files in it?"
                    ) from None
                chain = None  # truncated away meanwhile: every entry in it is acked
                continue
            pos = 0
            while pos < len(buf):
                parsed = _parse_entry(buf, pos)
                if isinstance(parsed, _Bad) or (
                    # The rule recovery applies: a break below the watermark is harmless.
                    chain is not None
                    and parsed.prev is not None
                    and parsed.prev != chain
                    and max(parsed.prev, chain) > acked
                ):
                    why = parsed.reason if isinstance(parsed, _Bad) else "out of sequence"
                    raise WalCorruptionError(
                        f"write-ahead log {path} changed under this handle: byte {pos} is no "
                        f"longer a valid entry ({why}); is another tool writing to it?"
                    )
                first, count, end = parsed.first, parsed.records, parsed.end_pos
                if first + count > acked:
                    yield first, count, buf[parsed.body_pos : end]
                chain = first + count
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
        """Flush per policy, record next_seq, release the directory. Idempotent.

        The newest segment stays, even when everything in it is acked: it is deleted once a
        later one exists and its seqs are all acked (so up to ``segment_bytes`` of acked data
        stays on disk).
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                if self._dirty and self._policy == "interval":
                    self._sync_now()
                self._save_acked()
                self._write_meta()
            except OSError as exc:
                # What was appended stays in the log; a stale watermark or meta file only
                # replays acked entries at the next open (the consumer drops them).
                raise WalError(
                    f"cannot finish the write-ahead log in {self._dir} at close: "
                    f"{exc.strerror or exc}; its records are kept and replayed at the next open"
                ) from exc
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
