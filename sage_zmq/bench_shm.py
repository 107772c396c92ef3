"""``sage-zmq bench shm``: large payloads between two processes, and lz4 over tcp.

Every number is measured in the same run as the competitors it is compared with: a numpy
memcpy of the same size, ``multiprocessing.Queue``, raw pyzmq PUSH/PULL over ipc with
``copy=False``. Producers are spawned processes; the consumer is this process. A transfer is
timed from the "go" the consumer gives until it holds the last payload (the producer's start-up,
its pool's creation and the first mapping are outside the window: one warm-up payload, two
through ``shm``, whose pool may take a second segment at its second payload). The array and
pool rows take turns and keep each contender's best of three rounds.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import tempfile
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from sage_zmq.bench import best_of_alternating, result_row

Row = dict[str, Any]
MB = 1_000_000
MiB = 1 << 20


def _row(
    name: str,
    value: float,
    unit: str,
    competitor: str = "",
    base: float | None = None,
    target: str = "",
) -> Row:
    return result_row(name, value, unit, competitor, base, target=target)


def _payload(nbytes: int) -> np.ndarray:
    arr = np.arange(nbytes // 8, dtype=np.float64)
    arr[::7] *= 1.5  # touched, and not trivially compressible
    return arr


# ---------------------------------------------------------------------------- workers


def _sage_producer(conn: Connection, qd: Any, nbytes: int, n: int, mode: str) -> None:
    src = _payload(nbytes)
    # Warm-up: the pool is created and pre-faulted here, and reaches its steady size (a
    # payload that fills a segment gets a second one while the consumer holds the first).
    qd.put(src, timeout=60)
    qd.put(src, timeout=60)
    conn.send("ready")
    conn.recv()
    if mode == "alloc":
        for _ in range(n):
            buf = qd.alloc(src.shape, src.dtype)
            np.copyto(buf, src)  # the producer writes its payload straight into the pool
            qd.put(buf, timeout=60)
            del buf
    else:
        for _ in range(n):
            qd.put(src, timeout=60)
    qd.close(timeout=60)
    conn.send("done")


def _mpq_producer(conn: Connection, q: Any, nbytes: int, n: int) -> None:
    src = _payload(nbytes)
    q.put(src)
    conn.send("ready")
    conn.recv()
    for _ in range(n):
        q.put(src)
    conn.send("done")
    conn.recv()


def _zmq_producer(conn: Connection, endpoint: str, nbytes: int, n: int) -> None:
    import zmq

    src = _payload(nbytes)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.connect(endpoint)
    sock.send(src.data, copy=False)
    conn.send("ready")
    conn.recv()
    for _ in range(n):
        sock.send(src.data, copy=False)
    conn.send("done")
    conn.recv()
    sock.close(linger=-1)
    ctx.term()


def _records_producer(conn: Connection, qd: Any, records: list[Any], n: int) -> None:
    qd.put(records[0], timeout=60)
    conn.send("ready")
    conn.recv()
    for i in range(n):
        qd.put(records[i % len(records)], timeout=60)
    qd.close(timeout=60)
    conn.send("done")


# ---------------------------------------------------------------------------- drivers


def _spawn(target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(theirs, *args), daemon=True)
    proc.start()
    theirs.close()
    return proc, mine


def _timed(
    conn: Connection, take: Callable[[], Any], n: int, warm_up: Callable[[], Any] | None = None
) -> float:
    """Seconds from "go" to holding the n-th payload (after ``warm_up``, default one take)."""
    (warm_up or take)()
    if not conn.poll(120):
        raise RuntimeError("benchmark producer did not start")
    assert conn.recv() == "ready"
    t0 = time.perf_counter()
    conn.send("go")
    for _ in range(n):
        take()
    return time.perf_counter() - t0


def _finish(proc: Any, conn: Connection) -> None:
    try:
        if conn.poll(120):
            conn.recv()
        if proc.is_alive():
            conn.send("bye")
    except (EOFError, OSError):
        pass
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        proc.join(10)


def bench_memcpy(nbytes: int, reps: int) -> float:
    """Bytes/s of ``np.copyto`` between two pre-faulted arrays of ``nbytes``."""
    src = _payload(nbytes)
    dst = np.empty_like(src)
    dst[:] = 0
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def bench_memcpy_cold(nbytes: int, reps: int, span: int = 256 * MiB) -> float:
    """Bytes/s of ``np.copyto`` into a different destination each time (``span`` in all).

    A transfer between processes writes each payload to memory the other core then reads: the
    destination is not in this core's cache, unlike the hot-loop memcpy above.
    """
    src = _payload(nbytes)
    dsts = [np.empty_like(src) for _ in range(max(2, span // max(1, nbytes)))]
    for d in dsts:
        d[:] = 0  # fault the pages in outside the timing
    t0 = time.perf_counter()
    for i in range(reps):
        np.copyto(dsts[i % len(dsts)], src)
    return nbytes * reps / (time.perf_counter() - t0)


def bench_sage_shm(
    nbytes: int, n: int, *, mode: str = "put", meta: dict[str, Any] | None = None
) -> float:
    from sage_zmq import QueueDescriptor

    qd = QueueDescriptor(None, "shm", {"maxsize": 1000, **(meta or {})})
    proc, conn = _spawn(_sage_producer, qd, nbytes, n, mode)
    checksum = 0.0

    def take() -> None:
        nonlocal checksum
        arr = qd.get(timeout=120)
        checksum += float(arr[-1])  # the consumer holds a real array: read a value of it

    def warm_up() -> None:
        held = qd.get(timeout=120)
        qd.get(timeout=120)  # the producer put this one while ``held`` kept the first slot
        del held

    try:
        seconds = _timed(conn, take, n, warm_up)
        _finish(proc, conn)
    finally:
        qd.close(timeout=5)
    return nbytes * n / seconds


def bench_mp_queue(nbytes: int, n: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue(maxsize=8)
    proc, conn = _spawn(_mpq_producer, q, nbytes, n)
    try:
        seconds = _timed(conn, lambda: q.get(timeout=120), n)
        _finish(proc, conn)
    finally:
        q.close()
        q.join_thread()
    return nbytes * n / seconds


def bench_raw_zmq(nbytes: int, n: int) -> float:
    import zmq

    path = os.path.join(tempfile.mkdtemp(prefix="szb-"), "s")
    endpoint = f"ipc://{path}"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 4)
    sock.bind(endpoint)
    proc, conn = _spawn(_zmq_producer, endpoint, nbytes, n)

    def take() -> None:
        frame = sock.recv(copy=False)
        float(np.frombuffer(frame.buffer, np.float64)[-1])

    try:
        seconds = _timed(conn, take, n)
        _finish(proc, conn)
    finally:
        sock.close(linger=0)
        ctx.term()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
    return nbytes * n / seconds


def bench_threshold(nbytes: int, n: int, through_pool: bool) -> float:
    """Payloads/s of ``nbytes`` through shm with the pool (threshold 1) or inline."""
    meta = {"shm_threshold": 1 if through_pool else 1 << 40}
    return bench_sage_shm(nbytes, n, meta=meta) / nbytes


def _text_records(nbytes: int, count: int) -> list[bytes]:
    rng = random.Random(1)
    out = []
    for _ in range(count):
        rows: list[dict[str, Any]] = []
        text = ""
        while len(text) < nbytes:
            i = len(rows)
            rows.append(
                {
                    "id": i,
                    "sensor": f"sensor-{rng.randrange(64):04d}",
                    "value": round(rng.gauss(20, 5), 3),
                    "unit": "celsius",
                    "ok": rng.random() > 0.1,
                }
            )
            text = json.dumps(rows)
        out.append(text[:nbytes].encode())
    return out


def bench_tcp(records: list[bytes], n: int, compression: bool) -> tuple[float, float]:
    """(payload bytes/s, wire bytes / payload bytes) for records over tcp loopback."""
    from sage_zmq.wire.codec import Codec

    rate = bench_records("tcp", records, n, {"compression": compression})
    codec = Codec()
    batch = records[:16]
    frame, _, _ = codec.encode_batch("p", 0, batch, compress=compression)
    ratio = len(frame) / sum(len(r) for r in batch)
    return len(records[0]) * rate, ratio


def _documents(nbytes: int, count: int) -> list[dict[str, Any]]:
    """Dict records of about ``nbytes`` whose bulk is a str (no bytes for the pool to take)."""
    return [
        {
            "id": i,
            "text": "x" * nbytes,
            "tags": ["a", "b", "c"],
            "score": 1.5,
            "meta": {"source": "bench", "n": i},
        }
        for i in range(count)
    ]


def bench_records(
    queue_type: str, records: list[Any], n: int, meta: dict[str, Any] | None = None
) -> float:
    """Records/s from another process through a queue of ``queue_type`` (records cycled)."""
    from sage_zmq import QueueDescriptor

    qd = QueueDescriptor(None, queue_type, {"maxsize": 1000, **(meta or {})})
    proc, conn = _spawn(_records_producer, qd, records, n)
    try:
        seconds = _timed(conn, lambda: qd.get(timeout=120), n)
        _finish(proc, conn)
    finally:
        qd.close(timeout=5)
    return n / seconds


def bench_lz4_speed(records: list[bytes]) -> float:
    import lz4.frame

    data = b"".join(records)
    t0 = time.perf_counter()
    for _ in range(5):
        lz4.frame.compress(data)
    return 5 * len(data) / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------- the section


def _quiet(step: str) -> None:
    pass


def run(quick: bool, progress: Callable[[str], None] = _quiet) -> list[Row]:
    # As in the core section (docs/benchmarks.md): one run of each, one after the other,
    # mostly measured which of them a noisy spell of this shared VM hit.
    rounds = 1 if quick else 3
    rows: list[Row] = []
    gbs = "GB/s"
    for nbytes, n_full, n_quick in ((1 * MiB, 2000, 200), (64 * MiB, 48, 8)):
        n = n_quick if quick else n_full
        label = f"{nbytes // MiB} MiB"
        reps, cold_reps = (5, 8) if nbytes > MiB else (50, 512)
        runs = {
            "memcpy": partial(bench_memcpy, nbytes, reps),
            "memcpy, cold": partial(bench_memcpy_cold, nbytes, cold_reps),
            "multiprocessing.Queue": partial(bench_mp_queue, nbytes, max(4, n // 4)),
            "raw pyzmq ipc": partial(bench_raw_zmq, nbytes, n),
            "shm put": partial(bench_sage_shm, nbytes, n),
            "shm alloc": partial(bench_sage_shm, nbytes, n, mode="alloc"),
        }
        rates = best_of_alternating({f"{label} {k}": f for k, f in runs.items()}, rounds, progress)
        memcpy, cold, mpq, raw, ours, lent = (rates[f"{label} {k}"] / 1e9 for k in runs)
        name = f"shm {label} numpy arrays, put (one copy into the pool, zero-copy get)"
        rows.append(_row(name, ours, gbs, "multiprocessing.Queue", mpq, ">= 10x"))
        rows.append(_row(name, ours, gbs, "raw pyzmq PUSH/PULL ipc copy=False", raw, ">= 2x"))
        rows.append(_row(name, ours, gbs, "numpy memcpy, same size", memcpy, ">= 0.5x"))
        rows.append(_row(name, ours, gbs, "numpy memcpy to a cache-cold destination", cold))
        name = f"shm {label} numpy arrays, alloc + fill in place + put (no copy by the queue)"
        rows.append(_row(name, lent, gbs, "numpy memcpy, same size", memcpy, ">= 0.8x"))
    # Where the pool starts to pay: payloads/s through the pool vs inline over the ipc socket.
    for kib in (16, 64, 256):
        n = 300 if quick else 3000
        rates = best_of_alternating(
            {
                f"{kib} KiB through the pool": partial(bench_threshold, kib * 1024, n, True),
                f"{kib} KiB inline": partial(bench_threshold, kib * 1024, n, False),
            },
            rounds,
            progress,
        )
        pool, inline = rates[f"{kib} KiB through the pool"], rates[f"{kib} KiB inline"]
        rows.append(
            _row(
                f"shm {kib} KiB payloads through the pool",
                pool,
                "payloads/s",
                "the same inline in the ipc frame",
                inline,
                "> 1x above shm_threshold",
            )
        )
    # Records large for their count make shm scan each batch for nested bytes payloads; with
    # none to find, that scan is all shm adds to what tcp does.
    docs = _documents(10 * 1024, 8)
    n = 2000 if quick else 20000
    rows.append(
        _row(
            "shm 10 KiB dict records (a long str, no bytes), per-record put/get",
            bench_records("shm", docs, n),
            "records/s",
            "the same through tcp",
            bench_records("tcp", docs, n),
        )
    )
    # lz4 over tcp loopback: ratio and throughput, compressible and random 64 KiB records.
    n = 500 if quick else 5000
    for kind, records in (
        ("compressible (JSON text)", _text_records(64 * 1024, 8)),
        ("random", [os.urandom(64 * 1024) for _ in range(8)]),
    ):
        on, ratio_on = bench_tcp(records, n, True)
        off, _ = bench_tcp(records, n, False)
        rows.append(
            _row(
                f"tcp 64 KiB {kind} records, lz4 wire/payload ratio",
                ratio_on,
                "ratio",
                "uncompressed",
                1.0,
                "< 1 when compressible",
            )
        )
        rows.append(
            _row(f"tcp 64 KiB {kind} records, lz4 on", on / 1e6, "MB/s", "lz4 off", off / 1e6)
        )
        rows.append(_row(f"lz4 compress speed, {kind}", bench_lz4_speed(records) / 1e9, gbs))
    return rows


if __name__ == "__main__":
    import sys

    for r in run("--quick" in sys.argv):
        ratio = f" -> {r['ratio']:.2f}x" if r["ratio"] else ""
        base = r["competitor_value"]
        comp = f"  vs {r['competitor']}: {base:,.3f}{ratio}" if r["competitor"] else ""
        print(f"{r['name']}: {r['value']:,.3f} {r['unit']}{comp}  {r['target']}")
