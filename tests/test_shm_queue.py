"""``shm`` queues: large payloads through shared memory, zero-copy views, releases, lifetime."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from operator import length_hint
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_zmq import QueueDescriptor
from sage_zmq.errors import DeliveryError, DescriptorError, Empty, EncodeError
from sage_zmq.packet import Packet
from sage_zmq.queues import _producer
from sage_zmq.queues.shm import SHM_FLUSH_BYTES, ShmQueueType, _has_nested_bytes
from sage_zmq.shm import is_shared, list_segments, release, transfer
from sage_zmq.wire.codec import Codec, Lz4Policy, compression_mode
from sage_zmq.wire.frame import FLAG_LZ4

KiB = 1024
MiB = 1024 * KiB
T = 20.0  # bound on every blocking call


@pytest.fixture
def make(queues: Callable[..., QueueDescriptor]) -> Callable[..., QueueDescriptor]:
    return lambda **meta: queues(None, "shm", {"maxsize": 100, **meta})


def producer_of(qd: QueueDescriptor) -> Any:
    return qd._handle().producer(qd)


def sender_stats(qd: QueueDescriptor) -> dict[str, Any]:
    stats: dict[str, Any] = producer_of(qd).shm.statistics()
    return stats


def ours(pid: int) -> list[str]:
    return [n for n in list_segments() if n.startswith(f"sagezmq-{pid}-")]


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + T
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def pump(qd: QueueDescriptor) -> None:
    """Let the consumer send queued releases and the producer read them."""
    with contextlib.suppress(Empty):
        qd.get(timeout=0.001)  # the consumer's read path sends RELEASE frames
    producer_of(qd).full()  # the producer's poll path frees released slots


def arrays() -> list[np.ndarray]:
    structured = np.zeros(1000, dtype=[("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")])
    structured["a"] = np.arange(1000)
    structured["c"] = b"xyz"
    return [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.arange(1000, dtype=np.int32),
        np.array([1, 2, 255], dtype=np.uint8),
        np.array([True, False, True]),
        np.array([1 + 2j, -3j], dtype=np.complex128),
        np.array([1.5, np.nan, -np.inf], dtype=np.float16),
        np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian survives
        np.array(3.25),  # 0-d
        np.array(7, dtype=np.int8),  # 0-d, one byte
        np.arange(60, dtype=np.int64).reshape(3, 4, 5)[:, ::2, 1:],  # non-contiguous
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.arange(100, dtype=np.uint16)[::-3],  # negative strides
        structured,
        np.zeros((), dtype="V100"),  # 0-d void
        np.datetime64("2024-01-01") + np.arange(5),
        np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1),
    ]


# ------------------------------------------------------------------------ round trips


def test_arrays_of_every_dtype_and_shape_arrive_zero_copy(make: Any) -> None:
    qd = make(shm_threshold=1)  # every non-empty array goes through the pool
    sent = arrays()
    for a in sent:
        qd.put(a, timeout=T)
    qd.put(np.zeros((0, 3), np.float32), timeout=T)  # nothing to share: inline
    for a in sent:
        got = qd.get(timeout=T)
        assert isinstance(got, np.ndarray) and is_shared(got), a.dtype
        assert got.dtype == a.dtype and got.shape == a.shape, (got.dtype, got.shape)
        assert got.flags.c_contiguous and not got.flags.writeable
        equal_nan = a.dtype.kind in "fc"
        assert np.array_equal(got, a, equal_nan=equal_nan), a
    empty = qd.get(timeout=T)
    assert empty.shape == (0, 3) and not is_shared(empty)
    assert sender_stats(qd)["placed"] == len(sent)


def test_bytes_like_records_and_payloads_go_through_the_pool(make: Any) -> None:
    qd = make(shm_threshold=64 * KiB)
    blob = os.urandom(200 * KiB)
    records: list[Any] = [
        blob,
        bytearray(blob),
        memoryview(blob),
        memoryview(np.arange(40_000, dtype=np.float64)),  # typed memoryview: its bytes
        Packet(blob, partition_key="k"),
        {"nested": [1, {"deeper": blob}]},  # found by the scan of a large frame
        b"small",  # below the threshold: inline, stays bytes
    ]
    for r in records:
        qd.put(r, timeout=T)
    got = [qd.get(timeout=T) for _ in records]
    for g in got[:3]:
        assert isinstance(g, memoryview) and is_shared(g) and g.readonly and g == blob
    assert bytes(got[3]) == np.arange(40_000, dtype=np.float64).tobytes()
    assert isinstance(got[4], Packet) and got[4].payload == blob and is_shared(got[4].payload)
    assert got[4].partition_key == "k"
    deep = got[5]["nested"][1]["deeper"]
    assert is_shared(deep) and deep == blob
    assert got[6] == b"small" and type(got[6]) is bytes
    assert sender_stats(qd)["placed"] == 6
    assert isinstance(records[5]["nested"][1]["deeper"], bytes)  # the caller's record untouched


@pytest.fixture
def always_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    # "Busy" means the caller came back within BUSY_GAP (20 us) of the last flush; a loaded
    # test machine cannot promise that, so these tests widen it to see the batching itself.
    monkeypatch.setattr(_producer, "BUSY_GAP", 5.0)


@pytest.mark.usefixtures("always_busy")
def test_busy_large_puts_share_frames_yet_each_put_is_a_snapshot(make: Any) -> None:
    # Puts of large arrays back to back batch several pool references per frame; the copy
    # into the pool still happens inside put, so reusing the array right after is safe.
    qd = make(maxsize=64, shm_threshold=64 * KiB)
    arr = np.zeros(256 * KiB // 8)
    n = 40
    for i in range(n):
        arr[:] = i
        qd.put(arr, timeout=T)
    got = [float(qd.get(timeout=T)[-1]) for _ in range(n)]
    assert got == [float(i) for i in range(n)]
    stats = producer_of(qd).statistics()
    assert stats.sent == n and stats.batches_sent < n, stats
    assert sender_stats(qd)["placed"] == n


@pytest.mark.usefixtures("always_busy")
def test_busy_puts_into_a_full_pool_are_still_snapshots_counted_once(make: Any) -> None:
    # The pool is full (views held), so batched large payloads go inline: copied inside put
    # all the same, and each counted once (not again when its batch leaves).
    qd = make(maxsize=64, memory_pool_size=4, shm_wait=0.05, shm_threshold=64 * KiB)
    held = []
    for i in range(4):  # 4 x 1 MiB fill the 4 MiB pool (frames of 1 MiB: 256 KiB share them)
        qd.put(np.full(128 * KiB, i, np.float64), timeout=T)
        held.append(qd.get(timeout=T))
    arr = np.zeros(32 * KiB)
    buf = bytearray(256 * KiB)
    for i in range(6):
        arr[:] = 10 + i
        buf[:] = bytes([i]) * len(buf)
        qd.put(arr, timeout=T)
        qd.put(buf, timeout=T)
        qd.put(Packet(buf), timeout=T)
        qd.put(Packet(arr), timeout=T)
    arr[:] = -1  # too late to matter: every put above took its copy
    buf[:] = b"\xff" * len(buf)
    got = [qd.get(timeout=T) for _ in range(24)]
    for i in range(6):
        a, b, p, q = got[4 * i : 4 * i + 4]
        assert float(a[0]) == float(a[-1]) == 10.0 + i and not is_shared(a)
        assert type(b) is bytes and b == bytes([i]) * len(buf)
        assert p.payload == bytes([i]) * len(buf)
        assert float(q.payload[0]) == float(q.payload[-1]) == 10.0 + i
    assert sender_stats(qd)["inline_fallbacks"] == 24
    assert producer_of(qd).statistics().batches_sent < 4 + 24
    del held


def test_zero_copy_off_gives_private_copies_and_frees_at_once(make: Any) -> None:
    qd = make(shm_threshold=1024, zero_copy=False)
    a = np.arange(10_000, dtype=np.float64).reshape(100, 100)[:, ::2]
    qd.put(a, timeout=T)
    qd.put(b"z" * 5000, timeout=T)
    got = qd.get(timeout=T)
    raw = qd.get(timeout=T)
    assert isinstance(got, np.ndarray) and not is_shared(got) and np.array_equal(got, a)
    assert type(raw) is bytes and raw == b"z" * 5000
    pool = producer_of(qd).shm.pool
    wait_until(lambda: (pump(qd), pool.slots_in_use)[1] == 0, "copies to release their slots")
    assert sender_stats(qd)["placed"] == 2


def test_one_gigabyte_array(make: Any) -> None:
    n = 10**9
    qd = make()
    src = np.empty(n, np.uint8)
    src[:] = 7
    src[::4096] = np.arange(len(src[::4096])) % 251
    t0 = time.monotonic()
    qd.put(src, timeout=60)
    got = qd.get(timeout=60)
    elapsed = time.monotonic() - t0
    assert is_shared(got) and got.shape == (n,)
    assert np.array_equal(got[::4096], src[::4096]) and got[-1] == 7 and got[1] == 7
    stats = sender_stats(qd)
    assert stats["placed_bytes"] == n and stats["inline_fallbacks"] == 0
    del got, src
    assert elapsed < 30, f"a 1 GB payload took {elapsed:.1f} s"


# ------------------------------------------------------------------------ release & reuse


def test_views_kept_alive_are_never_overwritten_and_a_full_pool_goes_inline(make: Any) -> None:
    qd = make(memory_pool_size=1, shm_wait=0.2, shm_threshold=64 * KiB)  # 1 MiB pool
    held = []
    for i in range(4):  # fills the pool exactly: 4 x 256 KiB
        qd.put(np.full(32 * KiB, i, np.float64), timeout=T)
        held.append(qd.get(timeout=T))
    assert producer_of(qd).shm.pool.statistics().used == 1 * MiB
    t0 = time.monotonic()
    for i in range(4, 8):  # no room: waits shm_wait once, then inline without waiting again
        qd.put(np.full(32 * KiB, i, np.float64), timeout=T)
    late = [qd.get(timeout=T) for _ in range(4)]
    assert time.monotonic() - t0 < 5.0
    stats = sender_stats(qd)
    assert stats["inline_fallbacks"] == 4 and stats["waits"] >= 1
    assert [float(a[0]) for a in late] == [4.0, 5.0, 6.0, 7.0]
    assert not any(is_shared(a) for a in late)
    for i, view in enumerate(held):  # the held slots were never handed out again
        assert (view == float(i)).all()
    del held, view, late
    gc.collect()
    # Released views make room again: the next payloads use the pool.
    pump(qd)
    for i in range(8, 12):
        qd.put(np.full(32 * KiB, i, np.float64), timeout=T)
        got = qd.get(timeout=T)
        assert is_shared(got) and got[0] == i
        del got
    assert sender_stats(qd)["inline_fallbacks"] == 4


def test_full_pool_waits_for_a_release(make: Any) -> None:
    qd = make(memory_pool_size=1, shm_wait=T, shm_threshold=64 * KiB)
    held = []
    for i in range(2):
        qd.put(np.full(64 * KiB, i, np.float64), timeout=T)  # 512 KiB each: pool full
        held.append(qd.get(timeout=T))
    errors: list[BaseException] = []

    def put_third() -> None:
        try:
            qd.put(np.full(64 * KiB, 2.0), timeout=T)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=put_third)
    thread.start()
    try:
        wait_until(lambda: sender_stats(qd)["waits"] == 1, "the producer to wait for room")
        del held[0]  # the consumer's background tick sends the RELEASE
        third = qd.get(timeout=T)
    finally:
        thread.join(T)
    assert not errors and not thread.is_alive()
    assert is_shared(third) and third[0] == 2.0 and (held[0] == 1.0).all()
    assert sender_stats(qd)["inline_fallbacks"] == 0


def test_a_view_dropped_while_the_consumer_waits_in_get_goes_back_promptly(make: Any) -> None:
    # A worker thread drops a view while the reading thread is blocked in get(): its RELEASE
    # must not wait for that get to return (it waited up to 0.5 s), or a producer short of
    # room sends inline after shm_wait although the room was free.
    qd = make(memory_pool_size=1, shm_wait=0.3, shm_threshold=64 * KiB)
    held = []
    for i in range(2):
        qd.put(np.full(64 * KiB, i, np.float64), timeout=T)  # 512 KiB each: pool full
        held.append(qd.get(timeout=T))
    consumer = qd._handle().consumer(qd)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(qd.get(timeout=T)))
    reader.start()
    try:
        wait_until(lambda: consumer._waiting, "the reader to wait in get()")
        # Not a synchronisation: had the reader not yet entered its blocking read, it would
        # find the release queued and send it, and the test would pass without checking.
        time.sleep(0.05)
        del held[0]  # the slot is free from now on
        gc.collect()
        qd.put(np.full(64 * KiB, 2.0), timeout=T)
    finally:
        reader.join(T)
    assert not reader.is_alive() and len(got) == 1
    assert is_shared(got[0]) and got[0][0] == 2.0
    assert sender_stats(qd)["inline_fallbacks"] == 0


def test_each_record_of_a_batch_lets_go_of_its_slot_when_the_application_drops_it(
    make: Any,
) -> None:
    # The consumer reads a batch through an iterator; over a list, that kept every view of
    # the batch, so every slot, until the application took the batch's last record.
    qd = make(shm_threshold=64 * KiB)
    for i in range(8):
        qd.put(np.full(64 * KiB // 8, float(i)), timeout=T)
    producer_of(qd).flush(timeout=T)
    receiver = qd._handle().consumer(qd)._inlets[0].shm
    waiting_in_batch = []
    for i in range(8):
        got = qd.get(timeout=T)
        assert got[0] == float(i)
        del got
        consumer = qd._handle().consumer(qd)
        left = length_hint(consumer._current)
        waiting_in_batch.append(left)
        assert receiver.cache.live_views == left + consumer._queued, i
    assert max(waiting_in_batch) > 0  # some batch held more than one record


def test_explicit_release_frees_the_slot_while_the_object_lives(make: Any) -> None:
    qd = make(shm_threshold=1024)
    qd.put(np.arange(1000.0), timeout=T)
    view = qd.get(timeout=T)
    part = view[10:20]
    pool = producer_of(qd).shm.pool
    assert pool.slots_in_use == 1
    assert release(part) is True  # any derived view releases its slot
    assert release(view) is False  # once only
    wait_until(lambda: (pump(qd), pool.slots_in_use)[1] == 0, "the slot to come back")
    with pytest.raises(ValueError, match="not backed by a shared-memory slot"):
        release(np.arange(3))


def test_large_payloads_cycle_through_a_few_slots(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Releases of large payloads go back by bytes (RELEASE_BYTES), not only by count, and the
    # producer reads them as often: the pool reuses a few MiB that stay in the cache instead
    # of cycling through its whole segment. The delay rule is switched off: bytes alone do it.
    monkeypatch.setattr(transfer, "RELEASE_DELAY", 60.0)
    qd = make(maxsize=1000, shm_threshold=64 * KiB)
    payload = np.ones(MiB // 8)
    pool_peak = 0
    for _ in range(64):
        qd.put(payload, timeout=T)
        qd.get(timeout=T)  # dropped at once: its release is queued
        pool_peak = max(pool_peak, producer_of(qd).shm.pool.slots_in_use)
    # RELEASE_BYTES (4 MiB) held by the consumer until it sends them, as many placed since
    # the producer last read, and the one being placed. It was 64: every slot of the segment.
    per_release = transfer.RELEASE_BYTES // MiB
    assert per_release == 4
    assert pool_peak <= 2 * per_release + 1, pool_peak


# ------------------------------------------------------------------------ producer buffers


def test_alloc_fills_in_place_and_puts_without_a_copy(make: Any) -> None:
    qd = make(shm_threshold=64 * KiB)
    producer = producer_of(qd)
    buf = producer.alloc((256, 256), np.float32)
    assert buf.flags.writeable and buf.shape == (256, 256) and buf.dtype == np.float32
    buf[:] = np.arange(256, dtype=np.float32)
    qd.put(buf, timeout=T)
    got = qd.get(timeout=T)
    assert is_shared(got) and np.array_equal(got, buf)
    stats = sender_stats(qd)
    assert (stats["lent"], stats["placed"]) == (1, 1)  # the alloc, no second copy
    # Putting the same buffer again copies it (a slot is handed to one view at a time).
    qd.put(buf, timeout=T)
    again = qd.get(timeout=T)
    assert np.array_equal(again, got) and sender_stats(qd)["placed"] == 2
    # A C-contiguous part of a fresh buffer also goes by reference.
    rows = producer.alloc((4, 32 * KiB), np.uint8)
    rows[2] = 9
    qd.put(rows[2:], timeout=T)
    part = qd.get(timeout=T)
    assert part.shape == (2, 32 * KiB) and (part[0] == 9).all()
    assert sender_stats(qd)["lent"] == 2
    # Dropped without a put: the slot goes back to the pool.
    pool = producer.shm.pool
    before = pool.slots_in_use
    unused = producer.alloc(100 * KiB)
    assert pool.slots_in_use == before + 1
    del unused
    gc.collect()
    assert pool.slots_in_use == before
    # Also when the last reference dies in a garbage cycle.
    cycle: dict[str, Any] = {"buf": producer.alloc(100 * KiB)}
    cycle["self"] = cycle
    assert pool.slots_in_use == before + 1
    del cycle
    gc.collect()
    assert pool.slots_in_use == before
    # Small or empty requests are ordinary arrays.
    assert producer.alloc(0).shape == (0,)


def test_a_lent_buffer_goes_by_reference_from_where_it_starts(make: Any) -> None:
    # The array alloc returned is known to start at its slot; any other view of the buffer
    # says where it starts, even once that array is gone.
    qd = make(shm_threshold=64 * KiB)
    producer = producer_of(qd)
    rows = producer.alloc((4, 32 * KiB), np.uint8)
    rows[:] = np.arange(4, dtype=np.uint8)[:, None]
    part = rows[1:]
    del rows
    gc.collect()
    qd.put(part, timeout=T)
    got = qd.get(timeout=T)
    assert is_shared(got) and got.shape == (3, 32 * KiB)
    assert [int(r.min()) for r in got] == [int(r.max()) for r in got] == [1, 2, 3]
    flat = producer.alloc(96 * KiB, np.float32)  # one dimension: no reshape
    assert flat.shape == (96 * KiB,) and flat.dtype == np.float32 and flat.flags.writeable
    flat[:] = 5
    qd.put(flat, timeout=T)
    got = qd.get(timeout=T)
    assert is_shared(got) and got.shape == flat.shape and (got == 5).all()
    assert producer.alloc((), np.float64).shape == ()  # no dimension: reshaped to a scalar
    assert (sender_stats(qd)["lent"], sender_stats(qd)["placed"]) == (2, 3)


def test_a_producer_filling_alloc_buffers_back_to_back_batches(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Busy" is judged by when the caller came back for more: for alloc, at the alloc, however
    # long filling the buffer then takes (20 ms here, against a busy gap widened to 5 ms).
    # Judged at the put instead, such a producer sent one frame per payload.
    monkeypatch.setattr(_producer, "BUSY_GAP", 0.005)
    qd = make(maxsize=64, shm_threshold=64 * KiB, flush_interval=1.0)
    producer = producer_of(qd)
    n = 12
    for i in range(n):
        buf = producer.alloc(32 * KiB, np.float64)
        time.sleep(0.02)  # a slow fill (a stand-in for real work, not a wait for anything)
        buf[:] = i
        qd.put(buf, timeout=T)
    got = [float(qd.get(timeout=T)[-1]) for _ in range(n)]
    assert got == [float(i) for i in range(n)]
    stats = producer.statistics()
    assert stats.sent == n and stats.batches_sent <= n // 2, stats
    assert sender_stats(qd)["lent"] == n  # and each went by reference, no copy


def test_alloc_falls_back_to_ordinary_memory(make: Any) -> None:
    qd = make(memory_pool_size=0)
    buf = producer_of(qd).alloc(100 * KiB)
    assert buf.flags.writeable and buf.nbytes == 100 * KiB and buf.base is None
    buf[:] = 1
    qd.put(buf, timeout=T)
    got = qd.get(timeout=T)
    assert not is_shared(got) and (got == 1).all()


def test_a_reliable_shm_queue_sends_large_payloads_inline_and_says_so(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The reliable layer keeps frames for resending; a pool slot cannot be kept that way.
    qd = make(ack=True)
    with caplog.at_level("INFO", logger="sage_zmq.queue"):
        buf = qd.alloc(256 * KiB)
    assert not is_shared(buf)
    assert any("inline, not through the shared-memory pool" in r.message for r in caplog.records)
    buf[:] = 7
    qd.put(buf, timeout=T)
    got = qd.get(timeout=T)
    assert not is_shared(got) and got.nbytes == 256 * KiB and (got == 7).all()


# ------------------------------------------------------------------------ frames


def test_large_batches_split_into_capped_frames_and_bad_records_cost_nothing(make: Any) -> None:
    qd = make(shm_threshold=1 << 40)  # everything inline
    with contextlib.suppress(Empty):
        qd.get_nowait()  # bind the consumer
    link = ShmQueueType().open_producer_link(qd)
    try:
        link.send_hello("split-test", 0, 0, 0)
        chunk = 512 * KiB
        records: list[Any] = [bytes([i]) * chunk for i in range(20)]
        records.insert(7, object())
        sent, nbytes, errors = link.send_batch("split-test", 0, records)
        assert sent == 20 and len(errors) == 1 and "object" in errors[0]
        assert nbytes > 20 * chunk
        got = [qd.get(timeout=T) for _ in range(20)]
        assert [g[0] for g in got] == list(range(20))
        stats = qd.statistics()
        assert stats.batches_received >= 20 * chunk // (4 * MiB) + 1, stats
    finally:
        link.close()


def test_slots_of_unencodable_records_are_given_back(make: Any) -> None:
    qd = make(shm_threshold=1024)
    with contextlib.suppress(Empty):
        qd.get_nowait()
    link = ShmQueueType().open_producer_link(qd)
    try:
        link.send_hello("bad-records", 0, 0, 0)
        records = [np.ones(1000), [np.ones(2000), object()], np.ones(3000)]
        sent, _, errors = link.send_batch("bad-records", 0, records)
        assert sent == 2 and len(errors) == 1
        pool = link.shm.pool
        assert pool.slots_in_use == 2  # the two sent arrays; the failed record's slot is back
        a, b = qd.get(timeout=T), qd.get(timeout=T)
        assert a.shape == (1000,) and b.shape == (3000,)
        del a, b
        with contextlib.suppress(Empty):
            qd.get(timeout=0.01)  # the consumer lets go of its finished batch
        wait_until(
            lambda: (link.poll(0.01), pool.slots_in_use)[1] == 0,
            "the consumer to release both slots",
        )
    finally:
        link.close()


# ------------------------------------------------------------------------ lifetime


def test_segments_are_private_and_removed_when_the_queue_closes(make: Any) -> None:
    qd = make(shm_threshold=1024)
    qd.put(np.ones(10_000), timeout=T)
    view = qd.get(timeout=T)
    names = ours(os.getpid())
    assert names
    for name in names:
        st = os.stat(f"/dev/shm/{name}")
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
    path = str(qd.endpoint)[len("ipc://") :]
    qd.close()
    assert not ours(os.getpid()) and not os.path.exists(path)
    assert view.sum() == 10_000  # a view outlives its producer's segment (still mapped)


def test_a_consumer_lets_go_of_the_segments_its_producer_trimmed(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A removed segment's memory stays taken while anyone maps it: trimming frees nothing
    # unless the consumer unmaps too, though no new segment comes to make it look.
    monkeypatch.setattr(transfer, "_TRIM_EVERY", 0.0)
    monkeypatch.setattr(transfer, "GONE_LOOK_EVERY", 0.0)
    qd = make(shm_threshold=1024)
    big = np.ones(40 * MiB // 8)
    qd.put(big, timeout=T)
    first = qd.get(timeout=T)
    qd.put(big, timeout=T)  # the first still held: a second segment
    second = qd.get(timeout=T)
    pool = producer_of(qd).shm.pool
    cache = qd._handle().consumer(qd)._inlets[0].shm.cache
    assert len(pool.statistics().segments) == 2 and len(cache.mapped) == 2
    del first, second
    wait_until(lambda: (pump(qd), len(pool.statistics().segments))[1] == 1, "the trim")
    wait_until(lambda: (pump(qd), cache.mapped)[1] == pool.statistics().segments, "the unmap")


def test_frames_of_a_small_pool_carry_a_quarter_of_it(make: Any) -> None:
    # A frame's slots come back only once it is sent and read; frames as large as a small pool
    # made every busy put wait for the consumer to read the previous frame.
    big, small = make(), make(memory_pool_size=4)
    for qd in (big, small):
        qd.put(np.ones(4), timeout=T)
        assert qd.get(timeout=T).sum() == 4
    assert producer_of(big)._flush_bytes == SHM_FLUSH_BYTES
    assert producer_of(small)._flush_bytes == MiB


def test_metadata_is_validated() -> None:
    for key, bad in (
        ("shm_threshold", -1),
        ("shm_threshold", 1.5),
        ("memory_pool_size", "1G"),
        ("shm_wait", True),
    ):
        with pytest.raises(DescriptorError, match=key):
            QueueDescriptor(None, "shm", {key: bad})


def _endless_producer(conn: Connection, qd: QueueDescriptor) -> None:
    conn.send(os.getpid())
    arr = np.zeros(256 * KiB // 8)
    i = 0
    while True:
        arr[:] = i
        qd.put(arr, timeout=T)
        i += 1


def _holding_consumer(conn: Connection, qd: QueueDescriptor, n: int) -> None:
    held = [qd.get(timeout=T) for _ in range(n)]
    conn.send([float(a[0]) for a in held])
    conn.recv()  # hold the views until killed


def _spawn(target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
    proc.start()
    theirs.close()
    return proc, mine


def _recv(conn: Connection) -> Any:
    assert conn.poll(T), "the child did not answer"
    return conn.recv()


def _many_small_frames_then_close(conn: Connection, qd: QueueDescriptor, n: int) -> None:
    for i in range(n):
        qd.put(i, timeout=T)
    t0 = time.monotonic()
    qd.close(timeout=T)  # waits for the receipt of all n frames
    conn.send(time.monotonic() - t0)


def test_a_consumer_that_is_not_reading_still_confirms_a_closing_producer(make: Any) -> None:
    # One frame per record and nobody in get(): the background read takes what has arrived
    # in bursts, so the producer's close gets its receipt long before its timeout.
    n = 2000
    qd = make(maxsize=n, batch_size=1)
    with contextlib.suppress(Empty):
        qd.get_nowait()  # bind, then leave the reading to the background
    proc, conn = _spawn(_many_small_frames_then_close, qd, n)
    try:
        waited = _recv(conn)
        assert waited < T / 4, f"close waited {waited:.1f} s for its receipt"
        proc.join(T)
        assert proc.exitcode == 0
        assert [qd.get(timeout=T) for _ in range(n)] == list(range(n))
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(T)


def test_sigkill_of_the_producer_mid_transfer_leaves_nothing(make: Any) -> None:
    qd = make(maxsize=8)
    with contextlib.suppress(Empty):
        qd.get_nowait()  # bind first
    proc, conn = _spawn(_endless_producer, qd)
    try:
        pid = _recv(conn)
        got = [qd.get(timeout=T) for _ in range(5)]
        assert [float(a[0]) for a in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert all(is_shared(a) for a in got) and ours(pid)
        os.kill(pid, signal.SIGKILL)  # mid-put: it never stops on its own
        proc.join(T)
        assert proc.exitcode == -signal.SIGKILL
        assert ours(pid), "SIGKILL gave the producer no chance to clean up"
        assert [float(a[-1]) for a in got] == [0.0, 1.0, 2.0, 3.0, 4.0]  # views still valid
        with contextlib.suppress(Empty):
            while True:
                qd.get(timeout=0.2)  # whatever was in flight is still readable
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(T)
    qd.close()
    assert not ours(pid), "the consumer's close did not sweep the dead producer's segments"


def test_sigkill_of_the_consumer_mid_transfer_leaves_nothing(make: Any) -> None:
    qd = make(maxsize=100, shm_threshold=64 * KiB)
    path = str(qd.endpoint)[len("ipc://") :]
    proc, conn = _spawn(_holding_consumer, qd, 3)
    try:
        for i in range(6):
            qd.put(np.full(64 * KiB, float(i)), timeout=T)
        assert _recv(conn) == [0.0, 1.0, 2.0]
        assert ours(os.getpid()) and producer_of(qd).shm.pool.slots_in_use >= 3
        proc.kill()
        proc.join(T)
        with contextlib.suppress(DeliveryError):
            qd.close(timeout=0.5)  # records the dead consumer never confirmed are reported
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(T)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the killed consumer's socket file
    assert not ours(os.getpid())


# A consumer that replaces another one starts with a handshake: until the producer's socket
# has reconnected, what it sends may still go to the old connection and be lost with it (no
# ack on plain queues), so the producer greets until the new consumer answers.
GREETING = "hello"


def _greet(qd: QueueDescriptor, conn: Connection) -> None:
    for _ in range(int(T / 0.25)):
        qd.put(GREETING, timeout=T)
        if conn.poll(0.25):
            assert conn.recv() == "greeted"
            return
    raise AssertionError("the new consumer never got a greeting")


def _take_greeted(qd: QueueDescriptor, conn: Connection, n: int) -> list[Any]:
    """The next ``n`` records after the greeting (later copies of it skipped)."""
    while qd.get(timeout=T) != GREETING:
        pass
    conn.send("greeted")
    taken: list[Any] = []
    while len(taken) < n:
        item = qd.get(timeout=T)
        if not isinstance(item, str):
            taken.append(item)
    return taken


def _greeted_holding_consumer(conn: Connection, qd: QueueDescriptor, n: int) -> None:
    held = _take_greeted(qd, conn, n)
    conn.send([float(a[0]) for a in held])
    conn.recv()  # hold the views until killed


def test_a_new_consumer_gets_back_the_pool_room_a_killed_one_held(make: Any) -> None:
    # A 1 MiB pool holds four 256 KiB payloads. The first consumer takes three, holds their
    # views and is SIGKILLed: it will never release them. Its successor's first CREDIT says
    # where its life started, so the producer takes those three slots back (the old process
    # is gone) and the next four payloads all go through the pool, none inline.
    qd = make(maxsize=100, shm_threshold=64 * KiB, memory_pool_size=1, shm_wait=T)
    path = str(qd.endpoint)[len("ipc://") :]
    payload = np.zeros(256 * KiB // 8)
    first, conn = _spawn(_holding_consumer, qd, 3)
    second: Any = None
    try:
        for i in range(3):
            qd.put(np.full_like(payload, i), timeout=T)
        assert _recv(conn) == [0.0, 1.0, 2.0]
        pool = producer_of(qd).shm.pool
        assert pool.slots_in_use == 3
        # The producer knows this consumer (a long-lived one always has heard from it; here its
        # first CREDIT may still be unread, and a connection's unread messages die with it).
        producer = producer_of(qd)
        wait_until(
            lambda: (producer.poll_credit(), producer._session)[1] is not None,
            "the first consumer's credit",
        )
        first.kill()
        first.join(T)
        second, conn = _spawn(_greeted_holding_consumer, qd, 4)
        _greet(qd, conn)
        for i in range(4):
            qd.put(np.full_like(payload, 10 + i), timeout=T)
        assert _recv(conn) == [10.0, 11.0, 12.0, 13.0]
        stats = sender_stats(qd)
        assert stats["reclaimed"] == 3, stats
        assert stats["inline_fallbacks"] == 0 and stats["placed"] == 7, stats
        assert stats["waits"] <= 1, stats  # at most one short wait, for that CREDIT
        assert pool.slots_in_use == 4  # the four the living consumer holds
    finally:
        for proc in (first, second):
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join(T)
        with contextlib.suppress(DeliveryError):
            qd.close(timeout=0.5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the killed consumer's socket file
    assert not ours(os.getpid())


def _taking_consumer(conn: Connection, qd: QueueDescriptor, n: int) -> None:
    taken = []
    for _ in range(n):
        arr = qd.get(timeout=T)
        taken.append(float(arr[0]))
        del arr  # released: its slot can take the next payload
    conn.send(taken)


def test_a_pool_smaller_than_a_batch_never_waits_for_its_own_unsent_slots(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 50 payloads of 256 KiB through a 1 MiB pool: a busy producer batches them, and the
    # fifth finds the pool full of the four still in its own batch, which nobody can release
    # before they are sent. It sends them and waits for their release, instead of waiting
    # shm_wait and sending everything inline from then on.
    from sage_zmq.shm import ring

    monkeypatch.setattr(
        ring, "SUPPORTED", False
    )  # releases as frames; the ring case: test_shm_ring
    qd = make(maxsize=100, shm_threshold=64 * KiB, memory_pool_size=1, shm_wait=T)
    proc, conn = _spawn(_taking_consumer, qd, 50)
    try:
        src = np.zeros(256 * KiB // 8)
        for i in range(50):
            src[0] = i
            qd.put(src, timeout=T)
        assert _recv(conn) == [float(i) for i in range(50)]
        stats = sender_stats(qd)
        assert stats["placed"] == 50 and stats["inline_fallbacks"] == 0, stats
    finally:
        proc.join(T)
        if proc.is_alive():
            proc.kill()
            proc.join(T)


def _reopening_consumer(conn: Connection, qd: QueueDescriptor) -> None:
    held = qd.get(timeout=T)
    qd.close()  # this consumer ends; its process, and the view, live on
    second, third = _take_greeted(qd, conn, 2)  # a new consumer session, same process
    conn.send([float(held[0]), float(held[-1]), float(second[0]), float(third[0])])
    conn.recv()


def test_a_consumer_reopened_in_a_living_process_keeps_its_views(make: Any) -> None:
    # A new consumer session from the same process: the old session's views may still be in
    # use (here one is), so the producer must not take their slots back. The pool holds two
    # 512 KiB payloads; with both held, the third goes inline after shm_wait.
    qd = make(maxsize=100, shm_threshold=64 * KiB, memory_pool_size=1, shm_wait=1.0)
    payload = np.zeros(512 * KiB // 8)
    proc, conn = _spawn(_reopening_consumer, qd)
    try:
        qd.put(np.full_like(payload, 1.0), timeout=T)
        _greet(qd, conn)
        qd.put(np.full_like(payload, 2.0), timeout=T)
        qd.put(np.full_like(payload, 3.0), timeout=T)
        assert _recv(conn) == [1.0, 1.0, 2.0, 3.0]  # the held view was never overwritten
        stats = sender_stats(qd)
        assert stats["reclaimed"] == 0 and stats["inline_fallbacks"] == 1, stats
        conn.send("done")
        proc.join(T)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(T)


# ------------------------------------------------------------------------ lz4 decisions


def test_compression_mode_is_auto_only_for_remote_tcp() -> None:
    assert compression_mode("auto", "tcp://10.1.2.3:5555") == "auto"
    assert compression_mode("auto", "tcp://worker-7.cluster:5555") == "auto"
    for local in (
        "tcp://127.0.0.1:5555",
        "tcp://localhost:1",
        "tcp://[::1]:5",
        "ipc:///x",
        "inproc://x",
        None,
    ):
        assert compression_mode("auto", local) is False, local
    assert compression_mode(True, "ipc:///x") is True
    assert compression_mode(False, "tcp://10.1.2.3:1") is False
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        compression_mode("yes", None)


def test_auto_compression_follows_what_pays() -> None:
    codec = Codec()
    text = [b'{"sensor": "s-0001", "value": 21.5, "unit": "celsius"}' * 200] * 4
    noise = [os.urandom(10_000) for _ in range(4)]
    frame, _, _ = codec.encode_batch("p", 0, text, compress="auto")
    assert frame[4] & FLAG_LZ4 and len(frame) < 10_000
    flagged = 0
    for i in range(200):
        frame, _, _ = codec.encode_batch("p", i, noise, compress="auto")
        flagged += bool(frame[4] & FLAG_LZ4)
        assert codec.decode(frame).fields[2] == noise
    policy: Lz4Policy = codec.lz4_policy
    assert flagged == 0 and policy.skipped > 150, policy.skipped  # lz4 rarely even tried
    frame, _, _ = codec.encode_batch("p", 0, text, compress="auto")
    # compressible again: found at the next sample at the latest
    for i in range(1100):
        if frame[4] & FLAG_LZ4:
            break
        frame, _, _ = codec.encode_batch("p", i, text, compress="auto")
    assert frame[4] & FLAG_LZ4
    small = Codec()
    small.compression_min_bytes = 1 << 20
    frame, _, _ = small.encode_batch("p", 0, text, compress=True)
    assert not frame[4] & FLAG_LZ4  # below compression_min_bytes: not worth a try


# ------------------------------------------------------------------------ nested payload scan

_SCAN_AT = 16  # bytes of at least this size count as a nested payload below


def _nested_reference(records: list[Any]) -> bool:
    # The rule, one container at a time: a bytes-like of _SCAN_AT bytes 1 to 8 containers
    # below a record; a Packet is a container, except that a record's own Packet is the record.
    def walk(obj: Any, level: int) -> bool:
        if isinstance(obj, bytes | bytearray):
            return level > 0 and len(obj) >= _SCAN_AT
        if isinstance(obj, memoryview):
            return level > 0 and obj.nbytes >= _SCAN_AT
        if level >= 8:
            return False
        if isinstance(obj, dict):
            return any(walk(v, level + 1) for v in obj.values())
        if isinstance(obj, list | tuple):
            return any(walk(v, level + 1) for v in obj)
        if isinstance(obj, Packet):
            return walk(obj.payload, level + 1 if level else 0)
        return False

    return any(walk(r, 0) for r in records)


_leaf = st.one_of(
    st.integers(),
    st.text(max_size=20),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.binary(max_size=2 * _SCAN_AT),
    st.binary(max_size=2 * _SCAN_AT).map(bytearray),
    st.binary(max_size=2 * _SCAN_AT).map(memoryview),
)
_record = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=4),
        inner.map(Packet),
    ),
    max_leaves=40,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_record, max_size=5))
def test_the_nested_payload_scan_finds_exactly_what_the_rule_names(records: list[Any]) -> None:
    assert _has_nested_bytes(records, _SCAN_AT) is _nested_reference(records)


def test_the_nested_payload_scan_stops_eight_containers_down() -> None:
    payload = bytes(_SCAN_AT)
    deep: Any = payload
    for _ in range(8):
        deep = [deep]
    assert _has_nested_bytes([deep], _SCAN_AT)  # eight lists down: found
    assert not _has_nested_bytes([[deep]], _SCAN_AT)  # nine: past the scan
    boxed: Any = Packet(payload)  # a Packet inside a record is a container like the others
    for _ in range(7):
        boxed = [boxed]
    assert _has_nested_bytes([boxed], _SCAN_AT)
    assert not _has_nested_bytes([[boxed]], _SCAN_AT)
    assert not _has_nested_bytes([payload, Packet(payload)], _SCAN_AT)  # records of their own
    assert _has_nested_bytes([Packet({"image": payload})], _SCAN_AT)


def test_tuple_keys_beside_pool_payloads_keep_every_slot_leased_once() -> None:
    # A frame with tuple (array) keys is decoded twice; its shared-memory views must come from
    # the first pass, or each slot is released twice and reused under a live view.
    qd = QueueDescriptor(None, "shm", {"maxsize": 100})
    held: list[Any] = []
    try:
        with contextlib.suppress(Empty):
            qd.get_nowait()
        for round_ in range(2):
            for i in range(10):
                n = round_ * 10 + i
                qd.put({"a": np.full(50_000, n, dtype=np.int32), "k": {(n, "t"): n}})
            for i in range(10):
                n = round_ * 10 + i
                got = qd.get(timeout=10)
                assert got["k"] == {(n, "t"): n}
                held.append(got["a"])  # keep every view alive while more arrive
        assert all(int(a.min()) == int(a.max()) == n for n, a in enumerate(held))
        assert qd.statistics().rejected == 0
    finally:
        held.clear()
        qd.close()


@pytest.mark.parametrize("kib", [64, 128])
def test_a_buffer_refilled_after_each_put_arrives_as_it_was_put(kib: int) -> None:
    # docs/architecture.md: through shm a large payload is copied into the pool inside put, so
    # the caller may reuse its buffer at once. Payloads too small to make a batch "heavy" were
    # held by reference until the batch's flush, and arrived with a later fill.
    n = 300
    qd = QueueDescriptor(None, "shm", {"maxsize": 1000})
    buf = np.zeros(kib * 1024 // 8, dtype=np.float64)
    raw = bytearray(kib * 1024)
    try:
        with contextlib.suppress(Empty):
            qd.get_nowait()
        for i in range(n):
            buf[:] = i
            qd.put(buf)
            raw[:] = bytes([i % 256]) * len(raw)
            qd.put(raw)
        for i in range(n):
            arr = qd.get(timeout=10)
            assert float(arr.min()) == float(arr.max()) == i, f"array {i} holds another fill"
            data = qd.get(timeout=10)
            assert bytes(data[:1]) * len(data) == bytes(data) and data[0] == i % 256, i
            del arr, data
    finally:
        qd.close()


def test_a_payload_whose_record_fails_to_encode_gives_its_slot_back(make: Any) -> None:
    # A busy producer copies a payload into the pool at put; if its record then fails at the
    # flush (here a Packet whose headers hold a set), that slot is never sent, so nobody
    # would release it: it is given back with the error, or the pool drains, bad record by
    # bad record, until every payload goes inline.
    qd = make(maxsize=1000, shm_threshold=64 * KiB, memory_pool_size=8)
    producer = producer_of(qd)
    failures = 0
    for i in range(40):
        headers: dict[str, Any] = {"bad": {1, 2}} if i == 20 else {"i": i}
        try:
            qd.put(Packet(np.full(256 * KiB // 8, float(i)), 0, None, None, headers), timeout=T)
        except EncodeError:
            failures += 1
    try:
        producer.flush(timeout=T)
    except EncodeError:
        failures += 1
    assert failures == 1
    got = []
    for _ in range(39):
        packet = qd.get(timeout=T)
        got.append(int(packet.payload[0]))
        del packet
    assert got == [i for i in range(40) if i != 20]
    assert not producer.shm._early
    # The consumer's releases go out, the producer reads them: every slot comes back.
    wait_until(lambda: (pump(qd), producer.shm.pool.slots_in_use)[1] == 0, "every slot back")


def test_a_producers_pool_statistics_have_the_keys_operations_md_names(make: Any) -> None:
    qd = make()
    qd.put(np.zeros(128 * KiB // 8), timeout=T)
    arr = qd.get(timeout=T)
    del arr
    shm = (producer_of(qd).statistics().extra or {})["shm"]
    documented = {
        "placed", "placed_bytes", "lent", "released", "ring_released", "reclaimed",
        "inline_fallbacks", "waits", "in_use_bytes", "slots_in_use", "segments",
    }  # fmt: skip
    assert documented <= set(shm), documented - set(shm)
    assert shm["placed"] == 1
