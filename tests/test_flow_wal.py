"""WriteAheadLog: round trip, truncation, recovery from torn/corrupt logs, fsync policies."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import stat
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from sage_zmq.errors import ConfigError, SageZmqError
from sage_zmq.flow import (
    FakeClock,
    PersistLockedError,
    SystemClock,
    WalCorruptionError,
    WalError,
    WriteAheadLog,
)
from sage_zmq.flow.wal import HEADER_SIZE

PID = "prod-1"


def payload(seq: int) -> bytes:
    return b"batch-%d-" % seq + bytes([seq % 251]) * (seq % 37)


def fill(wal: WriteAheadLog, batches: int, per: int = 10) -> list[tuple[int, int, bytes]]:
    out = []
    for _ in range(batches):
        first = wal.next_seq
        wal.append(first, per, payload(first))
        out.append((first, per, payload(first)))
    return out


def segments(root: Path) -> list[Path]:
    return sorted((root / PID).glob("*.seg"))


@pytest.fixture
def quiet_fsync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count os.fsync calls (and skip the real disk flush: tests need counts, not disks)."""
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    return calls


def test_append_replay_round_trip_and_reopen(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        written = fill(wal, 20)
        assert list(wal.replay()) == written
        assert wal.next_seq == 200
        st = wal.statistics()
        assert (st.entries, st.unacked_entries, st.segments) == (20, 20, 1)
        assert st.bytes == sum(HEADER_SIZE + len(p) for _, _, p in written)
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert list(wal.replay()) == written
        assert not wal.recovered_with_corruption
        assert wal.statistics().corrupt_tail_bytes == 0


def test_empty_payload_and_memoryview_payload(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        wal.append(0, 1, b"")
        wal.append(1, 2, memoryview(bytearray(b"xyz")))
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert list(wal.replay()) == [(0, 1, b""), (1, 2, b"xyz")]


def test_truncate_deletes_whole_acked_segments(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=200) as wal:
        written = fill(wal, 30)
        n_segments = len(segments(tmp_path))
        assert n_segments > 5 and wal.statistics().segments == n_segments
        wal.truncate(155)  # mid-entry: the entry holding 150..159 stays, whole
        left = segments(tmp_path)
        assert len(left) < n_segments
        replayed = list(wal.replay())
        assert replayed == [e for e in written if e[0] + e[1] > 155]
        assert replayed[0][0] == 150
        assert wal.statistics().unacked_entries == 15
        # Every deleted segment held only acked seqs.
        assert int(left[0].name.split(".")[0]) <= 150
        wal.truncate(100)  # going backwards is a no-op
        assert wal.acked == 155
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=200) as wal:
        assert wal.acked == 155
        assert list(wal.replay()) == replayed
        wal.truncate(wal.next_seq)
        assert list(wal.replay()) == []
        assert len(segments(tmp_path)) == 1  # the active segment is kept


def test_ack_watermark_is_saved_at_most_every_interval(
    tmp_path: Path, quiet_fsync: list[int]
) -> None:
    """Saving it costs a file replace; a stale one after a crash only replays acked data."""
    clock = FakeClock()
    wal = WriteAheadLog(tmp_path, producer_id=PID, fsync_interval=0.1, clock=clock)
    written = fill(wal, 5)
    acked_file = tmp_path / PID / "acked"
    wal.truncate(10)
    assert not acked_file.exists()  # within the interval since open
    clock.advance(0.1)
    wal.truncate(20)
    assert acked_file.read_text() == "20\n"
    wal.truncate(30)
    assert acked_file.read_text() == "20\n"
    assert [first for first, _, _ in wal.replay()] == [30, 40]
    wal._release()  # the process dies: close() never runs
    with WriteAheadLog(tmp_path, producer_id=PID) as again:
        assert again.acked == 20
        assert list(again.replay()) == written[2:]  # 20..29 again, for the consumer to drop
        again.truncate(30)
        again.sync()
        assert acked_file.read_text() == "30\n"
        again.truncate(40)
    assert acked_file.read_text() == "40\n"  # close() saves it


def test_truncate_beyond_next_seq_is_refused(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        fill(wal, 1)
        with pytest.raises(WalError, match="never appended"):
            wal.truncate(11)
        with pytest.raises(WalError, match="int ack watermark"):
            wal.truncate(-1)


def test_epoch_increments_and_next_seq_continues(tmp_path: Path, quiet_fsync: list[int]) -> None:
    epochs = []
    for round_ in range(3):
        with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=100) as wal:
            epochs.append(wal.epoch)
            assert wal.next_seq == round_ * 50
            fill(wal, 5)
            wal.truncate(wal.next_seq)  # all acked: only the active segment remains
    assert epochs == [1, 2, 3]
    with WriteAheadLog(tmp_path, producer_id="other") as wal:
        assert (wal.epoch, wal.next_seq) == (1, 0)


def test_next_seq_survives_lost_meta_hint(tmp_path: Path, quiet_fsync: list[int]) -> None:
    """A killed producer never rewrote meta at close: next_seq comes from the segments."""
    wal = WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=100)
    fill(wal, 5)
    wal.truncate(wal.next_seq)
    wal._release()  # simulate the process dying: no close()
    meta = json.loads((tmp_path / PID / "meta").read_text())
    meta["next_seq"] = 0  # a hint as stale as can be (meta is saved at open and roll only)
    (tmp_path / PID / "meta").write_text(json.dumps(meta))
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert wal.next_seq == 50
        assert wal.epoch == 2


