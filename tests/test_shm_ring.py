"""Release rings (sage_zmq/shm/ring.py, PROTOCOL.md §6): the ring itself, the consumer's choice
between ring and RELEASE frames, and queues that hand slots back through one."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from sage_zmq import QueueDescriptor
from sage_zmq.errors import DeliveryError, SecurityError
from sage_zmq.shm import ring as ring_mod
from sage_zmq.shm import transfer
from sage_zmq.shm.pool import ShmError
from sage_zmq.shm.ring import HEADER_WORDS, ReleaseRing
from sage_zmq.shm.sweep import SHM_DIR, list_segments
from sage_zmq.shm.transfer import ShmReceiver

T = 20.0
KiB = 1024

needs_ring = pytest.mark.skipif(not ring_mod.SUPPORTED, reason="release rings are x86-64 only")


@pytest.fixture
def ring() -> Any:
    owner = ReleaseRing.create(capacity=8)
    reader = ReleaseRing.open(owner.name)
    yield owner, reader
    reader.close()
    owner.close()


# ------------------------------------------------------------------------------- the ring


def test_releases_come_out_in_order_across_the_wrap(ring: Any) -> None:
    writer, reader = ring
    assert reader.take() == []
    taken: list[int] = []
    for start in range(0, 40, 5):  # 8 entries: the positions wrap several times
        assert writer.put(list(range(start, start + 5))) == 5
        taken += reader.take()
    assert taken == list(range(40))


def test_a_full_ring_takes_what_fits_and_the_rest_waits_for_the_reader(ring: Any) -> None:
    writer, reader = ring
    assert writer.put(list(range(10))) == 8
    assert writer.put([99]) == 0
    assert reader.take() == list(range(8))
    assert writer.put([8, 9]) == 2
    assert reader.take() == [8, 9]


def test_slot_zero_and_the_largest_id_fit_and_larger_ids_go_as_frames(ring: Any) -> None:
    writer, reader = ring
    assert writer.put([0, 2**63 - 1]) == 2
    assert reader.take() == [0, 2**63 - 1]
    assert writer.put([2**63, 5]) == 0  # stops at the id an entry cannot hold
    assert writer.put([-1]) == 0
    assert reader.take() == []


def test_the_reader_attaches_with_its_pid_and_detaches_on_close() -> None:
    writer = ReleaseRing.create(capacity=4)
    try:
        reader = ReleaseRing.open(writer.name)
        assert writer.reader == 0
        reader.attach()
        assert writer.reader == os.getpid()
        reader.close()
        assert writer.reader == 0
        assert os.path.exists(os.path.join(SHM_DIR, writer.name))  # the owner lives: kept
    finally:
        writer.close()
    assert not os.path.exists(os.path.join(SHM_DIR, writer.name))
    assert writer.reader == 0 and writer.closed


def test_a_ring_is_created_with_mode_0600() -> None:
    writer = ReleaseRing.create(capacity=4)
    try:
        mode = os.stat(os.path.join(SHM_DIR, writer.name)).st_mode & 0o777
        assert mode == 0o600
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../etc/passwd", "not a valid segment name"),
        (".hidden", "not a valid segment name"),
        ("sagezmq-1-ab-0-missing", "cannot open release ring"),
    ],
)
def test_open_refuses_bad_names(name: str, match: str) -> None:
    with pytest.raises(ShmError, match=match):
        ReleaseRing.open(name)


def _plain_file(tmp_name: str, data: bytes) -> str:
    path = os.path.join(SHM_DIR, tmp_name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\0" * 8 * (HEADER_WORDS + 4), "not a release ring"),
        (b"\0" * 12, "bad size"),
    ],
)
def test_open_refuses_a_file_that_is_not_a_ring(data: bytes, match: str) -> None:
    name = f"sagezmq-{os.getpid()}-feed-9"
    path = _plain_file(name, data)
    try:
        with pytest.raises(ShmError, match=match):
            ReleaseRing.open(name)
    finally:
        os.unlink(path)


def test_open_refuses_a_symlink() -> None:
    writer = ReleaseRing.create(capacity=4)
    link = os.path.join(SHM_DIR, f"sagezmq-{os.getpid()}-beef-7")
    os.symlink(os.path.join(SHM_DIR, writer.name), link)
    try:
        with pytest.raises((ShmError, SecurityError)):
            ReleaseRing.open(os.path.basename(link))
    finally:
        os.unlink(link)
        writer.close()


def _make_ring_and_wait(conn: Connection) -> None:
    ring = ReleaseRing.create(capacity=4)
    conn.send(ring.name)
    conn.recv()  # SIGKILLed here: its ring stays behind


def test_a_reader_removes_the_ring_of_a_consumer_that_died() -> None:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_make_ring_and_wait, args=(theirs,), daemon=True)
    proc.start()
    theirs.close()
    try:
        assert mine.poll(T)
        name = mine.recv()
        reader = ReleaseRing.open(name)
        reader.attach()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(T)
        reader.close()
        assert name not in list_segments()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(T)


# --------------------------------------------------------------- the consumer's choice


class _Codec:
    shm_origin: Any = b"peer"


Frames = list[tuple[Any, list[int]]]


def _receiver() -> tuple[ShmReceiver, Callable[[Any, str, list[int]], bool], Frames]:
    """A consumer's receiver, and a RELEASE sender that records what it was given."""
    frames: Frames = []

    def send(peer: Any, producer: str, ids: list[int]) -> bool:
        frames.append((peer, ids))
        return True

    return ShmReceiver(_Codec()), send, frames


