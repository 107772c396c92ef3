"""Release rings (sage_zmq/shm/ring.py, PROTOCOL.md §6): the ring itself, the consumer's choice
between ring and RELEASE frames, and queues that hand slots back through one."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from sage_zmq import QueueDescriptor
from sage_zmq.errors import SecurityError
from sage_zmq.shm import ring as ring_mod
from sage_zmq.shm import transfer
from sage_zmq.shm.pool import ShmError
from sage_zmq.shm.ring import HEADER_WORDS, ReleaseRing
from sage_zmq.shm.sweep import SHM_DIR, list_segments
from sage_zmq.shm.transfer import ShmReceiver

T = 20.0
KiB = 1024

needs_ring = pytest.mark.skipif(not ring_mod.SUPPORTED, reason="release rings are x86-only")


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
    assert produced["ring_released"] == 0 and produced["released"] >= 250, produced
    assert consumed["release_rings"] == 0 and consumed["release_frames"] > 0, consumed