def test_append_must_not_go_backwards(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        wal.append(5, 5, b"a")
        with pytest.raises(WalError, match="next_seq=10"):
            wal.append(9, 1, b"b")
        with pytest.raises(WalError, match="count"):
            wal.append(10, 0, b"b")
        wal.append(20, 1, b"gap is fine")
        assert wal.next_seq == 21


def _torn_log(tmp_path: Path) -> tuple[Path, list[tuple[int, int, bytes]]]:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        written = fill(wal, 5)
    (seg,) = segments(tmp_path)
    return seg, written


def test_torn_tail_is_reported_cut_and_appends_continue(
    tmp_path: Path, quiet_fsync: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    seg, written = _torn_log(tmp_path)
    full = seg.stat().st_size
    last_len = HEADER_SIZE + len(written[-1][2])
    os.truncate(seg, full - last_len + HEADER_SIZE + 2)  # header and 2 payload bytes
    with caplog.at_level(logging.WARNING, logger="sage_zmq.flow.wal"):
        wal = WriteAheadLog(tmp_path, producer_id=PID)
    with wal:
        assert wal.recovered_with_corruption
        assert wal.statistics().corrupt_tail_bytes == HEADER_SIZE + 2
        assert "WalCorruption" in caplog.text and "torn entry" in caplog.text
        assert list(wal.replay()) == written[:-1]
        assert seg.stat().st_size == full - last_len  # the bad tail is gone from disk
        # The clean close recorded next_seq, so the lost entry's seqs are not reused.
        assert wal.next_seq == 50
        wal.append(wal.next_seq, 3, b"after")
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert not wal.recovered_with_corruption
        assert list(wal.replay()) == [*written[:-1], (50, 3, b"after")]


@pytest.mark.parametrize("where", ["payload", "header", "crc"])
def test_flipped_bytes_in_last_entry_are_cut(
    tmp_path: Path, quiet_fsync: list[int], where: str
) -> None:
    seg, written = _torn_log(tmp_path)
    data = bytearray(seg.read_bytes())
    start = len(data) - HEADER_SIZE - len(written[-1][2])
    offset = {"payload": len(data) - 1, "header": start + 10, "crc": start + 21}[where]
    data[offset] ^= 0xFF
    seg.write_bytes(bytes(data))
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert wal.recovered_with_corruption
        assert wal.statistics().corrupt_tail_bytes == len(data) - start
        assert list(wal.replay()) == written[:-1]


def test_zero_filled_tail_is_cut(tmp_path: Path, quiet_fsync: list[int]) -> None:
    """What an unsynced append can leave after a machine crash: a size with no data."""
    seg, written = _torn_log(tmp_path)
    with open(seg, "ab") as f:
        f.write(b"\0" * 300)
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert wal.statistics().corrupt_tail_bytes == 300
        assert list(wal.replay()) == written


def test_mid_file_corruption_raises_unless_truncate(tmp_path: Path, quiet_fsync: list[int]) -> None:
    seg, written = _torn_log(tmp_path)
    data = bytearray(seg.read_bytes())
    second = HEADER_SIZE + len(written[0][2])
    data[second + HEADER_SIZE] ^= 0x01  # payload of entry 2 of 5
    seg.write_bytes(bytes(data))
    meta = json.loads((tmp_path / PID / "meta").read_text())
    meta["next_seq"] = 0  # as if the producer was killed: only the segments tell next_seq
    (tmp_path / PID / "meta").write_text(json.dumps(meta))
    with pytest.raises(WalCorruptionError, match=rf"byte {second} \(CRC mismatch\)") as info:
        WriteAheadLog(tmp_path, producer_id=PID)
    assert "on_corruption='truncate'" in str(info.value)
    assert isinstance(info.value, SageZmqError)
    assert seg.read_bytes() == bytes(data)  # nothing was cut behind our back
    with WriteAheadLog(tmp_path, producer_id=PID, on_corruption="truncate") as wal:
        assert wal.recovered_with_corruption
        assert list(wal.replay()) == written[:1]
        # Dropped entries may have been delivered: their seqs are never reused.
        assert wal.next_seq == 50
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert list(wal.replay()) == written[:1]


def test_corruption_at_end_of_a_segment_followed_by_valid_segment_raises(
    tmp_path: Path, quiet_fsync: list[int]
) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=120) as wal:
        fill(wal, 6)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    data = bytearray(segs[0].read_bytes())
    data[-1] ^= 0xFF
    segs[0].write_bytes(bytes(data))
    with pytest.raises(WalCorruptionError, match="valid entry follows"):
        WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=120)


