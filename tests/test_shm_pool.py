"""Shared-memory pool, consumer segment cache and orphan sweeping."""

from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_zmq.errors import DecodeError, Full, QueueClosed
from sage_zmq.shm import (
    PayloadTooLarge,
    PoolClosed,
    SegmentCache,
    SharedMemoryPool,
    ShmError,
    SlotRef,
    SlotSizeError,
    list_segments,
    sweep_orphans,
    transfer,
)
from sage_zmq.shm.transfer import GROW_AFTER, ShmReceiver, ShmSender, pack_ref, unpack_ref

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 20.0


# -- fixtures / helpers ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def shm_clean() -> Iterator[None]:
    """Every test leaves /dev/shm as it found it (removing, then failing on, any leftovers)."""
    before = set(list_segments())
    yield
    gc.collect()
    leaked = sorted(set(list_segments()) - before)
    for name in leaked:
        os.unlink(f"/dev/shm/{name}")
    assert not leaked, f"test left shared-memory segments behind: {leaked}"


Starter = Callable[..., tuple[Any, Connection]]


@pytest.fixture
def spawn() -> Iterator[Starter]:
    """Start spawn-context children with a pipe; kill and join them all at teardown."""
    ctx = mp.get_context("spawn")
    procs: list[Any] = []

    def start(target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
        proc.start()
        theirs.close()
        procs.append(proc)
        return proc, mine

    yield start
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(TIMEOUT)


def recv(conn: Connection) -> Any:
    assert conn.poll(TIMEOUT), "child did not answer in time"
    return conn.recv()


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


# -- child process bodies (module level so spawn can import them) ----------------------------


def _consumer_child(conn: Connection) -> None:
    cache = SegmentCache()
    ref, dtype, shape = conn.recv()
    arr = cache.array(ref, dtype, shape, on_release=lambda sid: conn.send(("released", sid)))
    conn.send(("first", arr[:4].tolist(), bool(arr.flags.writeable)))
    conn.recv()  # the producer rewrote the slot
    conn.send(("second", arr[:4].tolist()))
    conn.recv()  # drop the view now
    del arr
    conn.recv()  # exit
    cache.close()


_KEEP: list[Any] = []


def _owner_child(conn: Connection, close: bool) -> None:
    pool = SharedMemoryPool(256 * KiB, segment_bytes=64 * KiB)
    _KEEP.append(pool)  # alive until interpreter exit, so only atexit can clean up
    pool.alloc(100 * KiB)  # forces a second segment
    conn.send(pool.statistics().segments)
    if close:
        return  # exit normally without close(): atexit must unlink
    conn.recv()  # wait here to be SIGKILLed


# -- allocation ------------------------------------------------------------------------------


def test_alloc_release_cycles_keep_slots_disjoint_and_return_all_space() -> None:
    rng = random.Random(7)
    with SharedMemoryPool(1 * MiB, segment_bytes=256 * KiB) as pool:
        live: dict[int, Any] = {}
        full = 0
        for _ in range(2000):
            if live and rng.random() < 0.45:
                sid = rng.choice(list(live))
                slot = live.pop(sid)
                assert bytes(slot.buffer[:1]) == bytes([sid % 251])  # nobody overwrote it
                assert pool.release(sid)
                continue
            try:
                slot = pool.alloc(rng.randint(1, 40 * KiB), timeout=0)
            except Full:
                full += 1
                assert pool.statistics().used > 512 * KiB  # only refused when really busy
                continue
            assert slot.offset % 64 == 0 and len(slot.buffer) == slot.nbytes
            slot.buffer[:1] = bytes([slot.id % 251])
            live[slot.id] = slot
            spans = sorted((s.segment, s.offset, s.offset + s.nbytes) for s in live.values())
            for (seg_a, _, end_a), (seg_b, start_b, _) in itertools.pairwise(spans):
                assert seg_a != seg_b or end_a <= start_b
        for sid in list(live):
            pool.release(sid)
        stats = pool.statistics()
        assert (stats.used, stats.slots_in_use) == (0, 0)
        assert stats.allocs == stats.releases > 500 and full > 0
        # everything coalesced back into one free run per segment
        sizes = {name: runs for name, runs in pool.free_runs().items()}
        assert all(len(runs) == 1 and runs[0][0] == 0 for runs in sizes.values())
        assert sum(runs[0][1] for runs in sizes.values()) == stats.reserved


def test_coalescing_merges_neighbours_on_both_sides() -> None:
    with SharedMemoryPool(64 * KiB, segment_bytes=64 * KiB) as pool:
        (name,) = pool.statistics().segments
        q = 16 * KiB
        a, b, c, d = (pool.alloc(q, timeout=0) for _ in range(4))
        assert [s.offset for s in (a, b, c, d)] == [0, q, 2 * q, 3 * q]
        with pytest.raises(Full):
            pool.alloc(1, timeout=0)
        pool.release(b.id)
        pool.release(c.id)  # merges with b's run
        assert pool.free_runs()[name] == [(q, 2 * q)]
        bc = pool.alloc(2 * q, timeout=0)
        assert bc.offset == q
        pool.release(a.id)
        pool.release(d.id)
        pool.release(bc.id)  # merges with a on the left and d on the right
        assert pool.free_runs()[name] == [(0, 4 * q)]
        whole = pool.alloc(4 * q, timeout=0)
        assert whole.offset == 0
        pool.release(whole.id)


def test_exhaustion_blocks_until_another_thread_releases() -> None:
    with SharedMemoryPool(64 * KiB, segment_bytes=64 * KiB) as pool:
        hog = pool.alloc(64 * KiB)

        def release_when_blocked() -> None:
            wait_until(lambda: pool.statistics().waits == 1, "alloc to block")
            pool.release(hog.id)

        helper = threading.Thread(target=release_when_blocked)
        helper.start()
        t0 = time.monotonic()
        try:
            slot = pool.alloc(8 * KiB, timeout=TIMEOUT)  # blocks here until the helper releases
        finally:
            helper.join(TIMEOUT)
        assert not helper.is_alive()
        assert time.monotonic() - t0 < TIMEOUT / 4  # woken by the release, not by the timeout
        assert slot.offset == 0 and pool.statistics().waits == 1
        pool.release(slot.id)


def test_full_timeout_raises_full_with_advice() -> None:
    with SharedMemoryPool(64 * KiB, segment_bytes=64 * KiB) as pool:
        hog = pool.alloc(60 * KiB)
        t0 = time.monotonic()
        with pytest.raises(Full, match="send the payload inline"):
            pool.alloc(8 * KiB, timeout=0.05)
        assert time.monotonic() - t0 >= 0.05
        with pytest.raises(Full):
            pool.alloc(8 * KiB, timeout=0)
        pool.alloc(4 * KiB, timeout=0)  # what still fits is not refused
        pool.release(hog.id)


def test_bad_sizes_are_refused_clearly() -> None:
    with SharedMemoryPool(64 * KiB) as pool:
        with pytest.raises(PayloadTooLarge, match="exceeds the shared-memory pool capacity"):
            pool.alloc(64 * KiB + 1)
        for bad in (0, -1, 1.5, True, "10"):
            with pytest.raises(SlotSizeError, match="nbytes must be a positive int"):
                pool.alloc(bad)  # type: ignore[arg-type]
    with pytest.raises(SlotSizeError, match="capacity_bytes"):
        SharedMemoryPool(0)
    with pytest.raises(ValueError, match="name_prefix"):
        SharedMemoryPool(64 * KiB, name_prefix="../evil-")


def test_double_or_unknown_release_is_reported_not_corrupting() -> None:
    with SharedMemoryPool(64 * KiB, segment_bytes=64 * KiB) as pool:
        a = pool.alloc(16 * KiB)
        assert pool.release(a.id)
        assert not pool.release(a.id)
        assert not pool.release(12345)
        assert pool.statistics().bad_releases == 2
        with pytest.raises(ValueError):  # the released slot's buffer is dead: no late writes
            a.buffer[0] = 1
        b, c = pool.alloc(16 * KiB), pool.alloc(16 * KiB)
        assert (b.offset, c.offset) == (0, 16 * KiB)  # free list intact after the bad releases
        assert not pool.release(a.id)
        assert pool.alloc(32 * KiB, timeout=0).offset == 32 * KiB
        assert pool.statistics().used == 64 * KiB


def test_grows_to_capacity_evicts_idle_segments_and_trims() -> None:
    removed: list[str] = []
    with SharedMemoryPool(
        256 * KiB, segment_bytes=64 * KiB, on_segment_removed=removed.append
    ) as pool:
        slots = [pool.alloc(64 * KiB, timeout=0) for _ in range(4)]
        assert len(pool.statistics().segments) == 4
        with pytest.raises(Full):
            pool.alloc(64, timeout=0)
        for s in slots:
            pool.release(s.id)
        big = pool.alloc(200 * KiB, timeout=0)  # needs idle segments dropped to make room
        stats = pool.statistics()
        assert stats.reserved <= stats.capacity and big.segment in stats.segments
        assert len(removed) >= 3 and not any(exists(n) for n in removed)
        pool.release(big.id)
        removed.clear()
        extra = pool.trim()
        assert extra == removed and len(pool.statistics().segments) == 1


def test_close_wakes_blocked_alloc_and_unlinks() -> None:
    pool = SharedMemoryPool(64 * KiB, segment_bytes=64 * KiB)
    names = pool.statistics().segments
    pool.alloc(64 * KiB)
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            pool.alloc(64, timeout=TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    wait_until(lambda: pool.statistics().waits == 1, "alloc to block")
    pool.close()
    t.join(TIMEOUT)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed)
    assert isinstance(errors[0], QueueClosed)
    assert not any(exists(n) for n in names)
    pool.close()  # idempotent


def test_concurrent_producers_never_share_bytes() -> None:
    with SharedMemoryPool(512 * KiB, segment_bytes=128 * KiB) as pool:
        bad: list[str] = []

        def producer(tag: int) -> None:
            rng = random.Random(tag)
            for _ in range(300):
                slot = pool.alloc(rng.randint(64, 32 * KiB), timeout=TIMEOUT)
                view = np.frombuffer(slot.buffer, np.uint8)
                view[:] = tag
                if not (view == tag).all():
                    bad.append(f"slot {slot.id} overwritten")
                del view
                pool.release(slot.id)

        threads = [threading.Thread(target=producer, args=(t,)) for t in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not bad and pool.statistics().allocs == 1200 and pool.statistics().used == 0


# -- security / lifetime of segments ---------------------------------------------------------


def test_segments_are_mode_0600_even_with_umask_0() -> None:
    old = os.umask(0)
    try:
        with SharedMemoryPool(128 * KiB, segment_bytes=64 * KiB) as pool:
            pool.alloc(100 * KiB)  # a segment made on demand too
            for name in pool.statistics().segments:
                st = os.stat(f"/dev/shm/{name}")
                assert st.st_mode & 0o777 == 0o600, oct(st.st_mode)
                assert st.st_uid == os.getuid()
                assert name.startswith(f"sagezmq-{os.getpid()}-")
    finally:
        os.umask(old)


def test_garbage_collected_pool_unlinks_its_segments() -> None:
    pool = SharedMemoryPool(64 * KiB)
    names = pool.statistics().segments
    assert all(exists(n) for n in names)
    del pool
    gc.collect()
    assert not any(exists(n) for n in names)


def test_normal_exit_without_close_unlinks(spawn: Starter) -> None:
    proc, conn = spawn(_owner_child, True)
    names = recv(conn)
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    assert len(names) == 2 and not any(exists(n) for n in names)


def test_sigkilled_owner_is_swept(spawn: Starter) -> None:
    proc, conn = spawn(_owner_child, False)
    names = recv(conn)
    assert all(exists(n) for n in names)
    proc.kill()
    proc.join(TIMEOUT)
    assert all(exists(n) for n in names)  # SIGKILL gives no chance to clean up
    with SharedMemoryPool(64 * KiB) as mine:
        live = mine.statistics().segments
        assert all(exists(n) for n in live)  # a live owner's segments are never swept
        # the new pool's creation already swept the orphans
        assert not any(exists(n) for n in names)
    # and sweep_orphans does it on its own: plant a segment of that (dead, reaped) pid
    fake = f"sagezmq-{proc.pid}-deadbeef-0"
    fd = os.open(f"/dev/shm/{fake}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    unrelated = f"sagezmq-notapid-{os.getpid()}"
    fd = os.open(f"/dev/shm/{unrelated}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        assert sweep_orphans() == [fake]
        assert exists(unrelated)
    finally:
        os.unlink(f"/dev/shm/{unrelated}")
    assert not [n for n in list_segments() if n.startswith(f"sagezmq-{proc.pid}-")]


# -- consumer views --------------------------------------------------------------------------


def test_zero_copy_numpy_view_across_processes(spawn: Starter) -> None:
    with SharedMemoryPool(1 * MiB) as pool:
        data = np.arange(1000, dtype=np.float64)
        slot = pool.alloc(data.nbytes)
        slot.write(data)
        proc, conn = spawn(_consumer_child)
        conn.send((list(slot.ref()), "<f8", [1000]))
        tag, first, writeable = recv(conn)
        assert (tag, first, writeable) == ("first", [0.0, 1.0, 2.0, 3.0], False)
        # Change the producer's bytes after the consumer mapped them: a copy would not see it.
        slot.array(np.float64, 1000)[:4] = [-1.0, -2.0, -3.0, -4.0]
        conn.send("look again")
        assert recv(conn) == ("second", [-1.0, -2.0, -3.0, -4.0])
        assert pool.statistics().slots_in_use == 1
        conn.send("drop it")
        assert recv(conn) == ("released", slot.id)
        assert pool.release(slot.id) and pool.statistics().used == 0
        conn.send("exit")
        proc.join(TIMEOUT)
        assert proc.exitcode == 0
        with pytest.raises(EOFError):  # no second release message before the child's exit
            conn.recv()


def test_release_fires_exactly_once_on_gc() -> None:
    with SharedMemoryPool(64 * KiB) as pool, SegmentCache() as cache:
        fired: list[int] = []
        slot = pool.alloc(800)
        slot.write(np.arange(100, dtype=np.int64))
        arr = cache.array(slot.ref(), np.int64, (10, 10), on_release=fired.append)
        part = arr[2:4, ::3]  # a derived view keeps the slot leased
        mv = arr.data
        del arr
        gc.collect()
        assert fired == [] and part[0, 1] == 23
        del part
        assert fired == []
        del mv
        assert fired == [slot.id]
        gc.collect()
        assert fired == [slot.id] and cache.live_views == 0

        fired.clear()
        view = cache.view(slot.ref(), fired.append)  # the slot can be viewed again once released
        tail = view[8:16]
        del view
        assert fired == [] and bytes(tail) == (1).to_bytes(8, "little")
        tail.release()
        assert fired == [slot.id]


def test_explicit_release_fires_once() -> None:
    with SharedMemoryPool(64 * KiB) as pool, SegmentCache() as cache:
        fired: list[int] = []
        a, b = pool.alloc(64), pool.alloc(64)
        arr = cache.array(a.ref(), np.uint8, 64, on_release=fired.append)
        assert cache.release(arr[10:]) is True  # any derived view finds its lease
        assert cache.release(arr) is False
        del arr
        gc.collect()
        assert fired == [a.id]
        mv = cache.view(b.ref(), fired.append)
        assert cache.release(b.ref()) is True
        assert cache.release(b.ref()) is False
        del mv
        assert fired == [a.id, b.id]
        with pytest.raises(ValueError, match="returned by this SegmentCache"):
            cache.release(np.zeros(3))


def test_live_view_prevents_reuse_of_its_slot() -> None:
    with SharedMemoryPool(64 * KiB, segment_bytes=64 * KiB) as pool, SegmentCache() as cache:
        slot = pool.alloc(64 * KiB)
        ref = slot.ref()
        view = cache.view(ref, pool.release)
        with pytest.raises(Full):
            pool.alloc(64 * KiB, timeout=0.02)
        del view  # last reference: on_release -> pool.release
        again = pool.alloc(64 * KiB, timeout=0)
        assert (again.segment, again.offset) == (ref.segment, ref.offset)
        pool.release(again.id)


def test_forget_defers_unmap_while_views_exist() -> None:
    def mapped(name: str) -> int:
        with open("/proc/self/maps") as f:
            return sum(name in line for line in f)

    cache = SegmentCache()
    pool = SharedMemoryPool(64 * KiB, prefault=False)
    slot = pool.alloc(4 * KiB)
    slot.write(b"hello")
    name = slot.segment
    view = cache.view(slot.ref(), lambda sid: None)
    pool.close()  # the owner unlinks; the consumer's mapping stays valid
    cache.forget(name)
    assert cache.mapped == () and mapped(name)
    assert bytes(view[:5]) == b"hello"
    del view
    gc.collect()
    assert not mapped(name)
    # forgetting a segment with no views unmaps at once
    with SharedMemoryPool(64 * KiB) as pool2:
        s2 = pool2.alloc(64)
        assert cache.copy_out(s2.ref()) == bytes(64)
        assert mapped(s2.segment) == 2  # the pool's mapping and the cache's
        cache.forget(s2.segment)
        assert mapped(s2.segment) == 1


def test_copy_out_copies_and_releases() -> None:
    with SharedMemoryPool(64 * KiB) as pool, SegmentCache() as cache:
        released: list[int] = []
        slot = pool.alloc(80)
        slot.write(np.arange(10, dtype=np.int64))
        out = cache.copy_out(slot.ref(), dtype="<i8", shape=(2, 5), on_release=released.append)
        assert isinstance(out, np.ndarray) and out.base is None and out[1, 4] == 9
        raw = cache.copy_out(slot.ref())
        assert isinstance(raw, bytes) and raw[8] == 1
        slot.array(np.int64, 10)[:] = 0
        assert out[1, 4] == 9 and raw[8] == 1  # really copies
        assert released == [slot.id]


def test_bad_refs_are_decode_errors() -> None:
    with SharedMemoryPool(64 * KiB) as pool, SegmentCache() as cache:
        slot = pool.alloc(64)
        seg, off, _n, sid = slot.ref()
        never = lambda sid: pytest.fail("on_release for a view never made")  # noqa: E731
        for bad in (
            ["../../etc/passwd", 0, 64, 1],
            [".hidden", 0, 64, 1],
            [seg, -1, 64, sid],
            [seg, off, 0, sid],
            [seg, off, True, sid],
            [seg, off, 64],
            "sagezmq-1-a-0",
        ):
            with pytest.raises(DecodeError):
                cache.view(bad, never)
        with pytest.raises(DecodeError, match="past the end"):
            cache.view([seg, 64 * KiB - 64, 128, sid], never)
        with pytest.raises(DecodeError, match="needs 72 bytes"):
            cache.array(slot.ref(), np.float64, 9, on_release=never)
        with pytest.raises(DecodeError, match="needs"):
            cache.array(slot.ref(), np.uint8, (2, 2), strides=(64, 1), on_release=never)
        with pytest.raises(DecodeError, match="Python objects"):
            cache.array(slot.ref(), object, 8, on_release=never)
        with pytest.raises(ShmError, match="is gone"):
            cache.view(SlotRef("sagezmq-1-00-0", 0, 64, 1), never)
        ok = cache.array(slot.ref(), np.uint8, (4, 4), strides=(16, 2), on_release=lambda s: None)
        assert ok.shape == (4, 4)
        with pytest.raises(DecodeError, match="already viewed"):
            cache.view(slot.ref(), never)
        del ok


_name = st.sampled_from(["sagezmq-1-ab-0", "ok_name.1", "../x", ".h", "", b"sagezmq-1-ab-0", 3])
_number = st.sampled_from([0, 1, -1, 64, 2**64, True, False, 1.0, None, "1"])


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.tuples(_name, _number, _number, _number).map(list),
        st.lists(st.one_of(_name, _number), max_size=5),
        st.one_of(_name, _number),
    )
)
def test_fast_ref_parse_accepts_exactly_what_the_field_checks_accept(obj: Any) -> None:
    # parse() takes a shortcut for the lists msgpack makes; it must agree with the checks
    # that name the wrong field, on every input.
    try:
        expected: SlotRef | None = SlotRef._parse_checked(obj)
    except DecodeError:
        expected = None
    if expected is None:
        with pytest.raises(DecodeError):
            SlotRef.parse(obj)
    else:
        assert SlotRef.parse(obj) == expected


def test_unpack_ref_checks_every_body_and_remembers_only_good_dtypes() -> None:
    ref = SlotRef("sagezmq-1-ab-0", 64, 48, 7)
    for _ in range(2):  # the second time through the dtype cache
        got, dt, shape = unpack_ref(pack_ref(ref, np.dtype("<f8"), (2, 3)).data)
        assert (got, dt, shape) == (ref, np.dtype("<f8"), (2, 3))
        with pytest.raises(DecodeError, match="Python objects"):
            unpack_ref(pack_ref(ref, np.dtype("O"), (6,)).data)
        with pytest.raises(DecodeError, match="needs 40"):
            unpack_ref(pack_ref(ref, np.dtype("<f8"), (5,)).data)
        with pytest.raises(DecodeError, match="non-negative"):
            unpack_ref(msgpack.packb(["sagezmq-1-ab-0", 64, 48, 7, "<f8", [True, 6]]))
        with pytest.raises(DecodeError, match="invalid segment"):
            unpack_ref(msgpack.packb(["../etc", 64, 48, 7, "<f8", [6]]))


def test_pack_ref_with_a_reused_packer_packs_the_same_ext() -> None:
    ref = SlotRef("sagezmq-1-ab-0", 64, 48, 7)
    want = msgpack.ExtType(4, msgpack.packb(["sagezmq-1-ab-0", 64, 48, 7, "<f8", [2, 3]]))
    packer = msgpack.Packer(use_bin_type=True)
    for packb in (None, packer.pack, packer.pack):
        ext = pack_ref(ref, np.dtype("<f8"), (np.int64(2), 3), packb)
        assert type(ext) is msgpack.ExtType and ext == want and hash(ext) == hash(want)
        assert msgpack.packb(ext) == msgpack.packb(want)
    raw = pack_ref(ref, None, None, packer.pack)
    assert raw == msgpack.ExtType(4, msgpack.packb(["sagezmq-1-ab-0", 64, 48, 7, None, None]))


def test_pool_slots_are_built_as_the_dataclass_builds_them() -> None:
    # SharedMemoryPool.alloc sets a Slot's fields without its __init__ (half the time).
    import dataclasses

    from sage_zmq.shm.pool import Slot

    with SharedMemoryPool(64 * KiB) as pool:
        slot = pool.alloc(100)
        values = {f.name: getattr(slot, f.name) for f in dataclasses.fields(Slot)}
        assert type(slot) is Slot and repr(slot) == repr(Slot(**values))
        assert values["nbytes"] == 100 and values["buffer"].nbytes == 100
        with pytest.raises(dataclasses.FrozenInstanceError):
            slot.id = 99  # type: ignore[misc]
        pool.release(slot.id)


def test_exact_array_is_a_read_only_zero_copy_view_that_releases_once() -> None:
    with SharedMemoryPool(64 * KiB) as pool, SegmentCache() as cache, SegmentCache() as other:
        fired: list[int] = []
        slot = pool.alloc(6 * 8)
        slot.write(np.arange(6, dtype="<f8"))
        arr = cache.exact_array(slot.ref(), np.dtype("<f8"), (2, 3), fired.append)
        assert arr.tolist() == [[0, 1, 2], [3, 4, 5]] and not arr.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            arr[0, 0] = 9
        slot.write(np.full(6, 7.0))
        assert arr[1, 2] == 7.0  # a view of the slot, not a copy
        with pytest.raises(ValueError, match="returned by this SegmentCache"):
            other.release(arr)
        scalar = cache.exact_array(pool.alloc(8).ref(), np.dtype("<i8"), (), fired.append)
        assert scalar.shape == ()
        assert cache.release(arr[1]) is True and cache.release(arr) is False
        del arr, scalar
        gc.collect()
        assert sorted(fired) == [slot.id, slot.id + 1] and cache.live_views == 0
        # A view whose last reference dies in a garbage cycle still gives its slot back.
        third = pool.alloc(8)
        cycle: dict[str, Any] = {
            "view": cache.exact_array(third.ref(), np.dtype("u1"), (8,), fired.append)
        }
        cycle["self"] = cycle
        del cycle
        gc.collect()
        assert fired[-1] == third.id and cache.live_views == 0


def test_a_full_pool_takes_releases_that_come_soon_over_a_new_segment() -> None:
    # A new segment stalls the producer while it is pre-faulted (tens of ms for 64 MiB) and
    # spreads copies over colder memory: a consumer a moment behind gets GROW_AFTER to release.
    sender = ShmSender(threshold=1, capacity=4 * MiB, wait=1.0, segment_bytes=MiB)
    try:
        held = [sender._slot(256 * KiB) for _ in range(4)]  # the first segment, full
        assert all(held) and sender.pool is not None
        sender._sent_at.update((slot.id, 0) for slot in held)  # type: ignore[union-attr]
        looks: list[float] = []

        def consumer_a_moment_behind(timeout: float) -> None:
            looks.append(timeout)
            if len(looks) == 2:
                sender.apply_releases([held.pop().id])  # type: ignore[union-attr]

        sender.poll_releases = consumer_a_moment_behind
        assert sender._slot(256 * KiB) is not None
        assert len(sender.pool.statistics().segments) == 1 and len(looks) == 2

        sender.poll_releases = lambda timeout: None  # nothing comes back: grow, after the grace
        t0 = time.monotonic()
        assert sender._slot(256 * KiB) is not None
        assert time.monotonic() - t0 >= GROW_AFTER
        assert len(sender.pool.statistics().segments) == 2

        # A caller that will not wait (timeout 0) gets a new segment without waiting.
        for _ in range(3):
            sender._slot(256 * KiB)  # fill the second segment
        looks.clear()
        sender.poll_releases = looks.append
        assert sender._slot(256 * KiB, wait=0) is not None
        assert looks == [0.0] and len(sender.pool.statistics().segments) == 3
    finally:
        sender.close()


def test_a_pool_one_payload_fills_grows_at_once_so_the_producer_need_not_take_turns() -> None:
    # Waiting for the one slot in use would have the producer wait for the consumer on every
    # payload (64 MiB arrays: up to a ring look, ~1 ms, each time); with a second segment it
    # fills the next payload while the consumer still reads the last.
    sender = ShmSender(threshold=1, capacity=4 * MiB, wait=1.0, segment_bytes=MiB)
    try:
        first = sender._slot(MiB)  # the first segment, full with one payload
        assert first is not None and sender.pool is not None
        sender._sent_at[first.id] = 0
        looks: list[float] = []
        sender.poll_releases = looks.append
        t0 = time.monotonic()
        second = sender._slot(MiB)
        assert second is not None and time.monotonic() - t0 < GROW_AFTER
        assert looks == [] and len(sender.pool.statistics().segments) == 2
        # Two in turn is enough: with both in use, releases that come soon win again.
        sender._sent_at[second.id] = 0

        def consumer_a_moment_behind(timeout: float) -> None:
            looks.append(timeout)
            sender.apply_releases([first.id])

        sender.poll_releases = consumer_a_moment_behind
        assert sender._slot(MiB) is not None
        assert len(looks) == 1 and len(sender.pool.statistics().segments) == 2
    finally:
        sender.close()


def test_a_pool_in_use_drops_segments_idle_for_a_whole_interval() -> None:
    # After a burst of large payloads, smaller ones keep the pool in use: the segments the
    # burst made must not stay reserved for as long as the stream goes on.
    sender = ShmSender(threshold=1, capacity=4 * MiB, wait=0.0, segment_bytes=MiB)
    try:
        slots = [sender._slot(MiB) for _ in range(3)]  # three segments, a payload in each
        pool = sender.pool
        assert all(slots) and pool is not None and len(pool.statistics().segments) == 3
        sender._sent_at.update((slot.id, 0) for slot in slots)  # type: ignore[union-attr]
        first, second, third = pool.statistics().segments

        def release(slot: Any) -> tuple[str, ...]:
            sender._last_trim = -float("inf")  # the periodic look is due
            sender.apply_releases([slot.id])
            return pool.statistics().segments

        assert release(slots[2]) == (first, second, third)  # idle for a moment only: kept
        pool._segments[2].idle_since -= transfer._TRIM_EVERY  # as if idle for an interval
        assert release(slots[1]) == (first, second)  # the one idle just now stays
        assert release(slots[0]) == (first,)  # the pool is idle: the burst is over
    finally:
        sender.close()


def test_a_consumer_unmaps_segments_their_producer_removed_though_no_new_one_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Until every mapping of a removed segment is gone its memory stays taken; the consumer
    # used to look only when it mapped a new segment, which a pool that shrinks never makes.
    def mapped(name: str) -> bool:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f)

    monkeypatch.setattr(transfer, "GONE_LOOK_EVERY", 0.0)
    receiver = ShmReceiver(codec=None)
    try:
        with SharedMemoryPool(2 * MiB, segment_bytes=MiB, prefault=False) as pool:
            kept, trimmed = pool.alloc(MiB), pool.alloc(MiB)  # a segment each
            for slot in (kept, trimmed):
                del_now = receiver.cache.view(slot.ref(), lambda slot_id: None)
                del del_now
            gc.collect()
            assert set(receiver.cache.mapped) == {kept.segment, trimmed.segment}
            pool.release(trimmed.id)
            assert pool.trim() == [trimmed.segment]
            assert mapped(trimmed.segment)  # unlinked, and still taking its memory here
            receiver.look_for_gone()
            assert receiver.cache.mapped == (kept.segment,) and not mapped(trimmed.segment)
            pool.release(kept.id)
    finally:
        receiver.close()


def test_a_pool_that_cannot_grow_sends_inline_and_waits_before_trying_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # /dev/shm full after the first segment (a container's 64 MiB): the payload goes inline
    # with a warning, as with a full pool, instead of put failing with ShmError.
    from sage_zmq.shm.pool import SharedMemoryPool, ShmError

    sender = ShmSender(threshold=1, capacity=4 * MiB, wait=0.0, segment_bytes=MiB)
    try:
        held = [sender._slot(256 * KiB) for _ in range(4)]  # the first segment, full
        assert all(held) and sender.pool is not None
        sender._sent_at.update((slot.id, 0) for slot in held)  # type: ignore[union-attr]
        tries: list[int] = []

        def no_space(self: SharedMemoryPool, size: int) -> Any:
            tries.append(size)
            raise ShmError("cannot allocate: [Errno 28] No space left on device")

        monkeypatch.setattr(SharedMemoryPool, "_add_segment", no_space)
        with caplog.at_level("WARNING", logger="sage_zmq.shm"):
            assert sender._slot(256 * KiB) is None
            assert sender._slot(256 * KiB) is None  # no second try at once
        assert len(tries) == 1 and sender.inline_fallbacks == 2
        assert any("could not grow" in r.getMessage() for r in caplog.records)
    finally:
        sender.close()


# -- bandwidth (informational) ---------------------------------------------------------------


def test_bandwidth_report(capsys: pytest.CaptureFixture[str]) -> None:
    n = 64 * MiB
    src = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = 1

    def best(fn: Callable[[], Any], reps: int = 3) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return n / min(times) / 1e9

    memcpy = best(lambda: np.copyto(dst, src))
    with SharedMemoryPool(n, segment_bytes=n) as pool:
        slot = pool.alloc(n)
        into_slot = best(lambda: slot.write(src))
        pool.release(slot.id)
    with SharedMemoryPool(n, segment_bytes=n, prefault=False) as cold:
        slot = cold.alloc(n)
        first_touch = best(lambda: slot.write(src), reps=1)
        cold.release(slot.id)
    with capsys.disabled():
        print(
            f"\n[shm bandwidth, 64 MiB] numpy memcpy {memcpy:.1f} GB/s | "
            f"into prefaulted slot {into_slot:.1f} GB/s | "
            f"into unprefaulted slot (first touch) {first_touch:.1f} GB/s"
        )
    assert memcpy > 0 and into_slot > 0
