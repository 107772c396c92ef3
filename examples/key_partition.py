"""Key partition: records with the same key always reach the same instance (hash routing).

Four counting instances (threads, ``local`` queues) each keep counts for the keys they own;
no key is counted by two instances, and the owner of a key is the same in every process and
run (``sage_zmq.router.keys.instance_for_key``; see docs/partitioning.md).

Run: python examples/key_partition.py
"""

from __future__ import annotations

import threading
from collections import Counter

from sage_zmq import Connection, EndOfStream, Packet, QueueDescriptor
from sage_zmq.router import HashRouter
from sage_zmq.router.keys import instance_for_key

USERS = [f"user-{i}" for i in range(40)]
N = 2000


def counter(inbox: QueueDescriptor, counts: Counter[str]) -> None:
    while True:
        item = inbox.get(timeout=30)
        if isinstance(item, EndOfStream):
            return
        counts[item.partition_key] += 1


def main() -> None:
    inboxes = [QueueDescriptor(queue_type="local") for _ in range(4)]
    counts: list[Counter[str]] = [Counter() for _ in inboxes]
    threads = [
        threading.Thread(target=counter, args=(qd, c))
        for qd, c in zip(inboxes, counts, strict=True)
    ]
    for t in threads:
        t.start()
    router = HashRouter()
    for i, qd in enumerate(inboxes):
        router.add_connection(Connection(0, i, "counter", qd))
    for n in range(N):
        user = USERS[n * 7 % len(USERS)]
        router.route(Packet({"click": n}, partition_key=user))
    router.send_stop_signal()
    router.close()
    for t in threads:
        t.join(30)
    for qd in inboxes:
        qd.close()
    owners = {key: [i for i, c in enumerate(counts) if key in c] for key in USERS}
    ok = all(o == [instance_for_key(k, len(inboxes))] for k, o in owners.items())
    ok = ok and sum(sum(c.values()) for c in counts) == N
    if not ok:
        raise SystemExit(f"key_partition: keys split across instances: {owners}")
    spread = [len(c) for c in counts]
    print(f"key_partition: {len(USERS)} keys over 4 instances {spread}, each key on one (ok)")


if __name__ == "__main__":
    main()
