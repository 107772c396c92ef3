"""``sage-zmq bench``: sage-zmq against what a user would otherwise use, in the same run.

Every figure comes with its competitor measured seconds before on the same machine, and the
ratio between them; nothing here is a pass/fail test. Sections:

- ``core``: cross-process record dicts through ``shm``/``tcp`` (per-record put/get) vs
  ``multiprocessing.Queue`` and raw pyzmq PUSH/PULL with hand-batched msgpack (100 per frame);
  ``local`` vs ``queue.Queue`` between two threads; idle round-trip latency over ``shm`` vs a
  raw pyzmq PAIR ping-pong over ipc. The throughput rows are steady state: every producer
  delivers a warm-up record before the clock starts (see ``_timed_consume``), and the full run
  takes the best of three rounds in which the competitors take turns.
- ``routing``, ``shm``, ``sage``, ``ray`` (``--ray``): contributed by their modules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue as stdlib_queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

RECORD = {
    "id": 123456,
    "sensor": "sensor-0001",
    "value": 21.5,
    "ts": 1700000000.123,
    "tags": ["a", "b"],
    "ok": True,
    "unit": "celsius",
    "site": "building-7/floor-3",
    "seq": 42,
    "state": "nominal!!",
}
"""A 127-byte record (msgpack), the shape the issue measures."""

Row = dict[str, Any]


def result_row(
    name: str,
    value: float,
    unit: str,
    competitor: str = "",
    base: float | None = None,
    *,
    higher_is_better: bool = True,
    target: str = "",
) -> Row:
    """One benchmark result with its competitor's figure from the same run and the ratio
    (oriented so that above 1 means sage-zmq did better)."""
    ratio = None
    if base:
        ratio = value / base if higher_is_better else base / value
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "competitor": competitor,
        "competitor_value": base,
        "ratio": ratio,
        "target": target,
    }


# ------------------------------------------------------------------ workers (spawned)
def _sz_producer(qd: Any, n: int, ready: Any) -> None:
    from sage_zmq import EndOfStream

    put = qd.put
    rec = RECORD
    put(rec)  # the warm-up record (see _timed_consume)
    ready.wait()
    for _ in range(n):
        put(rec)
    put(EndOfStream())
    qd.close()


def _mpq_producer(q: Any, n: int, ready: Any) -> None:
    rec = RECORD
    q.put(rec)  # the warm-up record (see _timed_consume)
    ready.wait()
    for _ in range(n):
        q.put(rec)
    q.put(None)


def _raw_producer(endpoint: str, n: int, ready: Any, done: Any, codec: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    pack = _raw_codec(codec)[0]
    batch: list[Any] = []
    rec = RECORD
    sock.send(pack([rec]))  # the warm-up record (see _timed_consume)
    ready.wait()
    for _ in range(n):
        batch.append(rec)
        if len(batch) == 100:
            sock.send(pack(batch))
            batch = []
    if batch:
        sock.send(pack(batch))
    # No end-of-stream frame and no close until the consumer has everything: libzmq can drop
    # the tail of an ipc stream whose reader is at its high-water mark when the writer closes
    # (libzmq issue 4660; here it took the last frame in about one run of three).
    done.wait(60)
    sock.close(linger=0)
    ctx.term()


def _sz_echo(inbox: Any, outbox: Any) -> None:
    from sage_zmq import EndOfStream

    while True:
        item = inbox.get(timeout=60)
        if isinstance(item, EndOfStream):
            break
        outbox.put(item)
    outbox.close()
    inbox.close()


def _raw_echo(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(endpoint)
    while True:
        msg = sock.recv()
        if msg == b"stop":
            break
        sock.send(msg)
    sock.close(linger=0)
    ctx.term()


def _recv_polling(sock: Any, limit: float = 200e-6) -> bytes:
    """``sock.recv()``, polling (yielding the CPU between polls) for up to ``limit`` seconds
    before blocking: what a sage-zmq consumer does while replies come quickly."""
    import zmq

    end = time.perf_counter() + limit
    while True:
        try:
            return sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            if time.perf_counter() >= end:
                return sock.recv()
            os.sched_yield()  # POSIX, like the ipc endpoints this bench uses


def _raw_polling_echo(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(endpoint)
    while True:
        msg = _recv_polling(sock)
        if msg == b"stop":
            break
        sock.send(msg)
    sock.close(linger=0)
    ctx.term()


def _raw_queue_echo(inbox: str, outbox: str) -> None:
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(inbox)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(outbox)
    while True:
        _peer, msg = router.recv_multipart()
        if msg == b"stop":
            break
        dealer.send(msg)
    router.close(linger=0)
    dealer.close(linger=0)
    ctx.term()


# ------------------------------------------------------------------ measurements
def _spawn() -> Any:
    return mp.get_context("spawn")


@contextlib.contextmanager
def _spawned(target: Callable[..., None], *args: Any, wait: float = 60.0) -> Iterator[None]:
    """Run ``target(*args)`` in a spawned process for the block; then join it, or kill it
    if it has not ended within ``wait`` seconds (a benchmark never leaves a process behind)."""
    proc = _spawn().Process(target=target, args=args)
    proc.start()
    try:
        yield
    finally:
        proc.join(wait)
        if proc.is_alive():
            proc.kill()
            proc.join()


@contextlib.contextmanager
def _scratch_dir() -> Iterator[str]:
    """A private temporary directory (for ipc socket files), removed after the block."""
    tmp = tempfile.mkdtemp(prefix="szb-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _timed_consume(
    warm_up: Callable[[], Any], start: Callable[[], None], consume: Callable[[], int], n: int
) -> float:
    """Records per second of ``consume`` after ``start`` (which lets the producer go).

    Every producer first sends one warm-up record, and ``warm_up`` receives it before the
    clock starts: the raw producer has connected, a sage-zmq producer has opened its link
    (lazily, at its first put, with the imports that needs), multiprocessing.Queue has started
    its feeder thread. So each competitor is measured in its steady state, none with its
    start-up inside the clock.
    """
    warm_up()
    start()
    t0 = time.perf_counter()
    got = consume()
    elapsed = time.perf_counter() - t0
    if got != n:
        raise RuntimeError(f"benchmark lost records: got {got} of {n}")
    return n / elapsed


def bench_sage_cross_process(queue_type: str, n: int) -> float:
    from sage_zmq import Empty, QueueDescriptor

    qd = QueueDescriptor(queue_type=queue_type, metadata={"maxsize": 10000})
    ready = _spawn().Event()

    def consume() -> int:
        count = 0
        for _ in qd:
            count += 1
        return count

    try:
        # Bind before the producer starts so it never waits on reconnect back-off.
        with contextlib.suppress(Empty):
            qd.get(timeout=0.01)
        with _spawned(_sz_producer, qd, n, ready):
            rate = _timed_consume(lambda: qd.get(timeout=60), ready.set, consume, n)
    finally:
        qd.close()
    return rate


def bench_mp_queue(n: int) -> float:
    ctx = _spawn()
    q = ctx.Queue()
    ready = ctx.Event()

    def consume() -> int:
        count = 0
        while q.get() is not None:
            count += 1
        return count

    try:
        with _spawned(_mpq_producer, q, n, ready):
            rate = _timed_consume(lambda: q.get(timeout=60), ready.set, consume, n)
    finally:
        q.close()
        q.join_thread()
    return rate


def _raw_codec(name: str) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """(pack, unpack) of the library a hand-rolled pipeline would use."""
    if name == "ormsgpack":  # what sage-zmq packs plain records with (sage_zmq/wire/_fast.py)
        import ormsgpack

        return ormsgpack.packb, ormsgpack.unpackb
    import msgpack

    return msgpack.packb, msgpack.unpackb


def bench_raw_pyzmq(transport: str, n: int, codec: str = "msgpack") -> float:
    import zmq

    unpack = _raw_codec(codec)[1]
    ready, done = _spawn().Event(), _spawn().Event()
    with _scratch_dir() as tmp, zmq.Context() as ctx, ctx.socket(zmq.PULL) as sock:
        sock.linger = 0
        sock.rcvtimeo = 60_000  # a producer that died is an error here, not a hang
        if transport == "tcp":
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            endpoint = f"tcp://127.0.0.1:{port}"
        else:
            endpoint = f"ipc://{tmp}/raw.sock"
            sock.bind(endpoint)

        def consume() -> int:
            count = 0
            while count < n:
                for _ in unpack(sock.recv()):
                    count += 1
            return count

        with _spawned(_raw_producer, endpoint, n, ready, done, codec):
            try:
                return _timed_consume(lambda: unpack(sock.recv()), ready.set, consume, n)
            finally:
                done.set()


def bench_local_threads(n: int) -> tuple[float, float]:
    from sage_zmq import EndOfStream, QueueDescriptor

    def run(put: Callable[[Any], None], get: Callable[[], Any], end: Any) -> float:
        def produce() -> None:
            rec = RECORD
            for _ in range(n):
                put(rec)
            put(end)

        t = threading.Thread(target=produce)
        t0 = time.perf_counter()
        t.start()
        count = 0
        while True:
            item = get()
            if item is end or isinstance(item, EndOfStream):
                break
            count += 1
        t.join()
        elapsed = time.perf_counter() - t0
        assert count == n, (count, n)
        return n / elapsed

    q: stdlib_queue.Queue[Any] = stdlib_queue.Queue(maxsize=10000)
    sentinel = object()
    base = run(q.put, q.get, sentinel)
    qd = QueueDescriptor(queue_type="local", metadata={"maxsize": 10000})
    try:
        ours = run(qd.put, qd.get, EndOfStream())
    finally:
        qd.close()
    return ours, base


def _round_trips(send: Callable[[], Any], recv: Callable[[], Any], n: int) -> list[float]:
    """Seconds per send-then-receive, ``n`` of them after 200 unmeasured warm-up ones."""
    perf = time.perf_counter
    samples: list[float] = []
    for i in range(n + 200):
        t0 = perf()
        send()
        recv()
        if i >= 200:
            samples.append(perf() - t0)
    return samples


Pinger = tuple[Callable[[], Any], Callable[[], Any]]
"""(send, receive) of one ping-pong: a round trip is a send, then a receive."""


@contextlib.contextmanager
def sage_pinger() -> Iterator[Pinger]:
    """Round trips through two ``shm`` queues to an echo process."""
    from sage_zmq import EndOfStream, QueueDescriptor

    ping = QueueDescriptor(queue_type="shm", metadata={"maxsize": 100})
    pong = QueueDescriptor(queue_type="shm", metadata={"maxsize": 100})
    msg = {"payload": "x" * 80}
    try:
        with _spawned(_sz_echo, ping, pong, wait=30):
            yield (lambda: ping.put(msg)), (lambda: pong.get(timeout=30))
            ping.put(EndOfStream())
    finally:
        ping.close()
        pong.close()


@contextlib.contextmanager
def raw_pair_pinger(polling: bool = False) -> Iterator[Pinger]:
    """Raw pyzmq PAIR ping-pong over ipc; ``polling``: both sides poll before blocking, as
    sage-zmq consumers do (performance.spin_wait)."""
    import zmq

    msg = b"x" * 100
    with _scratch_dir() as tmp, zmq.Context() as zctx, zctx.socket(zmq.PAIR) as sock:
        sock.linger = 0
        endpoint = f"ipc://{tmp}/pair.sock"
        sock.bind(endpoint)
        echo = _raw_polling_echo if polling else _raw_echo
        with _spawned(echo, endpoint, wait=30):
            recv = (lambda: _recv_polling(sock)) if polling else sock.recv
            yield (lambda: sock.send(msg)), recv
            sock.send(b"stop")


@contextlib.contextmanager
def raw_queues_pinger() -> Iterator[Pinger]:
    """Ping-pong over two one-way DEALER->ROUTER links: the socket layout of two queues."""
    import zmq

    msg = b"x" * 100
    with (
        _scratch_dir() as tmp,
        zmq.Context() as zctx,
        zctx.socket(zmq.ROUTER) as inbox,
        zctx.socket(zmq.DEALER) as outbox,
    ):
        inbox.linger = outbox.linger = 0
        there, back = f"ipc://{tmp}/there.sock", f"ipc://{tmp}/back.sock"
        inbox.bind(back)
        with _spawned(_raw_queue_echo, there, back, wait=30):
            outbox.connect(there)
            yield (lambda: outbox.send(msg)), inbox.recv_multipart
            outbox.send(b"stop")


def alternating_round_trips(
    pingers: dict[str, Callable[[], contextlib.AbstractContextManager[Pinger]]],
    n: int,
    blocks: int = 5,
) -> dict[str, list[float]]:
    """``n`` round trips of each pinger, in ``blocks`` blocks taken in turn, so that a machine
    that drifts (a VM's neighbours) weighs on all alike. Each block opens its pinger afresh
    (nothing of another one runs meanwhile: no idle queue's background thread in the timing
    process) and starts with unmeasured warm-up round trips."""
    samples: dict[str, list[float]] = {name: [] for name in pingers}
    for _ in range(blocks):
        for name, open_ in pingers.items():
            with open_() as (send, recv):
                samples[name] += _round_trips(send, recv, max(1, n // blocks))
    return samples


def bench_hop_work(n: int) -> tuple[float, float]:
    """Seconds of one thread's work per hop (put, then get) with no thread to wake: ``(shm
    queue ends, raw pyzmq)``, both over inproc, where a send hands the message straight to the
    reader. The ``shm`` ends run their own code unchanged (framing, credit, shm staging); only
    the endpoint is inproc, and batching is off so that every put is an idle put.
    """
    import msgpack
    import zmq

    from sage_zmq import QueueDescriptor, _runtime
    from sage_zmq.queues._consumer import Consumer
    from sage_zmq.queues.base import consumer_options, producer_options
    from sage_zmq.queues.shm import ShmDealerLink, ShmInlet, ShmProducer, ShmQueueType
    from sage_zmq.shm.transfer import ShmSender

    msg = {"payload": "x" * 80}
    perf = time.perf_counter

    def best_of(hop: Callable[[], Any]) -> float:
        for _ in range(1000):
            hop()
        best = float("inf")
        for _ in range(5):
            t0 = perf()
            for _ in range(n):
                hop()
            best = min(best, (perf() - t0) / n)
        return best

    qd = QueueDescriptor(queue_type="shm", metadata={"maxsize": 100})
    qtype = ShmQueueType()
    endpoint = f"inproc://bench-hop-{qd.queue_id}"
    inlet = ShmInlet(endpoint, qtype.codec(qd), qtype.socket_options(qd), queue_id=qd.queue_id)
    consumer = Consumer([inlet], **consumer_options(qd))
    threshold, capacity, wait = qtype._shm_settings(qd.metadata)
    sender = ShmSender(threshold=threshold, capacity=capacity, wait=wait, queue_id=qd.queue_id)
    link = ShmDealerLink(
        endpoint, qtype.codec(qd), qtype.socket_options(qd), sender=sender, queue_id=qd.queue_id
    )
    producer = ShmProducer(link, **{**producer_options(qd), "batch_size": 1})
    producer.shm = sender
    put, get = producer.put, consumer.get
    try:
        ours = best_of(lambda: (put(msg), get()))
    finally:
        producer.close(timeout=5)
        consumer.close()

    packb, unpackb = msgpack.packb, msgpack.unpackb
    producer_id = producer.producer_id
    with (
        _runtime.context().socket(zmq.ROUTER) as inbox,
        _runtime.context().socket(zmq.DEALER) as outbox,
    ):
        inbox.linger = outbox.linger = 0
        inbox.bind(f"{endpoint}-raw")
        outbox.connect(f"{endpoint}-raw")

        def raw_hop() -> None:
            outbox.send(packb([producer_id, 0, [msg]]))
            inbox.recv()
            unpackb(inbox.recv())

        raw = best_of(raw_hop)
    return ours, raw


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def percentile_rows(
    name: str,
    ours: list[float],
    competitor: str,
    theirs: list[float],
    *,
    scale: float,
    unit: str,
    p50_target: str = "",
) -> list[Row]:
    """p50 and p99 rows of two latency samples (seconds, shown times ``scale``); ``name`` has
    a ``{}`` for "p50"/"p99"."""
    return [
        result_row(
            name.format(label),
            _pct(ours, q) * scale,
            unit,
            competitor,
            _pct(theirs, q) * scale,
            higher_is_better=False,
            target=p50_target if label == "p50" else "",
        )
        for label, q in (("p50", 0.5), ("p99", 0.99))
    ]


def best_of_alternating(
    runs: dict[str, Callable[[], float]], rounds: int, progress: Callable[[str], None]
) -> dict[str, float]:
    """The best figure of each run over ``rounds`` rounds, the runs taking turns in each.

    On a shared machine a single run of each, one after the other, mostly measures which one
    the noise hit; taking turns exposes every competitor to the same spells, and the best of
    several keeps what each can do (as ``timeit`` reports its minimum).
    """
    best: dict[str, float] = {}
    for r in range(rounds):
        for name, run in runs.items():
            progress(f"{name} (round {r + 1} of {rounds})")
            value = run()
            best[name] = max(best.get(name, value), value)
    return best


def run_core(quick: bool, progress: Callable[[str], None]) -> list[Row]:
    n = 100_000 if quick else 1_000_000
    rounds = 1 if quick else 3
    rows: list[Row] = []
    rates = best_of_alternating(
        {
            "raw pyzmq ipc, hand-batched": lambda: bench_raw_pyzmq("ipc", n),
            "sage-zmq shm": lambda: bench_sage_cross_process("shm", n),
            "raw pyzmq tcp, hand-batched": lambda: bench_raw_pyzmq("tcp", n),
            "sage-zmq tcp": lambda: bench_sage_cross_process("tcp", n),
            "multiprocessing.Queue": lambda: bench_mp_queue(n // 5),
            "raw pyzmq ipc, hand-batched, ormsgpack": lambda: bench_raw_pyzmq(
                "ipc", n, "ormsgpack"
            ),
        },
        rounds,
        progress,
    )
    raw_ipc, raw_tcp = rates["raw pyzmq ipc, hand-batched"], rates["raw pyzmq tcp, hand-batched"]
    mpq = rates["multiprocessing.Queue"]
    for qtype, raw, label in (("shm", raw_ipc, "ipc"), ("tcp", raw_tcp, "tcp")):
        ours = rates[f"sage-zmq {qtype}"]
        rows.append(
            result_row(
                f"{qtype} records/s (cross-process, per-record put/get)",
                ours,
                "records/s",
                f"raw pyzmq PUSH/PULL {label}, 100 per msgpack frame",
                raw,
                target=">= 1x",
            )
        )
        rows.append(
            result_row(
                f"{qtype} records/s vs multiprocessing.Queue",
                ours,
                "records/s",
                "multiprocessing.Queue",
                mpq,
                target="~10-15x",
            )
        )
    # sage-zmq packs plain records with ormsgpack (faster than msgpack-python): next to the
    # issue's competitor, the same hand-rolled loop with that codec, for a fair view.
    rows.append(
        result_row(
            "shm records/s (cross-process, per-record put/get)",
            rates["sage-zmq shm"],
            "records/s",
            "raw pyzmq PUSH/PULL ipc, 100 per ormsgpack frame",
            rates["raw pyzmq ipc, hand-batched, ormsgpack"],
        )
    )
    progress("local vs queue.Queue")
    local, qq = bench_local_threads(n)
    rows.append(
        result_row(
            "local records/s (two threads, per-item)",
            local,
            "items/s",
            "queue.Queue",
            qq,
            target=">= 3x",
        )
    )
    progress("idle round trip latency")
    m = 2000 if quick else 10000
    lat = alternating_round_trips(
        {
            "ours": sage_pinger,
            "raw": raw_pair_pinger,
            "raw queues": raw_queues_pinger,
            "raw polling": lambda: raw_pair_pinger(polling=True),
        },
        m,
    )
    ours_lat, raw_lat = lat["ours"], lat["raw"]
    rows += percentile_rows(
        "shm idle round trip {}",
        ours_lat,
        "raw pyzmq PAIR ipc ping-pong",
        raw_lat,
        scale=1e6,
        unit="us",
        p50_target="p50 <= 1.2x raw",
    )
    # The same sockets as two queues (one one-way link each way): what the layout costs. And
    # since sage-zmq consumers poll briefly before they sleep (performance.spin_wait), next to
    # the competitor, which sleeps in recv, the same ping-pong with that polling.
    for key, competitor in (
        ("raw queues", "raw pyzmq ping-pong over two DEALER->ROUTER ipc links"),
        ("raw polling", "raw pyzmq PAIR ipc ping-pong, polling 200 us before blocking"),
    ):
        rows.append(
            result_row(
                "shm idle round trip p50",
                _pct(ours_lat, 0.5) * 1e6,
                "us",
                competitor,
                _pct(lat[key], 0.5) * 1e6,
                higher_is_better=False,
            )
        )
    # What a round trip's hops cost in CPU alone, without the wake-ups (docs/architecture.md).
    progress("work per idle hop")
    hop_ours, hop_raw = bench_hop_work(20_000 if quick else 100_000)
    rows.append(
        result_row(
            "work per idle hop (put + get, one thread, inproc)",
            hop_ours * 1e6,
            "us",
            "raw pyzmq send + recv + msgpack",
            hop_raw * 1e6,
            higher_is_better=False,
        )
    )
    return rows


_TAKES_PROGRESS = {"core", "shm"}  # sections whose run reports its steps (rounds of turns)

SECTIONS: dict[str, str] = {
    "core": "sage_zmq.bench:run_core",
    "routing": "sage_zmq.bench_routing:run",
    "shm": "sage_zmq.bench_shm:run",
    "sage": "sage_zmq.bench_sage:run",
    "pipeline": "sage_zmq.bench_pipeline:run",
    "ray": "sage_zmq.bench_ray:run",
}


def _load(target: str) -> Callable[..., list[Row]]:
    import importlib

    module_name, func = target.split(":")
    module = importlib.import_module(module_name)
    fn: Callable[..., list[Row]] = getattr(module, func)
    return fn


def _format(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        value = f"{r['value']:,.1f} {r['unit']}"
        comp = ""
        if r.get("competitor"):
            base = r.get("competitor_value")
            base_txt = f"{base:,.1f} {r['unit']}" if isinstance(base, int | float) else ""
            ratio = r.get("ratio")
            ratio_txt = f" -> {ratio:.2f}x" if isinstance(ratio, int | float) else ""
            comp = f"   vs {r['competitor']}: {base_txt}{ratio_txt}"
            if r.get("target"):
                comp += f"   (target {r['target']})"
        lines.append(f"  {r['name']}: {value}{comp}")
    return "\n".join(lines)


def _plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        from sage_zmq.errors import MissingDependency

        raise MissingDependency("--plot needs matplotlib: pip install 'sage-zmq[plot]'") from None
    import textwrap

    rated = [r for r in rows if isinstance(r.get("ratio"), int | float) and r["ratio"] > 0]

    def label(r: Row) -> str:
        name, comp = str(r["name"]), r.get("competitor")
        # Some rows already name their competitor ("... vs multiprocessing.Queue").
        text = f"{name} vs {comp}" if comp and str(comp) not in name else name
        # Long labels wrapped: on one line the longest pushed the others off the figure.
        return "\n".join(textwrap.wrap(text, 48)) or name

    names = [label(r) for r in rated]
    ratios = [float(r["ratio"]) for r in rated]
    lines = sum(n.count("\n") + 1 for n in names)
    fig, ax = plt.subplots(figsize=(10, 0.25 * lines + 0.3 * len(rated) + 1.6))
    lo = min([*ratios, 1.0]) / 2
    hi = max([*ratios, 1.0]) * 2
    # Bars start at the left edge of the axis: on a log scale there is no zero to start from.
    ax.barh(names, [r - lo for r in ratios], left=lo, color="tab:blue")
    for y, x in enumerate(ratios):
        ax.text(x, y, f" {x:.2f}x", va="center", fontsize=7)
    ax.set_xscale("log")  # ratios span 0.1x to 2000x: a linear axis hides all but one
    ax.set_xlim(lo, hi * 1.5)  # room for the value written after the longest bar
    # Labels on the decades only: matplotlib labels minor ticks too when the range is under
    # two decades, and those labels ran into each other.
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel(
        "ratio vs competitor, same run (log scale)\n"
        "direction and target of each row: see the text output"
    )
    ax.set_title("sage-zmq benchmark")
    fig.tight_layout()
    # bbox_inches="tight": the figure grows to hold every label instead of cutting them off.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sage-zmq bench",
        description="Benchmarks against the competitors, measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="short run (~1 minute)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--plot", metavar="FILE.png", help="write a chart of the ratios")
    parser.add_argument("--ray", action="store_true", help="also run the Ray section")
    parser.add_argument(
        "--only",
        metavar="SECTION",
        action="append",
        choices=sorted(SECTIONS),
        help="run only these sections (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.plot:  # checked before minutes of measuring
        where = os.path.dirname(os.path.abspath(args.plot))
        if os.path.isdir(args.plot) or not os.access(where, os.W_OK):
            parser.error(
                f"--plot {args.plot}: cannot write a file there (is {where} a writable directory?)"
            )
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'sage-zmq[plot]'")
    sections = args.only or [s for s in SECTIONS if s != "ray" or args.ray]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    }
    all_rows: list[Row] = []
    out = sys.stderr

    def progress(step: str) -> None:
        if not args.json:
            print(f"  ... {step}", file=out, flush=True)

    for i, section in enumerate(sections, 1):
        if not args.json:
            print(f"[{i}/{len(sections)}] {section}", file=out, flush=True)
        try:
            fn = _load(SECTIONS[section])
        except ImportError as exc:
            results[section] = {"skipped": str(exc)}
            progress(f"skipped: {exc}")
            continue
        rows = fn(args.quick, progress) if section in _TAKES_PROGRESS else fn(args.quick)
        results[section] = rows
        all_rows.extend(rows)
        if not args.json:
            print(_format(rows), flush=True)
    if args.json:
        print(json.dumps(results, indent=2, default=float), flush=True)
    if args.plot:
        _plot(all_rows, args.plot)
        if not args.json:
            print(f"chart written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