def test_releases_go_as_frames_until_the_producer_attaches() -> None:
    receiver, send, frames = _receiver()
    receiver.rings[b"peer"] = ReleaseRing.create(capacity=4)
    reader = ReleaseRing.open(receiver.rings[b"peer"].name)
    try:
        receiver._released(b"peer", 7)
        receiver.flush(send, force=True)
        assert frames == [(b"peer", [7])] and reader.take() == []
        reader.attach()
        for slot_id in (8, 9, 10, 11, 12, 13):
            receiver._released(b"peer", slot_id)
        receiver.flush(send, force=False)  # not due for frames: the ring takes them
        assert reader.take() == [8, 9, 10, 11]
        assert receiver.ring_releases == 4
        assert list(receiver.unsent_releases) == [(b"peer", 12), (b"peer", 13)]  # full
        receiver.flush(send, force=True)
        assert reader.take() == [12, 13] and frames == [(b"peer", [7])]
        for slot_id in range(20, 26):
            receiver._released(b"peer", slot_id)
        receiver.flush(send, force=True)  # due: what the full ring refuses goes now
        assert reader.take() == [20, 21, 22, 23]
        assert frames[-1] == (b"peer", [24, 25])
    finally:
        reader.close()
        receiver.close()
    assert not receiver.rings


def test_a_consumer_keeps_a_bounded_number_of_rings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "MAX_RINGS", 2)
    receiver, send, _ = _receiver()
    try:
        for peer in (b"a", b"b", b"c"):
            receiver._new_ring(peer)
        assert set(receiver.rings) == {b"a", b"b"}  # c's releases go as frames
        # A producer that attached and then closed (detached) frees its place.
        reader = ReleaseRing.open(receiver.rings[b"a"].name)
        reader.attach()
        receiver._released(b"a", 1)
        receiver.flush(send, force=True)
        reader.close()
        receiver._new_ring(b"d")
        assert set(receiver.rings) == {b"b", b"d"}
    finally:
        receiver.close()


# ----------------------------------------------------------------------------- queues


@pytest.fixture
def make(queues: Callable[..., QueueDescriptor]) -> Callable[..., QueueDescriptor]:
    return lambda **meta: queues(None, "shm", {"maxsize": 100, **meta})


