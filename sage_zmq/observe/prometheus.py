"""Prometheus exporter (extra ``metrics``): a collector that reads statistics at scrape time.

Names follow the Prometheus conventions: base units (seconds, bytes), ``_total`` on counters,
``_ratio`` on fractions. Labels: ``queue``, ``queue_type``, ``role`` (producer, consumer,
producer+consumer), ``process`` (``host:pid``) and, on message/byte/batch counters,
``direction`` (``sent`` or ``received``). Nothing is counted twice: the queue ends already
count, and a scrape reads their ``statistics()``, so the record path pays nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sage_zmq.errors import MissingDependency
from sage_zmq.observe import metrics

__all__ = ["MetricsServer", "SageZmqCollector", "collector", "start_metrics_server"]

log = logging.getLogger("sage_zmq.metrics")

SnapshotSource = Callable[[], Sequence[dict[str, Any]]]

_INSTALL = "pip install 'sage-zmq[metrics]'"

# (metric name without _total, QueueStatistics field, help)
_COUNTERS = (
    ("sage_zmq_retransmits", "retransmits", "Batches sent again after an ack timeout."),
    ("sage_zmq_rejected_frames", "rejected", "Frames refused (malformed, over limits)."),
    ("sage_zmq_credit_waits", "credit_waits", "Puts that waited for credit."),
    ("sage_zmq_encode_errors", "encode_errors", "Records dropped: not encodable."),
    ("sage_zmq_duplicates", "duplicates", "Duplicate records discarded by the consumer."),
)
_GAUGES = (
    ("sage_zmq_queue_depth", "depth", "Records not yet consumed, as this end sees it."),
    ("sage_zmq_queue_capacity", "maxsize", "The queue's maxsize (credit window)."),
    ("sage_zmq_queue_utilisation_ratio", "utilisation", "depth / capacity."),
    ("sage_zmq_in_flight_messages", "in_flight", "Records sent and not yet consumed."),
    ("sage_zmq_producers", "producers", "Producers known to the consumer."),
    ("sage_zmq_upstreams", "upstreams", "Upstreams whose end of stream the consumer waits for."),
    ("sage_zmq_upstreams_ended", "upstreams_ended", "Upstreams that have ended."),
)
_LABELS = ["queue", "queue_type", "role", "process"]


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError:
        raise MissingDependency(
            f"the Prometheus exporter needs prometheus_client: {_INSTALL}"
        ) from None
    return prometheus_client


class SageZmqCollector:
    """A ``prometheus_client`` collector over snapshots (this process's by default)."""

    def __init__(self, source: SnapshotSource | None = None) -> None:
        self._source = source or (lambda: [metrics.snapshot()])
        self._core = _prometheus().core

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families depend on what is open at scrape time

    def collect(self) -> Iterator[Any]:
        core = self._core
        counter, gauge, histogram = (
            core.CounterMetricFamily,
            core.GaugeMetricFamily,
            core.HistogramMetricFamily,
        )
        direction = [*_LABELS, "direction"]
        messages = counter("sage_zmq_messages", "Records sent or received.", labels=direction)
        nbytes = counter("sage_zmq_bytes", "Frame bytes sent or received.", labels=direction)
        batches = counter("sage_zmq_batches", "Frames of records.", labels=direction)
        counters = [(counter(n, h, labels=_LABELS), f) for n, f, h in _COUNTERS]
        gauges = [(gauge(n, h, labels=_LABELS), f) for n, f, h in _GAUGES]
        latency = histogram(
            "sage_zmq_latency_seconds",
            "End-to-end latency: Packet creation to arrival at the consumer (per batch).",
            labels=_LABELS,
        )
        routed = counter("sage_zmq_router_packets", "Packets routed.", labels=["router", "process"])
        for snap in self._source():
            process = str(snap.get("process", ""))
            for q in snap.get("queues", ()):
                labels = [str(q["queue_id"]), str(q["queue_type"]), str(q["role"]), process]
                for family, sent_key, recv_key in (
                    (messages, "sent", "received"),
                    (nbytes, "bytes_sent", "bytes_received"),
                    (batches, "batches_sent", "batches_received"),
                ):
                    if "producer" in q["role"] or q.get(sent_key):
                        family.add_metric([*labels, "sent"], float(q.get(sent_key) or 0))
                    if "consumer" in q["role"] or q.get(recv_key):
                        family.add_metric([*labels, "received"], float(q.get(recv_key) or 0))
                for family, field in (*counters, *gauges):
                    family.add_metric(labels, float(q.get(field) or 0))
                hist = q.get("latency_histogram")
                if hist:
                    h = metrics.Histogram.from_dict(hist)
                    buckets = [
                        ("+Inf" if b == float("inf") else repr(b), float(n))
                        for b, n in h.cumulative()
                    ]
                    latency.add_metric(labels, buckets, h.sum)
            for r in snap.get("routers", ()):
                stats = r.get("stats") or {}
                count = stats.get("routed", stats.get("packets", stats.get("sent")))
                if isinstance(count, int | float):
                    routed.add_metric([str(r["name"]), process], float(count))
        yield messages
        yield nbytes
        yield batches
        for family, _ in (*counters, *gauges):
            yield family
        yield latency
        yield routed


def collector(source: SnapshotSource | None = None) -> SageZmqCollector:
    return SageZmqCollector(source)


class MetricsServer:
    """A running exporter; ``close()`` stops it and frees the port."""

    def __init__(self, server: Any, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self.addr = addr
        self.port: int = int(server.server_address[1])
        self.url = f"http://{addr}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", source: SnapshotSource | None = None
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` (``port=0``: any free port; see ``.port``).

    ``source`` returns the snapshots to export (default: this process's). Raises
    :class:`~sage_zmq.errors.MissingDependency` without ``prometheus_client``.
    """
    prom = _prometheus()
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        from sage_zmq.errors import ConfigError

        raise ConfigError(f"metrics port must be an integer from 0 to 65535, got {port!r}")
    registry = prom.CollectorRegistry(auto_describe=False)
    registry.register(SageZmqCollector(source))
    server, thread = prom.start_http_server(port, addr=addr, registry=registry)
    handle = MetricsServer(server, thread, addr)
    log.info("metrics: serving %s", handle.url)
    return handle
