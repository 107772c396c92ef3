"""The ``sage`` section of ``sage-zmq bench``: the reliable queue against the unacked ones.

Per-record ``put``/``get`` between two processes (the producer is spawned, this process
consumes), ``sage`` over ipc and tcp side by side with unacked ``shm``/``tcp`` measured in the
same run, interleaved, best of ``reps``; once with small records (ints: what the queues
themselves cost) and once with the 127-byte record dict of :mod:`sage_zmq.bench` (msgpack
dominates). Targets (issue 5): ``sage`` at least 0.6x its unacked counterpart and at least 1M
records/s over ipc. The producer write-ahead log row (``persist``, ``fsync: never``) is
informational.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import shutil
import tempfile
import time
from typing import Any

from sage_zmq.bench import RECORD, result_row

Row = dict[str, Any]

TARGET_RATIO = 0.6
TARGET_IPC_RATE = 1_000_000.0

_FAST = {"heartbeat_interval": 0.5, "reconnect_initial": 0.05, "reconnect_max": 1.0}


def _produce(qd: Any, n: int, ready: Any, small: bool) -> None:
    from sage_zmq import EndOfStream

    ready.wait()
    put = qd.put
    if small:
        for i in range(n):
            put(i)
    else:
        rec = RECORD
        for _ in range(n):
            put(rec)
    put(EndOfStream())
    qd.close(timeout=60)


def _rate(queue_type: str, metadata: dict[str, Any], n: int, small: bool) -> float:
    """Records per second through one queue, from the consumer's first to its last record."""
    from sage_zmq import Empty, QueueDescriptor

    qd = QueueDescriptor(queue_type=queue_type, metadata={"maxsize": 10000, **metadata})
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_produce, args=(qd, n, ready, small), daemon=True)
    proc.start()
    try:
        with contextlib.suppress(Empty):
            qd.get(timeout=0.01)  # bind before the producer connects
        ready.set()
        it = iter(qd)
        next(it)
        t0 = time.perf_counter()
        count = 1
        for _ in it:
            count += 1
        elapsed = time.perf_counter() - t0
        if count != n:
            raise RuntimeError(f"{queue_type} {metadata}: got {count} of {n} records")
        return (n - 1) / elapsed
    finally:
        proc.join(120)
        if proc.is_alive():
            proc.kill()
            proc.join()
        qd.close()


def _row(name: str, value: float, competitor: str, base: float, target: str) -> Row:
    return result_row(name, value, "records/s", competitor, base, target=target)


def run(quick: bool = False) -> list[Row]:
    """Rows ``{name, value, unit, competitor, competitor_value, ratio, target}``."""
    n = 200_000 if quick else 1_000_000
    reps = 1 if quick else 3
    persist = tempfile.mkdtemp(prefix="sage-bench-")
    pairs = [("sage ipc", "shm"), ("sage tcp", "tcp")]
    cases: dict[str, tuple[str, dict[str, Any]]] = {
        "shm": ("shm", {}),
        "sage ipc": ("sage", dict(_FAST)),
        "tcp": ("tcp", {}),
        "sage tcp": ("sage", {**_FAST, "transport": "tcp"}),
    }
    best: dict[tuple[str, bool], float] = {}
    try:
        for _ in range(reps):
            for small in (True, False):
                for label, (qtype, meta) in cases.items():
                    rate = _rate(qtype, meta, n if small else n // 2, small)
                    best[label, small] = max(best.get((label, small), 0.0), rate)
            wal = {**_FAST, "persist": persist, "fsync": "never"}
            rate = _rate("sage", wal, n // 4, True)
            best["wal", True] = max(best.get(("wal", True), 0.0), rate)
    finally:
        shutil.rmtree(persist, ignore_errors=True)
    rows = []
    for small in (True, False):
        what = "int records" if small else "127-byte dicts"
        for ours, theirs in pairs:
            target = f">= {TARGET_RATIO}x"
            if ours == "sage ipc":
                target += f" and >= {TARGET_IPC_RATE / 1e6:g}M records/s"
            rows.append(
                _row(
                    f"{ours} put/get, {what}",
                    best[ours, small],
                    f"unacked {theirs}",
                    best[theirs, small],
                    target,
                )
            )
    rows.append(
        _row(
            "sage ipc put/get, int records, producer WAL (fsync never)",
            best["wal", True],
            "sage ipc",
            best["sage ipc", True],
            "",
        )
    )
    return rows


def missed(rows: list[Row]) -> list[str]:
    """Names of rows that miss their target."""
    out = []
    for row in rows:
        low_ratio = bool(row["target"]) and (row["ratio"] or 0) < TARGET_RATIO
        slow = "M records/s" in row["target"] and row["value"] < TARGET_IPC_RATE
        if low_ratio or slow:
            out.append(row["name"])
    return out


if __name__ == "__main__":
    import sys

    rows = run(quick="--quick" in sys.argv)
    for r in rows:
        print(
            f"{r['name']:<58} {r['value']:>12,.0f} {r['unit']}  vs {r['competitor']}: "
            f"{r['competitor_value']:,.0f} -> {r['ratio']:.2f}x"
        )
    print("missed:", missed(rows) or "none")
