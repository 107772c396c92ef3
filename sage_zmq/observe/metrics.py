"""The process-wide view of live queues and routers: ``snapshot()`` and latency histograms.

Nothing here sits on the record path. Queue ends already count what they do; a snapshot reads
``statistics()`` of every open queue handle of this process (the runtime's handle table) and of
every registered router (weak references, so registering never keeps a router alive).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LATENCY_BUCKETS",
    "SNAPSHOT_VERSION",
    "Histogram",
    "LatencySamples",
    "process_label",
    "queue_rates",
    "register_router",
    "routers",
    "snapshot",
    "unregister_router",
]

SNAPSHOT_VERSION = 1

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds, inclusive) of the end-to-end latency histogram buckets."""

_HOST = socket.gethostname()[:40]


def process_label() -> str:
    """``host:pid`` of this process (computed each call: the pid changes in a forked child)."""
    return f"{_HOST}:{os.getpid()}"


@dataclass(frozen=True)
class Histogram:
    """Counts per latency bucket (not cumulative); ``counts[-1]`` is the overflow (> last bound)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate (the bucket's upper bound) of quantile ``q``; None when empty."""
        total = self.count
        if not total:
            return None
        rank = q * total
        for bound, seen in self.cumulative():
            if seen >= rank:
                return bound if bound != float("inf") else self.bounds[-1]
        return self.bounds[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        return cls(tuple(data["bounds"]), tuple(data["counts"]), float(data["sum"]))


class LatencySamples(deque[float]):
    """A consumer's recent latency samples (bounded, for p50/p99) plus a cumulative histogram.

    The consumer appends one sample per batch (the batch's first Packet), under its own lock.
    """

    def __init__(self, maxlen: int = 2048, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        super().__init__((), maxlen)
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def append(self, value: float) -> None:
        super().append(value)
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def histogram(self) -> Histogram:
        return Histogram(self.bounds, tuple(self._counts), self._sum)


# ------------------------------------------------------------------------------ routers
_routers_lock = threading.Lock()
_routers: dict[int, tuple[weakref.ref[Any], str]] = {}


def register_router(router: Any, name: str | None = None) -> None:
    """Include ``router`` (anything with ``statistics()``) in snapshots while it lives."""
    key = id(router)

    def gone(_: weakref.ref[Any], key: int = key) -> None:
        with _routers_lock:
            _routers.pop(key, None)

    label = name or getattr(router, "name", None) or f"{type(router).__name__}-{key:x}"
    with _routers_lock:
        _routers[key] = (weakref.ref(router, gone), str(label))


def unregister_router(router: Any) -> None:
    with _routers_lock:
        _routers.pop(id(router), None)


def routers() -> list[tuple[str, Any]]:
    """``(name, router)`` of every registered router still alive."""
    with _routers_lock:
        entries = list(_routers.values())
    alive = [(name, ref()) for ref, name in entries]
    return [(name, r) for name, r in alive if r is not None]


# ----------------------------------------------------------------------------- snapshot
def _plain(value: Any) -> Any:
    """JSON-friendly copy of a statistics value (dataclasses, histograms, tuples)."""
    if isinstance(value, Histogram):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _queue_handles() -> Iterable[tuple[str, Any]]:
    from sage_zmq import _runtime

    seen: set[int] = set()
    for key, handle in list(_runtime._handles.items()):
        if id(handle) in seen or not callable(getattr(handle, "statistics", None)):
            continue
        if not hasattr(handle, "descriptor"):
            continue  # runtime bookkeeping (e.g. local channels), not a queue end
        seen.add(id(handle))
        yield str(key[1]), handle


def queue_entry(stats: Any, endpoint: str | None = None) -> dict[str, Any]:
    """One queue's statistics as a plain dict, with utilisation and the latency histogram."""
    entry: dict[str, Any] = _plain(stats)
    extra = entry.get("extra") or {}
    hist = extra.pop("latency_histogram", None)
    entry["latency_histogram"] = hist
    entry["utilisation"] = float(getattr(stats, "utilisation", 0.0))
    entry["endpoint"] = endpoint
    return entry


def snapshot() -> dict[str, Any]:
    """Every live queue end and router of this process, as plain (JSON/msgpack-able) data.

    ``{"version", "process", "pid", "time", "queues": [...], "routers": [...]}``; each queue
    entry holds the fields of :class:`~sage_zmq.queues.base.QueueStatistics` plus
    ``utilisation``, ``endpoint`` and ``latency_histogram`` (``bounds``/``counts``/``sum``).
    """
    queues: list[dict[str, Any]] = []
    for endpoint, handle in _queue_handles():
        try:
            stats = handle.statistics()
        except Exception:  # a handle closing under us: skip it this time
            continue
        queues.append(queue_entry(stats, endpoint))
    routers_out: list[dict[str, Any]] = []
    for name, router in routers():
        try:
            stats = router.statistics()
        except Exception:
            continue
        entry = _plain(stats)
        if isinstance(entry, dict):  # the derived figures, as a queue entry has them
            for derived in ("utilisation", "route_rate"):
                value = getattr(stats, derived, None)
                if isinstance(value, int | float):
                    entry[derived] = float(value)
        routers_out.append({"name": name, "stats": entry if isinstance(entry, dict) else {}})
    return {
        "version": SNAPSHOT_VERSION,
        "process": process_label(),
        "pid": os.getpid(),
        "time": time.time(),
        "queues": queues,
        "routers": routers_out,
    }


def queue_rates(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> dict[tuple[str, str, str], tuple[float, float]]:
    """Records/s ``(sent, received)`` per ``(process, queue_id, role)`` between snapshots."""
    dt = float(after["time"]) - float(before["time"])
    old = {(before["process"], q["queue_id"], q["role"]): q for q in before["queues"]}
    rates: dict[tuple[str, str, str], tuple[float, float]] = {}
    for q in after["queues"]:
        key = (after["process"], q["queue_id"], q["role"])
        prev = old.get(key)
        if prev is None or dt <= 0:
            rates[key] = (0.0, 0.0)
            continue
        rates[key] = (
            max(0.0, (q["sent"] - prev["sent"]) / dt),
            max(0.0, (q["received"] - prev["received"]) / dt),
        )
    return rates
