"""``sage-zmq bench --ray``: the ``ray`` queue against Ray's own tools, in the same run.

* Records between two Ray actors: a ``ray`` queue (per-record ``put``/``get``) vs
  ``ray.util.queue.Queue`` per item and batched (100 records per item).
* Round-trip latency between two actors through two ``ray`` queues vs a plain actor method
  call round trip (``ray.get(actor.echo.remote(x))`` from another actor), p50 and p99,
  measured in alternating blocks.

Rates are timed from the producer's start to the consumer's end (wall clock, one host).
"""

from __future__ import annotations

import time
from typing import Any

from sage_zmq.bench import result_row
from sage_zmq.errors import MissingDependency

__all__ = ["run"]


def _record(i: int) -> dict[str, Any]:
    return {"id": i, "user": f"u-{i % 97}", "value": i * 0.5}


def _actors(ray: Any) -> tuple[Any, Any]:
    from sage_zmq import EndOfStream, QueueDescriptor
    from sage_zmq.queues.ray import consume_here

    @ray.remote(num_cpus=0)
    class Side:
        """One end of every measurement; two of them run on the same node."""

        def ready(self) -> bool:
            return True

        # -------------------------------------------------------------- sage-zmq ray queue
        def bind(self, qd: QueueDescriptor) -> bool:
            consume_here(qd)
            return True

        def produce(self, qd: QueueDescriptor, n: int) -> float:
            start = time.time()
            put = qd.put
            for i in range(n):
                put(_record(i))
            qd.put(EndOfStream())
            qd.close()
            return start

        def consume(self, qd: QueueDescriptor) -> tuple[float, int]:
            count = 0
            for _ in qd:
                count += 1
            end = time.time()
            qd.close()
            return end, count

        # ---------------------------------------------------------------- ray.util.queue
        def rq_produce(self, q: Any, n: int, per_item: int) -> float:
            start = time.time()
            if per_item == 1:
                for i in range(n):
                    q.put(_record(i))
            else:
                for base in range(0, n, per_item):
                    q.put([_record(i) for i in range(base, min(n, base + per_item))])
            return start

        def rq_consume(self, q: Any, n: int, per_item: int) -> tuple[float, int]:
            count = 0
            while count < n:
                item = q.get()
                count += 1 if per_item == 1 else len(item)
            return time.time(), count

        # --------------------------------------------------------------------- latency
        def echo_loop(self, inbox: QueueDescriptor, outbox: QueueDescriptor) -> int:
            count = 0
            for item in inbox:
                outbox.put(item)
                count += 1
            outbox.close()
            inbox.close()
            return count

        def ping(
            self, outbox: QueueDescriptor, inbox: QueueDescriptor, n: int, last: bool
        ) -> list[float]:
            consume_here(inbox)  # once: later calls find this process's consumer
            lat: list[float] = []
            for i in range(n):
                t = time.perf_counter()
                outbox.put(i)
                inbox.get()
                lat.append(time.perf_counter() - t)
            if last:
                outbox.put(EndOfStream())
                outbox.close()
                inbox.close()
            return lat

        def echo(self, x: Any) -> Any:
            return x

        def call_rtt(self, other: Any, n: int) -> list[float]:
            lat: list[float] = []
            for i in range(n):
                t = time.perf_counter()
                ray.get(other.echo.remote(i))
                lat.append(time.perf_counter() - t)
            return lat

    return Side, QueueDescriptor


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _ours(ray: Any, side: Any, qd_cls: Any, a: Any, b: Any, n: int) -> float:
    qd = qd_cls(queue_type="ray", metadata={"maxsize": 10_000})
    ray.get(b.bind.remote(qd))
    done = b.consume.remote(qd)
    start = ray.get(a.produce.remote(qd, n))
    end, count = ray.get(done)
    if count != n:
        raise RuntimeError(f"bench_ray: {count} of {n} records arrived")
    return n / (end - start)


def _theirs(ray: Any, a: Any, b: Any, n: int, per_item: int) -> float:
    from ray.util.queue import Queue

    q = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    try:
        done = b.rq_consume.remote(q, n, per_item)
        start = ray.get(a.rq_produce.remote(q, n, per_item))
        end, count = ray.get(done)
    finally:
        q.shutdown()
    return count / (end - start)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Result rows (see :func:`sage_zmq.bench.result_row`): ratios above 1 favour sage-zmq."""
    try:
        import ray
    except ImportError:
        raise MissingDependency(
            "bench --ray needs Ray, which is not installed here: pip install sage-zmq[ray]"
        ) from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    n_ours = 50_000 if quick else 300_000
    n_item = 300 if quick else 2_000
    n_batched = 10_000 if quick else 50_000
    pings = 300 if quick else 3_000
    side, qd_cls = _actors(ray)
    a, b, c = side.remote(), side.remote(), side.remote()
    try:
        ray.get([a.ready.remote(), b.ready.remote(), c.ready.remote()])
        _ours(ray, side, qd_cls, a, b, 2_000)  # warm-up: imports, first connection
        ours = _ours(ray, side, qd_cls, a, b, n_ours)
        per_item = _theirs(ray, a, b, n_item, 1)
        batched = _theirs(ray, a, b, n_batched, 100)

        q1 = qd_cls(queue_type="ray", metadata={"maxsize": 1000})
        q2 = qd_cls(queue_type="ray", metadata={"maxsize": 1000})
        ray.get(b.bind.remote(q1))
        echo = b.echo_loop.remote(q1, q2)
        # Alternate blocks of the two, so that a machine that drifts (a VM's neighbours)
        # weighs on both alike; the first 50 of each are warm-up.
        lat = ray.get(a.ping.remote(q1, q2, 50, False))[50:]
        call = ray.get(a.call_rtt.remote(c, 50))[50:]
        blocks = 6
        for k in range(blocks):
            lat += ray.get(a.ping.remote(q1, q2, pings // blocks, k == blocks - 1))
            call += ray.get(a.call_rtt.remote(c, pings // blocks))
        ray.get(echo)
    finally:
        for actor in (a, b, c):
            ray.kill(actor)
        if started_here:
            ray.shutdown()
    p50, p99 = _pct(lat, 0.5) * 1e6, _pct(lat, 0.99) * 1e6
    c50, c99 = _pct(call, 0.5) * 1e6, _pct(call, 0.99) * 1e6
    ours_name = "ray queue, actor->actor, per-record put/get"
    return [
        result_row(
            ours_name, ours, "records/s", "ray.util.queue per item", per_item, target=">= 100x"
        ),
        result_row(
            ours_name,
            ours,
            "records/s",
            "ray.util.queue batched (100 records/item)",
            batched,
            target=">= 5x",
        ),
        result_row(
            "round trip through two ray queues, p50",
            p50,
            "us",
            "actor method call round trip p50",
            c50,
            higher_is_better=False,
            target=">= 5x (p50 <= 0.2x the actor call)",
        ),
        result_row(
            "round trip through two ray queues, p99",
            p99,
            "us",
            "actor method call round trip p99",
            c99,
            higher_is_better=False,
        ),
    ]


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        ratio = "" if row["ratio"] is None else f"  {row['ratio']:.3g}x {row['competitor']}"
        print(f"{row['name']:<48} {row['value']:>14,.1f} {row['unit']}{ratio}")
