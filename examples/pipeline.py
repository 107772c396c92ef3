"""A multi-process keyed pipeline that ends by end of stream.

    source-0 ┐            ┌ counter-0 ┐
             ├── hash ────┼ counter-1 ┼── round robin ──> sink (this process)
    source-1 ┘            └ counter-2 ┘

Two source processes hash-route clicks by user to three counter processes (``shm`` queues).
Each counter's input queue has ``upstreams=2``: it sees end of stream only after both sources
sent theirs. Each counter then emits its per-user totals and ends its own stream; the sink's
queue has ``upstreams=3``. Every process is started with ``spawn``.

Run: python examples/pipeline.py
"""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter

from sage_zmq import Connection, EndOfStream, Packet, QueueDescriptor
from sage_zmq.router import HashRouter, RoundRobinRouter

SOURCES, COUNTERS, USERS, PER_SOURCE = 2, 3, 50, 5000


def clicks(source: int) -> list[str]:
    """The users clicking in one source's stream (deterministic, so the sink can check)."""
    return [f"user-{(source * 31 + i * 7) % USERS}" for i in range(PER_SOURCE)]


def source(index: int, counters: list[QueueDescriptor]) -> None:
    router = HashRouter()
    for i, qd in enumerate(counters):
        router.add_connection(Connection(0, i, "counter", qd))
    for user in clicks(index):
        router.route(Packet({"source": index}, partition_key=user))
    router.send_stop_signal()
    router.close()
    for qd in counters:
        qd.close()


def counter(index: int, inbox: QueueDescriptor, sink: QueueDescriptor) -> None:
    counts: Counter[str] = Counter()
    while True:
        item = inbox.get(timeout=60)
        if isinstance(item, EndOfStream):  # both sources have ended
            break
        counts[item.partition_key] += 1
    router = RoundRobinRouter()
    router.add_connection(Connection(0, 0, "sink", sink))
    for user, n in sorted(counts.items()):
        router.route(Packet({"user": user, "clicks": n, "counter": index}))
    router.send_stop_signal()
    router.close()
    sink.close()
    inbox.close()


def main() -> None:
    ctx = mp.get_context("spawn")
    sink = QueueDescriptor(queue_type="shm", upstreams=COUNTERS)
    inboxes = [QueueDescriptor(queue_type="shm", upstreams=SOURCES) for _ in range(COUNTERS)]
    procs = [
        ctx.Process(target=counter, args=(i, qd, sink), name=f"counter-{i}")
        for i, qd in enumerate(inboxes)
    ]
    procs += [
        ctx.Process(target=source, args=(i, inboxes), name=f"source-{i}") for i in range(SOURCES)
    ]
    for p in procs:
        p.start()
    totals: dict[str, int] = {}
    owner: dict[str, int] = {}
    try:
        while True:
            item = sink.get(timeout=60)
            if isinstance(item, EndOfStream):  # every counter has ended
                break
            row = item.payload
            if row["user"] in totals:
                raise SystemExit(f"pipeline: {row['user']} counted by two counters")
            totals[row["user"]] = row["clicks"]
            owner[row["user"]] = row["counter"]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        sink.close()
    expected = Counter(u for s in range(SOURCES) for u in clicks(s))
    bad = [p.name for p in procs if p.exitcode != 0]
    if totals != dict(expected) or bad:
        raise SystemExit(f"pipeline: wrong totals or failed processes {bad}")
    per_counter = Counter(owner.values())
    print(
        f"pipeline: {SOURCES} sources -> {COUNTERS} keyed counters -> sink: "
        f"{sum(totals.values())} clicks, {len(totals)} users "
        f"(users per counter {[per_counter[i] for i in range(COUNTERS)]}), all counts correct"
    )


if __name__ == "__main__":
    main()