def _producer(conn: Connection, qd: QueueDescriptor, n: int, nbytes: int) -> None:
    src = np.zeros(nbytes // 8)
    for i in range(n):
        src[0] = src[-1] = i
        qd.put(src, timeout=T)
    stats = qd._handle().producer(qd).shm.statistics()
    qd.close(timeout=T)
    conn.send(stats)


def _run(qd: QueueDescriptor, n: int, nbytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_producer, args=(theirs, qd, n, nbytes), daemon=True)
    proc.start()
    theirs.close()
    try:
        for i in range(n):
            arr = qd.get(timeout=T)
            assert arr[0] == arr[-1] == i
            del arr
        inlet = qd._handle().consumer(qd)._inlets[0]
        assert mine.poll(T)
        return mine.recv(), inlet.statistics()
    finally:
        proc.join(T)
        if proc.is_alive():
            proc.kill()
            proc.join(T)


@needs_ring
def test_slots_come_back_through_the_ring(make: Any) -> None:
    produced, consumed = _run(make(), 600, 256 * KiB)
    assert produced["placed"] == 600 and produced["inline_fallbacks"] == 0, produced
    # Until the consumer's ring is named in a CREDIT, releases go as frames; then the ring.
    # (The producer counts before its close: the last frames' slots may still be out.)
    assert produced["ring_released"] >= 400, produced
    assert produced["ring_released"] + produced["released"] >= 500, produced
    assert consumed["ring_releases"] >= produced["ring_released"], consumed
    assert consumed["release_rings"] == 1


@needs_ring
def test_a_producer_waiting_for_room_finds_it_in_the_ring(make: Any) -> None:
    # A 1 MiB pool holds four 256 KiB payloads: the producer waits for releases again and
    # again, and they come through the ring (no RELEASE frame wakes it), never inline.
    produced, _ = _run(make(memory_pool_size=1, shm_wait=T), 300, 256 * KiB)
    assert produced["inline_fallbacks"] == 0 and produced["placed"] == 300, produced
    assert produced["ring_released"] > 0, produced


def test_without_rings_releases_go_as_frames(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring_mod, "SUPPORTED", False)  # the consumer (this process) makes none
    produced, consumed = _run(make(), 300, 256 * KiB)
    assert produced["ring_released"] == 0 and produced["released"] > 0, produced
    assert consumed["release_rings"] == 0 and consumed["release_frames"] > 0, consumed


# ------------------------------------------------------------- review regressions (bbR)


def test_releases_through_the_ring_let_the_pool_shrink_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # apply_releases trims an idle pool after a burst; take_ring must too, or a producer
    # whose consumer reads rings keeps every segment a burst made until it closes.
    monkeypatch.setattr(transfer, "_TRIM_EVERY", 0.0)
    sender = transfer.ShmSender(threshold=1, capacity=4 << 20, wait=0, segment_bytes=1 << 20)
    ring = ReleaseRing.create(capacity=16)
    try:
        sender.begin()
        for _ in range(6):  # 6 x 512 KiB: three segments of 1 MiB
            assert sender.encode_bytes(b"\0" * (512 * KiB)) is not None
        sender.commit(0, [])
        pool = sender.pool
        assert pool is not None and len(pool.statistics().segments) == 3
        sender.ring = ReleaseRing.open(ring.name)
        assert ring.put(sorted(sender._sent_at)) == 6
        assert sender.take_ring() == 6
        assert len(pool.statistics().segments) == 1
    finally:
        sender.close()
        ring.close()


def test_pids_beyond_pid_t_are_nobody() -> None:
    from sage_zmq.shm.sweep import owner_pid, pid_alive, sweep_orphans

    big = 2**31
    assert owner_pid(f"sagezmq-{big}-0-0") is None
    assert pid_alive(big) is False
    stray = os.path.join(SHM_DIR, f"sagezmq-{big}-0-0")  # anyone may create this name
    fd = os.open(stray, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        assert stray.rsplit("/", 1)[1] not in sweep_orphans()  # no OverflowError, not ours
    finally:
        os.unlink(stray)


def test_a_credit_pid_that_is_no_pid_is_dropped() -> None:
    from sage_zmq.queues._zmq import _pid_or_none

    assert _pid_or_none(1234) == 1234
    for bad in (0, -1, 2**31, 2**64 - 1, True, None, "12"):
        assert _pid_or_none(bad) is None


def test_a_reader_garbage_pid_does_not_crash_the_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transfer, "MAX_RINGS", 1)
    receiver, send, _ = _receiver()
    try:
        receiver._new_ring(b"a")
        reader = ReleaseRing.open(receiver.rings[b"a"].name)
        reader._words[2] = 2**31  # what a broken producer might write
        receiver._released(b"a", 1)
        receiver.flush(send, force=True)
        receiver._new_ring(b"b")  # prunes: no OverflowError from pid_alive
        assert set(receiver.rings) == {b"b"}
        reader.close()
    finally:
        receiver.close()


def test_open_refuses_a_ring_too_large() -> None:
    name = f"sagezmq-{os.getpid()}-abba-9"
    path = os.path.join(SHM_DIR, name)
    size = 1 << 50
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        header = np.array([ring_mod.MAGIC, size // 8 - HEADER_WORDS], np.uint64)
        os.pwrite(fd, header.tobytes(), 0)
        with pytest.raises(ShmError):
            ReleaseRing.open(name)
    finally:
        os.close(fd)
        os.unlink(path)


def test_entries_is_read_when_a_ring_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring_mod, "ENTRIES", 4)
    r = ReleaseRing.create()
    try:
        assert r.capacity == 4
    finally:
        r.close()


def test_a_release_of_a_slot_never_sent_is_ignored() -> None:
    # A consumer (or anything writing RELEASE frames or ring entries) cannot free a slot the
    # producer has not sent: a buffer still being filled must not be handed out again.
    sender = transfer.ShmSender(threshold=1, capacity=1 << 20, wait=0)
    try:
        lent = sender.alloc(256 * KiB)
        lent[:] = 7
        pool = sender.pool
        assert pool is not None
        (slot_id,) = pool.in_use()
        sender.apply_releases([slot_id, slot_id + 1000])
        assert pool.in_use() == [slot_id] and sender.released == 0
        assert int(lent[0]) == 7
    finally:
        sender.close()


@needs_ring
def test_a_ring_gone_before_the_producer_read_its_name_is_no_warning(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A consumer that closes right after a CREDIT (a normal end) has removed the ring it named:
    # nothing is wrong. A ring that is there and is not one is worth a warning.
    qd = make(shm_threshold=64 * KiB)
    link = qd._handle().producer(qd)._link
    name = f"sagezmq-{os.getpid()}-feed-8"
    with caplog.at_level(logging.DEBUG, logger="sage_zmq.queue"):
        link._adopt_ring(name)
        assert link.shm.ring is None
        assert [r.levelno for r in caplog.records if "release ring" in r.message] == [logging.DEBUG]
        caplog.clear()
        path = _plain_file(name, b"\0" * 8 * (HEADER_WORDS + 4))
        try:
            link._adopt_ring(None)
            link._adopt_ring(name)
        finally:
            os.unlink(path)
        assert link.shm.ring is None
        assert [r.levelno for r in caplog.records if "release ring" in r.message] == [
            logging.WARNING
        ]


def _run_with_rings_in_turn(conn: Connection, qd: QueueDescriptor) -> None:
    """Consumer: a session with a ring (21 payloads), then one without (rings off, 20)."""
    for _ in range(20):
        arr = qd.get(timeout=T)
        del arr
    conn.send("taken")
    conn.recv()  # the producer has read our ring's name
    # Releases before that went as frames; this one goes through the ring.
    arr = qd.get(timeout=T)
    del arr
    qd.close()
    ring_mod.SUPPORTED = False
    while not isinstance(qd.get(timeout=T), str):
        pass  # the greeting: this new session is connected
    conn.send("greeted")
    taken = 0
    while taken < 20:
        if not isinstance(qd.get(timeout=T), str):
            taken += 1
    conn.send("taken")
    conn.recv()
    qd.close()


@needs_ring
def test_a_producer_lets_go_of_the_ring_of_a_consumer_that_was_replaced(make: Any) -> None:
    # The second consumer session names no ring: the producer drains the first one's and
    # reads releases from frames again (a ring nobody writes to would stop it reading them).
    qd = make(shm_threshold=64 * KiB)
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_run_with_rings_in_turn, args=(theirs, qd), daemon=True)
    proc.start()
    theirs.close()
    producer = qd._handle().producer(qd)
    try:
        src = np.zeros(64 * KiB // 8)
        for _ in range(20):
            qd.put(src, timeout=T)
        assert mine.poll(T) and mine.recv() == "taken"
        _wait_until(lambda: (producer.poll_credit(), producer.shm.ring)[1] is not None)
        qd.put(src, timeout=T)
        producer.flush(timeout=T)
        mine.send("next")
        for _ in range(int(T / 0.25)):  # greet the next session until it answers
            qd.put("hello", timeout=T)
            if mine.poll(0.25):
                assert mine.recv() == "greeted"
                break
        for _ in range(20):
            qd.put(src, timeout=T)
        producer.flush(timeout=T)
        assert mine.poll(T) and mine.recv() == "taken"
        _wait_until(lambda: (producer.poll_credit(), producer.shm.ring)[1] is None)
        assert producer.shm.statistics()["ring_released"] > 0  # the first session's ring
        mine.send("done")
    finally:
        proc.join(T)
        if proc.is_alive():
            proc.kill()
            proc.join(T)
        with contextlib.suppress(DeliveryError):
            qd.close(timeout=1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(qd.endpoint)[len("ipc://") :])  # if the consumer was killed


def _wait_until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + T
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_ring_whose_reader_died_makes_room_for_another() -> None:
    ctx = mp.get_context("spawn")
    receiver, _, _ = _receiver()
    try:
        receiver._new_ring(b"a")
        name = receiver.rings[b"a"].name
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_attach_and_wait, args=(theirs, name), daemon=True)
        proc.start()
        theirs.close()
        assert mine.poll(T) and mine.recv() == "attached"
        proc.kill()
        proc.join(T)
        assert receiver.rings[b"a"].reader == proc.pid  # it never detached: it was killed
        transfer_max = transfer.MAX_RINGS
        transfer.MAX_RINGS = 1
        try:
            receiver._new_ring(b"b")  # the dead reader's ring gives way
        finally:
            transfer.MAX_RINGS = transfer_max
        assert set(receiver.rings) == {b"b"}
    finally:
        receiver.close()


def _attach_and_wait(conn: Connection, name: str) -> None:
    ring = ReleaseRing.open(name)
    ring.attach()
    conn.send("attached")
    conn.recv()  # SIGKILLed here
