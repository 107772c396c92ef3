"""A pipeline whose operators are Ray actors: source -> 2 parallel keyed workers -> sink.

Ray places the actors; the records travel through ``ray`` queues (ZeroMQ tcp between the
actors' processes). The source sends each record to the worker that owns its key
(``instance_for_key``: the same owner in every process and run), the workers count per key and
forward, and the sink's queue has ``upstreams=2`` so it ends only after both workers ended.

Run: python examples/ray_pipeline.py   (a new local Ray instance; RAY_ADDRESS=... for a cluster)
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import ray

from sage_zmq import EndOfStream, Packet, QueueDescriptor
from sage_zmq.queues.ray import consume_here
from sage_zmq.router.keys import instance_for_key

WORKERS = 2
KEYS = [f"user-{i}" for i in range(50)]


@ray.remote(num_cpus=0)
class Source:
    def __init__(self, outputs: list[QueueDescriptor]) -> None:
        self.outputs = outputs

    def run(self, n: int) -> int:
        for i in range(n):
            key = KEYS[i * 7 % len(KEYS)]
            target = self.outputs[instance_for_key(key, len(self.outputs))]
            target.put(Packet({"n": i}, partition_key=key))
        for qd in self.outputs:
            qd.put(EndOfStream())
            qd.close()
        return n


@ray.remote(num_cpus=0)
class Worker:
    def __init__(self, index: int, inbox: QueueDescriptor, output: QueueDescriptor) -> None:
        self.index, self.inbox, self.output = index, inbox, output
        consume_here(inbox)  # bind and publish now, so the source finds us at once

    def run(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for packet in self.inbox:  # until the source's end of stream
            counts[packet.partition_key] += 1
            payload = dict(packet.payload, worker=self.index, seen=counts[packet.partition_key])
            self.output.put(packet.copy_with(payload=payload))
        self.output.put(EndOfStream())
        self.output.close()
        self.inbox.close()
        return dict(counts)


@ray.remote(num_cpus=0)
class Sink:
    def __init__(self, inbox: QueueDescriptor) -> None:
        self.inbox = inbox
        consume_here(inbox)

    def run(self) -> dict[str, Any]:
        owners: dict[str, set[int]] = {}
        numbers: list[int] = []
        for packet in self.inbox:  # ends after both workers ended
            owners.setdefault(packet.partition_key, set()).add(packet.payload["worker"])
            numbers.append(packet.payload["n"])
        self.inbox.close()
        return {"owners": owners, "numbers": numbers}


def run_pipeline(n: int = 20_000) -> dict[str, Any]:
    """Run the pipeline on the connected Ray cluster; returns what the sink saw and the rate."""
    inboxes = [QueueDescriptor(queue_type="ray", metadata={"maxsize": 2000}) for _ in range(2)]
    results = QueueDescriptor(queue_type="ray", metadata={"maxsize": 2000, "upstreams": WORKERS})
    sink = Sink.remote(results)
    workers = [Worker.remote(i, inboxes[i], results) for i in range(WORKERS)]
    source = Source.remote(inboxes)
    ray.get([sink.__ray_ready__.remote(), *(w.__ray_ready__.remote() for w in workers)])
    started = time.perf_counter()
    done = sink.run.remote()
    counted = [w.run.remote() for w in workers]
    sent = ray.get(source.run.remote(n))
    seen = ray.get(done)
    elapsed = time.perf_counter() - started
    per_worker = ray.get(counted)
    for actor in (source, sink, *workers):
        ray.kill(actor)
    return {
        "sent": sent,
        "received": len(seen["numbers"]),
        "numbers": seen["numbers"],
        "owners": seen["owners"],
        "per_worker": per_worker,
        "seconds": elapsed,
        "rate": len(seen["numbers"]) / elapsed if elapsed > 0 else 0.0,
    }


def check(result: dict[str, Any]) -> None:
    """Every record arrived once, and every key was handled by exactly its owner."""
    if sorted(result["numbers"]) != list(range(result["sent"])):
        raise SystemExit(f"ray_pipeline: {result['received']} of {result['sent']} arrived")
    for key, owners in result["owners"].items():
        if owners != {instance_for_key(key, WORKERS)}:
            raise SystemExit(f"ray_pipeline: key {key} went to workers {sorted(owners)}")


def main() -> None:
    started_here = not ray.is_initialized()
    if started_here:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:  # "local": never a stale address that a test cluster left in /tmp/ray
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_pipeline()
        check(result)
        split = [sum(c.values()) for c in result["per_worker"]]
        print(
            f"ray_pipeline: {result['received']} records, source -> {WORKERS} keyed workers "
            f"{split} -> sink in {result['seconds']:.2f} s ({result['rate']:,.0f} records/s), "
            "every key on its owner (ok)"
        )
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
