"""A Python pipeline fed by a Node.js producer: ``python examples/heterogeneous/run.py``.

The Python process owns the queue (it binds a tcp port), starts ``producer.mjs`` with the
queue's endpoint, and runs a small keyed pipeline over what arrives: readings are hash-routed
by sensor id to 3 workers, each keeping per-sensor averages. Node computed the same partition
for every key (MurmurHash3, PROTOCOL.md section 8) and says so in a header; we check it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from sage_zmq import Empty, EndOfStream, Packet, QueueDescriptor
from sage_zmq.router.keys import instance_for_key

HERE = Path(__file__).resolve().parent
NODE_PEER = HERE.parent.parent / "transports" / "node"
WORKERS = 3
COUNT = 2000
MAXSIZE = 200


class Worker:
    """One parallel instance of the keyed stage: running mean per sensor."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def process(self, packet: Packet) -> None:
        reading = packet.payload
        self.sums[reading["sensor"]] += reading["value"]
        self.counts[reading["sensor"]] += 1


def main() -> int:
    node = shutil.which("node")
    if node is None:
        print("node is not on PATH: install Node.js >= 18", file=sys.stderr)
        return 1
    if not (NODE_PEER / "node_modules").is_dir():
        print(f"run `npm ci` in {NODE_PEER} first", file=sys.stderr)
        return 1

    qd = QueueDescriptor(
        queue_id="readings", queue_type="tcp", metadata={"maxsize": MAXSIZE, "upstreams": 1}
    )
    producer = subprocess.Popen(
        [node, str(HERE / "producer.mjs"), str(qd.endpoint), str(COUNT), str(MAXSIZE)]
    )
    workers = [Worker(i) for i in range(WORKERS)]
    disagreements = 0
    try:
        while True:
            item = qd.get(timeout=30)
            if isinstance(item, EndOfStream):
                break
            index = instance_for_key(item.partition_key, WORKERS)
            disagreements += index != item.headers["node_worker"]
            workers[index].process(item)
        # The producer's CLOSE is answered inside get(): keep reading until it has its receipt.
        deadline = time.monotonic() + 30
        while producer.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(Empty):
                qd.get(timeout=0)  # returns at once: end of stream is sticky
            with contextlib.suppress(subprocess.TimeoutExpired):
                producer.wait(timeout=0.05)
    finally:
        if producer.poll() is None:
            producer.kill()
        code = producer.wait(timeout=30)
        qd.close()

    for w in workers:
        sensors = ", ".join(
            f"{s}={w.sums[s] / w.counts[s]:.2f}" for s in sorted(w.sums, key=lambda s: int(s[7:]))
        )
        print(f"worker {w.index}: {sum(w.counts.values())} readings; means {sensors}")
    total = sum(sum(w.counts.values()) for w in workers)
    print(f"{total} readings from Node; partition disagreements: {disagreements}")
    return 0 if code == 0 and total == COUNT and disagreements == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
