"""Damaged or incomplete persistent state is reported, never silently skipped or re-delivered.

The producer's write-ahead log: an entry or segment that went missing (no torn bytes left to
see) must stop the producer with an error naming what is lost, since the consumer would wait
for those seqs forever; damage at the tail is reported as what it is. The consumer's dedup
state: a truncated, overwritten or wiped file must not pass for a valid state, which would
deliver records again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from pathlib import Path

import pytest

from sage_zmq import Empty, QueueDescriptor
from sage_zmq import testing as conf
from sage_zmq.errors import ConfigError
from sage_zmq.flow import DedupState, WalCorruptionError, WriteAheadLog
from sage_zmq.flow.dedup import DedupCorruptionError
from sage_zmq.flow.reliable import persist_paths
from sage_zmq.flow.wal import HEADER_SIZE

PID = "prod-1"
FAST = {
    "heartbeat_interval": 0.1,
    "liveness": 3,
    "ack_timeout": 0.2,
    "reconnect_initial": 0.02,
    "reconnect_max": 0.2,
}


@pytest.fixture(autouse=True)
def quiet_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests need the bytes on disk as the code leaves them, not a disk flush."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def segments(root: Path) -> list[Path]:
    return sorted((root / PID).glob("*.seg"))


def entries(seg: Path) -> list[tuple[int, int]]:
    """(offset, size) of every entry of a segment."""
    data = seg.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos + 4)
        out.append((pos, HEADER_SIZE + length))
        pos += HEADER_SIZE + length
    return out


def one_per_seq(wal: WriteAheadLog, n: int) -> None:
    """What the reliable producer does: one entry per record, seqs without gaps."""
    for _ in range(n):
        seq = wal.next_seq
        wal.append(seq, 1, b"record-%d" % seq)


def killed(root: Path, n: int, **kwargs: object) -> None:
    """A producer that logged ``n`` records and died (no close, nothing acked)."""
    wal = WriteAheadLog(root, producer_id=PID, **kwargs)  # type: ignore[arg-type]
    one_per_seq(wal, n)
    wal._release()


# -- missing entries and segments ---------------------------------------------------------


def test_an_entry_cut_out_cleanly_is_refused_and_named(tmp_path: Path) -> None:
    killed(tmp_path, 10)
    (seg,) = segments(tmp_path)
    data = seg.read_bytes()
    off, size = entries(seg)[4]
    seg.write_bytes(data[:off] + data[off + size :])  # seqs 0..3, 5..9: all entries valid
    with pytest.raises(WalCorruptionError) as info:
        WriteAheadLog(tmp_path, producer_id=PID)
    msg = str(info.value)
    assert "missing entries" in msg and f"{seg} byte {off}" in msg
    assert "Lost: seq 4 " in msg and "seqs 0..3 logged before them" in msg
    assert "on_corruption='truncate'" in msg
    assert seg.read_bytes() == data[:off] + data[off + size :]  # nothing changed on disk


def test_truncate_gives_up_the_hole_and_what_precedes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer can only skip a producer's seqs from the start (HELLO's acked)."""
    killed(tmp_path, 10)
    (seg,) = segments(tmp_path)
    data = seg.read_bytes()
    off, size = entries(seg)[4]
    seg.write_bytes(data[:off] + data[off + size :])
    with (
        caplog.at_level(logging.WARNING),
        WriteAheadLog(tmp_path, producer_id=PID, on_corruption="truncate") as wal,
    ):
        assert wal.recovered_with_corruption
        assert "gave up seq 4 and seqs 0..3" in wal.corruption_report
        assert wal.acked == 5  # so the HELLO tells the consumer to skip 0..4
        assert [first for first, _, _ in wal.replay()] == [5, 6, 7, 8, 9]
        assert wal.next_seq == 10
        one_per_seq(wal, 1)
    assert "gave up seq 4" in caplog.text
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:  # repaired for good
        assert not wal.recovered_with_corruption
        assert [first for first, _, _ in wal.replay()] == [5, 6, 7, 8, 9, 10]


def test_a_deleted_oldest_segment_is_refused(tmp_path: Path) -> None:
    killed(tmp_path, 40, segment_bytes=200)
    segs = segments(tmp_path)
    assert len(segs) > 3
    second = int(segs[1].name.split(".")[0])
    segs[0].unlink()  # nothing was acked: it held seqs 0..second-1
    with pytest.raises(WalCorruptionError, match=rf"Lost: seqs 0..{second - 1} ") as info:
        WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=200)
    assert "a segment before it was removed" in str(info.value)
    with WriteAheadLog(tmp_path, producer_id=PID, on_corruption="truncate") as wal:
        assert [first for first, _, _ in wal.replay()] == list(range(second, 40))