def test_failed_write_leaves_no_partial_entry(
    tmp_path: Path, quiet_fsync: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        written = fill(wal, 2)
        monkeypatch.setattr(os, "write", half_then_enospc)
        # Said as the log's error, naming where and what to do; the cause stays attached.
        with pytest.raises(WalError, match=r"No space left.*not accepted") as info:
            wal.append(20, 1, b"x" * 100)
        assert isinstance(info.value.__cause__, OSError)
        monkeypatch.setattr(os, "write", real_write)
        assert wal.next_seq == 20
        wal.append(20, 1, b"y")
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert not wal.recovered_with_corruption
        assert list(wal.replay()) == [*written, (20, 1, b"y")]


def test_fsync_batch_and_never(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path / "b", producer_id=PID, fsync="batch") as wal:
        quiet_fsync.clear()
        fill(wal, 7)
        assert len(quiet_fsync) == 7
        assert wal.statistics().fsyncs >= 7
    quiet_fsync.clear()
    with WriteAheadLog(tmp_path / "n", producer_id=PID, fsync="never") as wal:
        fill(wal, 7)
        wal.truncate(30)
    assert quiet_fsync == []


def test_fsync_interval_at_most_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(100.0)
    times: list[float] = []
    monkeypatch.setattr(os, "fsync", lambda fd: times.append(clock.monotonic()))
    wal = WriteAheadLog(
        tmp_path, producer_id=PID, fsync="interval", fsync_interval=0.1, clock=clock
    )
    times.clear()
    for i in range(100):  # an append every 10 ms for one fake second
        wal.append(i, 1, b"r")
        clock.advance(0.01)
    assert 9 <= len(times) <= 10, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.1 - 1e-9
    # Data appended since the last fsync is synced by sync() and close(), once.
    wal.sync()
    n = len(times)
    wal.append(100, 1, b"r")
    assert len(times) == n  # within the interval of that sync
    wal.sync()
    wal.sync()
    assert len(times) == n + 1
    wal.append(101, 1, b"r")
    wal.close()
    assert len(times) >= n + 2


def test_sigkilled_batch_writer_loses_nothing_it_reported(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_writer, args=(str(tmp_path), child), daemon=True)
    proc.start()
    child.close()
    try:
        reported: list[int] = []
        while len(reported) < 60:
            assert parent.poll(60), "writer process did not report"
            reported.append(parent.recv())
    finally:
        proc.kill()  # SIGKILL
        proc.join(30)
        parent.close()
    assert proc.exitcode == -signal.SIGKILL
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        replayed = {first: data for first, _, data in wal.replay()}
        for first in reported:
            assert replayed[first] == payload(first)
        assert wal.next_seq >= reported[-1] + 3
        assert wal.epoch == 2


def _writer(root: str, conn: Connection) -> None:
    with WriteAheadLog(root, producer_id=PID, fsync="batch", segment_bytes=4096) as wal:
        while True:
            first = wal.next_seq
            wal.append(first, 3, payload(first))
            conn.send(first)


def test_permissions_and_layout(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        fill(wal, 2)
        wal.truncate(5)
        assert wal.path == str(tmp_path / PID)
    assert stat.S_IMODE((tmp_path / PID).stat().st_mode) == 0o700
    names = set()
    for f in (tmp_path / PID).iterdir():
        names.add(f.name if not f.name.endswith(".seg") else "*.seg")
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert names == {"lock", "meta", "acked", "*.seg"}


def test_one_writer_per_producer(tmp_path: Path, quiet_fsync: list[int]) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID):
        with pytest.raises(PersistLockedError, match="already open"):
            WriteAheadLog(tmp_path, producer_id=PID)
        WriteAheadLog(tmp_path, producer_id="another").close()
    WriteAheadLog(tmp_path, producer_id=PID).close()


def test_closed_log_refuses_use(tmp_path: Path, quiet_fsync: list[int]) -> None:
    wal = WriteAheadLog(tmp_path, producer_id=PID)
    wal.close()
    wal.close()
    with pytest.raises(WalError, match="closed"):
        wal.append(0, 1, b"")
    with pytest.raises(WalError, match="closed"):
        wal.replay()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fsync": "sometimes"}, "fsync must be one of"),
        ({"fsync_interval": 0}, "fsync_interval"),
        ({"segment_bytes": 10}, "segment_bytes"),
        ({"on_corruption": "ignore"}, "on_corruption"),
        ({"producer_id": "../escape"}, "safe file name"),
        ({"producer_id": ".hidden"}, "safe file name"),
        ({"producer_id": ""}, "non-empty"),
        ({"producer_id": "x" * 200}, "longer than"),
    ],
)
def test_bad_configuration_is_named(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"producer_id": PID, **kwargs}
    with pytest.raises(ConfigError, match=match):
        WriteAheadLog(tmp_path, **args)  # type: ignore[arg-type]


