"""Broadcast: every record to every instance of a group (here three threads, ``local`` queues).

Each instance gets its own copy of the packet, so one instance changing it affects no other.

Run: python examples/broadcast.py
"""

from __future__ import annotations

import threading

from sage_zmq import Connection, EndOfStream, Packet, QueueDescriptor
from sage_zmq.router import BroadcastRouter

N = 100


def instance(inbox: QueueDescriptor, got: list[int]) -> None:
    while True:
        item = inbox.get(timeout=30)
        if isinstance(item, EndOfStream):
            return
        item.payload["seen_by"] = threading.current_thread().name  # a private copy
        got.append(item.payload["n"])


def main() -> None:
    inboxes = [QueueDescriptor(queue_type="local") for _ in range(3)]
    results: list[list[int]] = [[] for _ in inboxes]
    threads = [
        threading.Thread(target=instance, args=(qd, got), name=f"instance-{i}")
        for i, (qd, got) in enumerate(zip(inboxes, results, strict=True))
    ]
    for t in threads:
        t.start()
    router = BroadcastRouter()
    for i, qd in enumerate(inboxes):
        router.add_connection(Connection(0, i, "listener", qd))
    for n in range(N):
        router.route(Packet({"n": n}))
    router.send_stop_signal()
    router.close()
    for t in threads:
        t.join(30)
    for qd in inboxes:
        qd.close()
    if any(got != list(range(N)) for got in results):
        raise SystemExit(f"broadcast: instances got {[len(g) for g in results]} records")
    print(f"broadcast: each of {len(inboxes)} instances got all {N} records (ok)")


if __name__ == "__main__":
    main()
