"""Load balance: one deliberately slow consumer gets less work; the stream finishes sooner.

Three instances (threads on ``local`` queues) take 1 ms per record, one takes 10 ms. The same
stream goes through round robin and through load_balance, which routes each packet to the
instance with the least live load (records not yet reported consumed by the receiver).

Run: python examples/load_balance.py
"""

from __future__ import annotations

import threading
import time

from sage_zmq import Connection, EndOfStream, Packet, QueueDescriptor
from sage_zmq.router import BaseRouter, LoadBalanceRouter, RoundRobinRouter

N = 300
SERVICE = [0.001, 0.010, 0.001, 0.001]  # seconds per record; instance 1 is the slow one


def worker(inbox: QueueDescriptor, service: float, counts: list[int], i: int) -> None:
    while True:
        item = inbox.get(timeout=30)
        if isinstance(item, EndOfStream):
            return
        time.sleep(service)
        counts[i] += 1


def run(router: BaseRouter) -> tuple[float, list[int]]:
    # Small queues (and so frequent credit reports) keep the live load fresh.
    inboxes = [QueueDescriptor(queue_type="local", maxsize=16, batch_size=4) for _ in SERVICE]
    counts = [0] * len(SERVICE)
    threads = [
        threading.Thread(target=worker, args=(qd, s, counts, i))
        for i, (qd, s) in enumerate(zip(inboxes, SERVICE, strict=True))
    ]
    for t in threads:
        t.start()
    for i, qd in enumerate(inboxes):
        router.add_connection(Connection(0, i, "worker", qd))
    start = time.perf_counter()
    for n in range(N):
        router.route(Packet(n))
    router.send_stop_signal()
    router.close()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - start
    for qd in inboxes:
        qd.close()
    return elapsed, counts


def main() -> None:
    rr_time, rr_counts = run(RoundRobinRouter())
    lb_time, lb_counts = run(LoadBalanceRouter())
    print(f"round_robin:  {rr_time:.2f} s, records per instance {rr_counts}")
    print(f"load_balance: {lb_time:.2f} s, records per instance {lb_counts}")
    if sum(lb_counts) != N or lb_counts[1] >= min(c for i, c in enumerate(lb_counts) if i != 1):
        raise SystemExit("load_balance: the slow instance was not given less work")
    print(f"load_balance: slow instance got {lb_counts[1]} of {N}, {rr_time / lb_time:.1f}x faster")


if __name__ == "__main__":
    main()
