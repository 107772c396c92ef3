"""Point to point: one producer, one consumer in another process, over an ``shm`` queue.

Run: python examples/point_to_point.py
"""

from __future__ import annotations

import multiprocessing as mp

from sage_zmq import Connection, EndOfStream, Packet, QueueDescriptor
from sage_zmq.router import RoundRobinRouter

N = 1000


def consumer(inbox: QueueDescriptor, results: QueueDescriptor) -> None:
    """Sum the payloads until end of stream, then report the sum."""
    total = count = 0
    while True:
        item = inbox.get(timeout=30)
        if isinstance(item, EndOfStream):
            break
        total += item.payload
        count += 1
    results.put({"count": count, "sum": total})
    results.close()
    inbox.close()


def main() -> None:
    inbox = QueueDescriptor(queue_type="shm")
    results = QueueDescriptor(queue_type="shm")
    proc = mp.get_context("spawn").Process(target=consumer, args=(inbox, results))
    proc.start()
    try:
        router = RoundRobinRouter()
        router.add_connection(Connection(0, 0, "consumer", inbox))
        for i in range(N):
            router.route(Packet(i))
        router.send_stop_signal()
        router.close()
        report = results.get(timeout=30)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        inbox.close()
        results.close()
    expected = {"count": N, "sum": N * (N - 1) // 2}
    if report != expected or proc.exitcode != 0:
        raise SystemExit(f"point_to_point: got {report}, expected {expected}")
    print(f"point_to_point: {report['count']} records, sum {report['sum']} (ok)")


if __name__ == "__main__":
    main()