def test_meta_of_another_producer_is_refused(tmp_path: Path, quiet_fsync: list[int]) -> None:
    WriteAheadLog(tmp_path, producer_id=PID).close()
    os.rename(tmp_path / PID, tmp_path / "renamed")
    with pytest.raises(WalCorruptionError, match="belongs to producer 'prod-1'"):
        WriteAheadLog(tmp_path, producer_id="renamed")


def test_unreadable_ack_watermark_replays_everything(
    tmp_path: Path, quiet_fsync: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        written = fill(wal, 3)
        wal.truncate(25)
    (tmp_path / PID / "acked").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING), WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert list(wal.replay()) == written
    assert "ack watermark" in caplog.text


def test_append_and_truncate_from_two_threads(tmp_path: Path, quiet_fsync: list[int]) -> None:
    """The producer appends in put() while its ack thread truncates."""
    with WriteAheadLog(tmp_path, producer_id=PID, segment_bytes=300, fsync="never") as wal:
        done = threading.Event()
        errors: list[BaseException] = []

        def acker() -> None:
            try:
                while not done.is_set():
                    wal.truncate(max(0, wal.next_seq - 20))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=acker)
        t.start()
        try:
            fill(wal, 500)
        finally:
            done.set()
            t.join(10)
        assert not errors
        wal.truncate(4985)
        assert [first for first, _, _ in wal.replay()] == [4980, 4990]
    with WriteAheadLog(tmp_path, producer_id=PID) as wal:
        assert [first for first, _, _ in wal.replay()] == [4980, 4990]