def test_a_deleted_middle_segment_is_refused(tmp_path: Path) -> None:
    killed(tmp_path, 40, segment_bytes=200)
    segs = segments(tmp_path)
    lo, hi = (int(s.name.split(".")[0]) for s in segs[1:3])
    segs[1].unlink()
    with pytest.raises(WalCorruptionError, match=rf"Lost: seqs {lo}..{hi - 1} ") as info:
        WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=200)
    assert f"{segs[2]} byte 0" in str(info.value) and "segment before it" in str(info.value)


def test_a_deleted_newest_segment_is_refused(tmp_path: Path) -> None:
    """Even the only one: meta names the newest segment (at open and at every roll)."""
    killed(tmp_path, 10)
    (seg,) = segments(tmp_path)
    seg.unlink()
    with pytest.raises(WalCorruptionError, match="every seq from 0 on") as info:
        WriteAheadLog(tmp_path, producer_id=PID)
    assert seg.name in str(info.value) and "new producer_id" in str(info.value)
    killed(tmp_path / "multi", 40, segment_bytes=200)
    segs = sorted((tmp_path / "multi" / PID).glob("*.seg"))
    segs[-1].unlink()
    with pytest.raises(WalCorruptionError, match=segs[-1].name):
        WriteAheadLog(tmp_path / "multi", producer_id=PID, segment_bytes=200)


def test_a_log_cut_short_at_an_entry_boundary_is_refused(tmp_path: Path) -> None:
    """No torn bytes to see, but meta recorded where the log ended at close."""
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        one_per_seq(wal, 10)
    (seg,) = segments(tmp_path)
    os.truncate(seg, entries(seg)[7][0])
    with pytest.raises(WalCorruptionError, match=r"up to seq 9 .* Lost: seqs 7..9 "):
        WriteAheadLog(tmp_path, producer_id=PID)


def test_segments_deleted_because_acked_are_not_taken_for_lost_ones(tmp_path: Path) -> None:
    """truncate() saves the watermark before deleting, even inside its save interval."""
    wal = WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=200, fsync_interval=3600)
    one_per_seq(wal, 40)
    n = len(segments(tmp_path))
    wal.truncate(30)
    assert len(segments(tmp_path)) < n
    assert (tmp_path / PID / "acked").read_text() == "30\n"
    wal._release()  # dies before any periodic save
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=200) as again:
        assert not again.recovered_with_corruption
        assert [first for first, _, _ in again.replay()][-10:] == list(range(30, 40))


def test_a_break_below_the_watermark_is_harmless(tmp_path: Path) -> None:
    killed(tmp_path, 10)
    (seg,) = segments(tmp_path)
    data = seg.read_bytes()
    off, size = entries(seg)[2]
    seg.write_bytes(data[:off] + data[off + size :])
    (tmp_path / PID / "acked").write_text("5\n")  # seq 2 was acked: nothing lost
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert not wal.recovered_with_corruption
        assert [first for first, _, _ in wal.replay()] == [5, 6, 7, 8, 9]


def test_deliberate_gaps_are_not_missing_entries(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=100) as wal:
        wal.append(5, 5, b"a")  # the API allows gaps; the chain records them
        wal.append(20, 1, b"b")
        wal.append(100, 3, b"c" * 80)  # in a segment of its own
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=100) as wal:
        assert [first for first, _, _ in wal.replay()] == [5, 20, 100]


def test_a_segment_deleted_under_an_open_log_is_reported_by_replay(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=200) as wal:
        one_per_seq(wal, 40)
        segments(tmp_path)[1].unlink()
        with pytest.raises(WalCorruptionError, match="disappeared under this handle"):
            list(wal.replay())


# -- damage at the tail: said as it is ------------------------------------------------------


def test_a_complete_last_entry_with_a_bad_checksum_is_damage_not_a_torn_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    killed(tmp_path, 10)  # fsync="batch": every put had returned
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), WriteAheadLog(tmp_path, producer_id=PID) as wal:
        report = wal.corruption_report
        assert [first for first, _, _ in wal.replay()] == list(range(9))
    assert "complete" in report and "not a torn write" in report
    assert "lost: seq 9 (per its header)" in report
    assert "never completed" not in report
    assert report in caplog.text


def test_an_incomplete_last_entry_is_reported_as_a_write_cut_short(tmp_path: Path) -> None:
    killed(tmp_path, 10)
    (seg,) = segments(tmp_path)
    os.truncate(seg, seg.stat().st_size - 3)
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert "never completed" in wal.corruption_report
        assert "put had not returned" in wal.corruption_report


