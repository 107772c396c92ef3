"""Routing benchmark (the ``routing`` section of ``sage-zmq bench``).

:func:`run` returns rows like :mod:`sage_zmq.bench`'s: ``name``, ``value``, ``unit``,
``competitor`` (what the value is compared with), ``competitor_value``, ``ratio`` (higher is
better) and ``target``. Targets (issue 3), checked by :func:`missed`:

* ``route hash overhead`` <= 2000 ns/packet: hash routing on top of the put it wraps (the put
  alone into a local queue is measured in the same run and subtracted);
* ``skew load_balance completion``: one instance of four 10x slower; total completion time,
  ratio = round_robin / load_balance >= 2; ``skew predictive completion`` compares the
  predictive load tracker with routing on the instantaneous depth (ratio > 1: prediction wins);
* ``hash key spread max deviation`` <= 5 %: 100k distinct keys over 7 instances.

Everything runs in this process on ``local`` queues (consumers are threads that sleep for their
service time, so they do not compete for the GIL).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sage_zmq.bench import result_row
from sage_zmq.descriptor import QueueDescriptor
from sage_zmq.errors import Empty
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.router.connection import Connection
from sage_zmq.router.router import BaseRouter, LoadBalanceRouter, make_router
from sage_zmq.router.strategies import STRATEGY_NAMES, HashStrategy

__all__ = ["TARGETS", "missed", "run"]

Row = dict[str, Any]

# name -> (field, op, bound): the row's ``value`` or ``ratio`` must satisfy ``op bound``.
TARGETS: dict[str, tuple[str, str, float]] = {
    "route hash overhead": ("value", "<=", 2000.0),
    "skew load_balance completion": ("ratio", ">=", 2.0),
    "hash key spread max deviation": ("value", "<=", 5.0),
}


def _row(
    name: str,
    value: float,
    unit: str,
    competitor: str = "",
    base: float | None = None,
    *,
    higher_is_better: bool = True,
) -> Row:
    target = ""
    if name in TARGETS:
        field, op, bound = TARGETS[name]
        target = f"{field} {op} {bound:g}"
    return result_row(
        name, value, unit, competitor, base, higher_is_better=higher_is_better, target=target
    )


def missed(rows: list[Row]) -> list[str]:
    """The rows that miss their target in :data:`TARGETS`, as messages."""
    out = []
    for row in rows:
        if row["name"] not in TARGETS:
            continue
        field, op, bound = TARGETS[row["name"]]
        got = row[field]
        ok = got is not None and (got <= bound if op == "<=" else got >= bound)
        if not ok:
            out.append(f"{row['name']}: {field} = {got!r}, target {op} {bound:g}")
    return out


def run(quick: bool = False) -> list[Row]:
    """Every routing measurement; ``quick`` runs small sizes (a few seconds in all)."""
    rows = _routing_cost(20_000 if quick else 100_000, 3 if quick else 5)
    rows += _skewed(1_000 if quick else 4_000, fast=0.0002)
    rows += _key_spread(100_000, 7)
    return rows


# ---------------------------------------------------------------------------- routing cost
def _drain(qd: QueueDescriptor) -> None:
    while True:
        try:
            qd.get(timeout=0)
        except Empty:
            return


def _best(fn: Callable[[], float], reps: int) -> float:
    # As timeit does: no cyclic GC pauses inside the timed loops (the queues hold every packet
    # until the drain, so a full collection would scan them all and dominate the figure).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return min(fn() for _ in range(reps))
    finally:
        if enabled:
            gc.enable()


def _routing_cost(n: int, reps: int) -> list[Row]:
    instances = 4
    # Credit comes back lazily (every half window consumed), and the loops below put n, then
    # drain: a window of 2n keeps the puts from ever waiting.
    qds = [
        QueueDescriptor(queue_type="local", maxsize=2 * n + 64, batch_size=100)
        for _ in range(instances)
    ]
    rows: list[Row] = []
    try:
        packets = [Packet(i, partition_key=f"key-{i}") for i in range(n)]
        base = qds[0]

        def put_alone() -> float:
            put = base.put
            t0 = time.perf_counter()
            for p in packets:
                put(p)
            dt = time.perf_counter() - t0
            _drain(base)
            return dt / n

        base.put(packets[0])  # open the ends so the loop times only puts
        _drain(base)
        put_cost = _best(put_alone, reps)
        rows.append(_row("route put alone (local queue)", put_cost * 1e9, "ns/packet"))
        for name in STRATEGY_NAMES:
            router = make_router(name, timeout=5.0)
            for i, qd in enumerate(qds):
                router.add_connection(Connection(0, i, f"bench-{i}", qd))
            fanout = instances if name == "broadcast" else 1
            batch = packets[: n // fanout]

            def routed(router: BaseRouter = router, batch: list[Packet] = batch) -> float:
                route = router.route
                t0 = time.perf_counter()
                for p in batch:
                    route(p)
                dt = time.perf_counter() - t0
                for qd in qds:
                    _drain(qd)
                return dt / len(batch)

            cost = _best(routed, reps)
            router.close()
            puts = put_cost * fanout
            what = f"the {fanout} puts alone" if fanout > 1 else "the put alone"
            rows.append(
                _row(
                    f"route {name} overhead",
                    (cost - puts) * 1e9,
                    "ns/packet",
                    f"{what} (ratio: put / (route + put))",
                    puts * 1e9,
                    higher_is_better=False,
                )
            )
            # ratio for overhead rows: the put's share of the routed total
            rows[-1]["ratio"] = puts / cost
    finally:
        for qd in qds:
            qd.close(timeout=1.0)
    return rows


# ---------------------------------------------------------------------------- skewed load
class _Server(threading.Thread):
    """A consumer that takes ``service`` seconds per record (slept in >= 1 ms slices)."""

    def __init__(self, qd: QueueDescriptor, service: float) -> None:
        super().__init__(name="bench-server", daemon=True)
        self.qd = qd
        self.service = service
        self.count = 0
        self.finished = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            debt = 0.0
            get = self.qd.get
            while True:
                item = get(timeout=30.0)
                if item.__class__ is EndOfStream:
                    break
                self.count += 1
                debt += self.service
                if debt >= 0.001:
                    t0 = time.perf_counter()
                    time.sleep(debt)
                    debt -= time.perf_counter() - t0
            if debt > 0:
                time.sleep(debt)
            self.finished = time.perf_counter()
        except BaseException as exc:  # reported by the caller
            self.error = exc


def _skew_run(router: BaseRouter, n: int, services: list[float]) -> tuple[float, list[int]]:
    qds = [QueueDescriptor(queue_type="local", maxsize=32, batch_size=8) for _ in services]
    servers = [_Server(qd, s) for qd, s in zip(qds, services, strict=True)]
    try:
        for i, qd in enumerate(qds):
            router.add_connection(Connection(0, i, f"server-{i}", qd))
        for s in servers:
            s.start()
        t0 = time.perf_counter()
        for i in range(n):
            router.route(Packet(i))
        router.send_stop_signal()
        router.close()
        for s in servers:
            s.join(60.0)
        errors = [s.error for s in servers if s.error is not None]
        if errors:
            raise errors[0]
        return max(s.finished for s in servers) - t0, [s.count for s in servers]
    finally:
        for qd in qds:
            qd.close(timeout=1.0)


def _skewed(n: int, fast: float) -> list[Row]:
    services = [fast, fast * 10, fast, fast]  # instance 1 is 10x slower
    rr, _ = _skew_run(make_router("round_robin"), n, services)
    pred, pred_counts = _skew_run(LoadBalanceRouter(mode="predictive"), n, services)
    inst, inst_counts = _skew_run(LoadBalanceRouter(mode="instantaneous"), n, services)
    low = {"higher_is_better": False}
    return [
        _row("skew round_robin completion", rr, "s"),
        _row("skew load_balance completion", pred, "s", "round_robin", rr, **low),
        _row("skew load_balance slow-instance share", 100.0 * pred_counts[1] / n, "%"),
        _row("skew instantaneous completion", inst, "s", "round_robin", rr, **low),
        _row("skew instantaneous slow-instance share", 100.0 * inst_counts[1] / n, "%"),
        _row("skew predictive completion", pred, "s", "instantaneous depth", inst, **low),
    ]


# ---------------------------------------------------------------------------- key spread
def _key_spread(n: int, instances: int) -> list[Row]:
    from sage_zmq.config import current_config

    strategy = HashStrategy(current_config().communication.router.max_parallelism)
    configured = tuple(range(instances))
    counts = Counter(strategy.target(f"key-{i}", configured) for i in range(n))
    even = n / instances
    worst = max(abs(counts[i] - even) for i in configured) / even * 100.0
    return [_row("hash key spread max deviation", worst, "%")]


if __name__ == "__main__":
    import sys

    result = run(quick="--quick" in sys.argv)
    for r in result:
        extra = "" if r["ratio"] is None else f"  vs {r['competitor']}: x{r['ratio']:.2f}"
        print(f"{r['name']:<40} {r['value']:>10.3f} {r['unit']}{extra}")
    for m in missed(result):
        print("MISSED:", m)