# -- the clock the WAL (and heartbeat logic) is driven by ----------------------------------


def test_fake_clock_fires_timers_in_order_at_their_times() -> None:
    clock = FakeClock()
    fired: list[tuple[str, float]] = []
    clock.call_at(2.0, lambda: fired.append(("b", clock.monotonic())))
    clock.call_at(1.0, lambda: fired.append(("a", clock.monotonic())))
    cancelled = clock.call_later(1.5, lambda: fired.append(("x", 0.0)))
    cancelled.cancel()
    clock.call_at(2.0, lambda: clock.call_later(0.5, lambda: fired.append(("c", 0.0))))
    clock.advance(0.5)
    assert fired == []
    clock.advance(2.5)
    assert fired == [("a", 1.0), ("b", 2.0), ("c", 0.0)]
    assert clock.monotonic() == 3.0 and clock.pending_timers() == 0
    with pytest.raises(ValueError, match="seconds >= 0"):
        clock.advance(-1)


def test_fake_clock_wait_and_sleep_follow_fake_time() -> None:
    clock = FakeClock()
    never, soon = threading.Event(), threading.Event()
    seen: list[object] = []

    def worker() -> None:
        seen.append(clock.wait(never, 5.0))
        seen.append(clock.monotonic())
        clock.sleep(1.0)
        seen.append(clock.monotonic())
        seen.append(clock.wait(soon, 1000.0))

    t = threading.Thread(target=worker)
    t.start()
    try:
        for _ in range(10_000):
            if len(seen) >= 3:
                break
            clock.advance(0.25)
            t.join(0.001)
        assert seen[0] is False
        woke, slept = seen[1], seen[2]
        assert isinstance(woke, float) and isinstance(slept, float)
        assert woke >= 5.0 and slept - woke >= 1.0
        soon.set()  # no fake time passes: wait returns as soon as the event is seen
        t.join(10)
        assert not t.is_alive() and seen[3] is True
    finally:
        never.set()
        soon.set()
        clock.advance(2000)
        t.join(10)
    auto = FakeClock(autoadvance=True)
    auto.sleep(3)
    assert auto.monotonic() == 3.0


def test_system_clock() -> None:
    clock = SystemClock()
    ev = threading.Event()
    fired = threading.Event()
    t0 = clock.monotonic()
    timer = clock.call_at(t0, fired.set)
    assert fired.wait(10)
    timer.cancel()
    assert clock.wait(ev, 0.001) is False
    assert clock.monotonic() >= t0


def test_an_ack_watermark_that_cannot_be_saved_does_not_fail_a_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk can refuse the watermark file while appends still fit: the records are in
    # the log, so the put that happened to read the ack must not raise (the caller would put
    # an accepted record again).
    from sage_zmq import QueueDescriptor
    from sage_zmq.testing import close_quietly

    def no_space(self: WriteAheadLog, *, durable: bool = False) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WriteAheadLog, "_save_acked", no_space)
    caplog.set_level("WARNING", logger="sage_zmq")
    qd = QueueDescriptor(None, "sage", {"persist": str(tmp_path), "maxsize": 16})
    try:
        got = []
        for i in range(200):  # acks come back all along: each may be read by a put
            qd.put(i, timeout=10)
            got.append(qd.get(timeout=10))
        assert got == list(range(200))
        assert any("ack watermark" in r.getMessage() for r in caplog.records)
        with pytest.raises(WalError, match=r"at close.*kept and replayed"):
            qd.close()  # the log's own close cannot save it either: said, and the ends close
    finally:
        close_quietly(qd)