def test_entries_cut_that_the_log_held_at_close_are_named_lost(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        one_per_seq(wal, 10)
    (seg,) = segments(tmp_path)
    os.truncate(seg, seg.stat().st_size - 3)  # looks torn, but the close recorded seq 9
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert "damaged" in wal.corruption_report
        assert "lost: seq 9" in wal.corruption_report


# -- formats --------------------------------------------------------------------------------


def test_a_format_1_log_is_still_read_and_continued(tmp_path: Path) -> None:
    import zlib

    d = tmp_path / PID
    d.mkdir()
    seg = bytearray()
    for seq in range(3):
        body = b"old-%d" % seq
        prefix = struct.pack("<4sIQI", b"SGW1", len(body), seq, 1)
        seg += prefix + struct.pack("<I", zlib.crc32(body, zlib.crc32(prefix))) + body
    (d / f"{0:020d}.seg").write_bytes(bytes(seg))
    meta = {"format": 1, "producer_id": PID, "epoch": 4, "next_seq": 0}
    (d / "meta").write_text(json.dumps(meta))
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert (wal.epoch, wal.next_seq) == (5, 3)
        assert [p for _, _, p in wal.replay()] == [b"old-0", b"old-1", b"old-2"]
        one_per_seq(wal, 2)
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert [first for first, _, _ in wal.replay()] == [0, 1, 2, 3, 4]


def test_meta_of_a_newer_format_is_refused_clearly(tmp_path: Path) -> None:
    WriteAheadLog(tmp_path, producer_id=PID).close()
    meta = json.loads((tmp_path / PID / "meta").read_text())
    meta["format"] = 99
    (tmp_path / PID / "meta").write_text(json.dumps(meta))
    with pytest.raises(WalCorruptionError, match="format 1 or 2"):
        WriteAheadLog(tmp_path, producer_id=PID)


# -- the dedup state --------------------------------------------------------------------------

HEADER, SLOT = 256, 256


def _state(path: Path, producers: int = 3) -> None:
    with DedupState(path, initial_slots=4) as s:
        for i in range(producers):
            s.mark(f"p{i}", 100 + i)


@pytest.mark.parametrize("size", [0, 20, HEADER, HEADER + SLOT + 7])
def test_a_truncated_dedup_file_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "dedup"
    _state(path)
    if size == 0:  # an older version dying while creating the file leaves this: fresh
        os.truncate(path, 0)
        with DedupState(path) as s:
            assert len(s) == 0
        return
    os.truncate(path, size)
    with pytest.raises(DedupCorruptionError, match=rf"dedup state {path} is damaged") as info:
        DedupState(path)
    assert "remove it" in str(info.value)


def test_dedup_slots_cut_off_the_end_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dedup"
    _state(path, producers=4)
    os.truncate(path, HEADER + 2 * SLOT)  # whole slots, but two producers gone
    with pytest.raises(DedupCorruptionError, match="counts 4 producers but holds 2"):
        DedupState(path)


@pytest.mark.parametrize("offset", [64, HEADER, HEADER + SLOT + 8])
def test_random_bytes_in_a_dedup_file_are_refused(tmp_path: Path, offset: int) -> None:
    path = tmp_path / "dedup"
    _state(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(1024) if offset != HEADER + SLOT + 8 else os.urandom(8))
    with pytest.raises(DedupCorruptionError, match=str(path)):
        DedupState(path)


def test_a_wiped_dedup_slot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dedup"
    _state(path)
    data = bytearray(path.read_bytes())
    data[HEADER + SLOT : HEADER + 2 * SLOT] = bytes(SLOT)  # a zeroed sector, say
    path.write_bytes(bytes(data))
    with pytest.raises(DedupCorruptionError, match="slots were wiped") as info:
        DedupState(path)
    assert "'p0'" in str(info.value)  # names what it held, so the impact is known


def test_an_all_zero_dedup_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dedup"
    _state(path)
    path.write_bytes(bytes(path.stat().st_size))
    with pytest.raises(ConfigError, match=r"not a sage-zmq dedup state file.*damaged"):
        DedupState(path)


def _word(path: Path, offset: int, value: int | None = None) -> int:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = int.from_bytes(f.read(8), "little")
        if value is not None:
            f.seek(offset)
            f.write(value.to_bytes(8, "little"))
    return old


def test_a_lowered_seq_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dedup"
    _state(path)
    _word(path, HEADER + SLOT, 3)  # p1's seq, 101 -> 3: would deliver 4..101 again
    with pytest.raises(DedupCorruptionError, match="consumed seq of producer 'p1'"):
        DedupState(path)


def test_a_mark_cut_short_between_its_stores_counts_as_not_consumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """seq stored, its check not yet: the record was still the application's (§5)."""
    path = tmp_path / "dedup"
    _state(path)
    _word(path, HEADER + SLOT, 102)  # p1: 101 -> 102, check still says 101
    with caplog.at_level(logging.WARNING), DedupState(path) as s:
        assert s.last("p1") == 101
        s.mark("p1", 102)
    assert "cut short" in caplog.text
    with DedupState(path) as s:
        assert s.producers() == {"p0": 100, "p1": 102, "p2": 102}


def test_an_epoch_change_cut_short_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dedup"
    with DedupState(path) as s:
        s.mark("p", 1, epoch=3)
    tag_at = HEADER + 32
    _word(path, tag_at, _word(path, tag_at) | 1 << 62)  # pending
    _word(path, HEADER + 16, 4)  # new epoch stored, its check not
    with DedupState(path) as s:
        assert s.epoch("p") == 4
    with DedupState(path) as s:  # and repaired
        assert s.epoch("p") == 4
    _word(path, HEADER + 16, 9)  # the same without the pending bit: damage
    with pytest.raises(DedupCorruptionError, match="epoch of producer 'p'"):
        DedupState(path)


def test_a_claim_or_release_cut_short_leaves_a_count_one_short(tmp_path: Path) -> None:
    path = tmp_path / "dedup"
    _state(path)
    header_used = _word(path, 16)
    with DedupState(path) as s:
        s.mark("p3", 1)
    _word(path, 16, header_used)  # killed after the tag, before the count
    with DedupState(path) as s:
        assert len(s) == 4
        s.reset("p0")
    with DedupState(path) as s:
        assert sorted(s.producers()) == ["p1", "p2", "p3"]


def test_a_format_1_dedup_file_is_converted(tmp_path: Path) -> None:
    import zlib

    path = tmp_path / "dedup"
    data = bytearray(64 + 4 * 128)
    data[:12] = b"SGDEDUP1" + (128).to_bytes(4, "little")
    for slot, (name, seq, epoch) in enumerate([(b"a", 7, 2), (b"b\xc3\xa9", 9, 0)]):
        off = 64 + (slot + 1) * 128  # slot 0 left free
        tag = 1 << 63 | len(name) << 32 | zlib.crc32(name)
        struct.pack_into("<3Q", data, off, seq, epoch, tag)
        data[off + 24 : off + 24 + len(name)] = name
    path.write_bytes(bytes(data))
    with DedupState(path) as s:
        assert s.producers() == {"a": 7, "bé": 9}
        assert (s.epoch("a"), s.epoch("bé")) == (2, None)
        s.mark("a", 8)
    assert path.read_bytes()[:8] == b"SGDEDUP2"
    assert not list(tmp_path.glob("*.tmp"))
    with DedupState(path) as s:
        assert s.producers() == {"a": 8, "bé": 9}
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(DedupCorruptionError, match="format-1 file of 100 bytes"):
        DedupState(path)


# -- through the queue ------------------------------------------------------------------------


def test_a_producer_with_a_missing_log_entry_refuses_to_start(tmp_path: Path) -> None:
    """Before: the restarted producer replayed around the hole and the stream stalled."""
    persist = str(tmp_path / "persist")
    qd = QueueDescriptor("gap", "sage", {**FAST, "persist": persist, "maxsize": 100})
    for i in range(6):
        qd.put(i, timeout=conf.GET_TIMEOUT)
    with contextlib.suppress(Exception):
        qd.close(timeout=0.1)  # nobody consumed: the six stay in the log
    wal_root, _ = persist_paths(persist, "gap")
    (pid,) = os.listdir(wal_root)
    (seg,) = Path(wal_root, pid).glob("*.seg")
    data = seg.read_bytes()
    off, size = entries(seg)[2]
    seg.write_bytes(data[:off] + data[off + size :])
    qd = QueueDescriptor._restore("gap", "sage", dict(qd.metadata))
    try:
        with pytest.raises(WalCorruptionError, match="Lost: seq 2 "):
            qd.put("x", timeout=conf.GET_TIMEOUT)
    finally:
        with contextlib.suppress(Exception):
            qd.close(timeout=0.1)


def test_a_consumer_dedup_file_cut_short_is_refused_not_padded(tmp_path: Path) -> None:
    """Before: the cut file was padded with empty slots and records 0..9 came again.

    Opened directly: a consumer whose state fails to open leaks its bound socket (its
    constructor does not close its inlets), which the leak check here would report.
    """
    persist = str(tmp_path / "persist")
    qd = QueueDescriptor(
        "dd", "sage", {**FAST, "persist": persist, "maxsize": 100, "producer_id": "p"}
    )
    try:
        for i in range(10):
            qd.put(i, timeout=conf.GET_TIMEOUT)
        assert conf.drain(qd, 10) == list(range(10))
    finally:
        with contextlib.suppress(Empty):
            qd.get(timeout=0.05)
        qd.close()
    _, dedup = persist_paths(persist, "dd")
    with DedupState(dedup) as state:
        assert state.last("p") == 9
    os.truncate(dedup, 20)
    with pytest.raises(DedupCorruptionError, match=f"dedup state {dedup} is damaged"):
        DedupState(dedup)
