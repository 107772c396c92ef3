"""Message tracing: a W3C ``traceparent`` id plus the hops a packet took, in its headers.

A traced :class:`~sage_zmq.packet.Packet` carries two headers:

* ``traceparent``: ``00-<32 hex trace id>-<16 hex parent span id>-01`` (W3C Trace Context), so
  that OpenTelemetry and other tracers can join the trace;
* ``sage_trace``: the hops so far, ``[[queue, process, role, timestamp], ...]`` with ``process``
  = ``host:pid``, ``role`` = ``put`` (encoded by a producer), ``get`` (decoded by a consumer) or
  ``local`` (handed over inside one process), ``timestamp`` = wall-clock seconds.

Untraced packets pay nothing: the codec looks at ``headers`` only when a packet has some, and
sampling (``observability.trace_sample_rate``) happens once, where a record enters the
pipeline (:func:`maybe_trace`). Finished traces (:func:`finish`) go to an in-process ring
buffer that the stats endpoint serves and, if set, to a JSON-lines trace log.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sage_zmq.packet import Packet

__all__ = [
    "HOPS",
    "TRACEPARENT",
    "Hop",
    "add_hop",
    "finish",
    "hops",
    "is_traced",
    "local_hops",
    "maybe_trace",
    "on_decode",
    "on_encode",
    "otel_context",
    "propagate",
    "recent_traces",
    "sample_rate",
    "set_sample_rate",
    "set_trace_log",
    "start_trace",
    "trace_id",
]

TRACEPARENT = "traceparent"
HOPS = "sage_trace"

_rate: float | None = None  # None: not read from the config yet
_random = random.Random()
_recent: deque[dict[str, Any]] = deque(maxlen=1000)
_recent_lock = threading.Lock()
_log_path: str | None = None
_log_lock = threading.Lock()
_otel: Any = None  # None: not looked for yet; False: not installed

active = False
"""True once this process has seen a traced packet; paths without a codec test it per batch."""


@dataclass(frozen=True)
class Hop:
    """One step of a traced packet."""

    queue: str
    process: str
    role: str
    timestamp: float

    @classmethod
    def from_list(cls, item: Any) -> Hop:
        queue, process, role, ts = item
        return cls(str(queue), str(process), str(role), float(ts))


def _process() -> str:
    from sage_zmq.observe.metrics import process_label

    return process_label()


# ------------------------------------------------------------------------------ sampling
def set_sample_rate(rate: float | None) -> None:
    """Override ``observability.trace_sample_rate`` in this process (None: read config again)."""
    global _rate
    if rate is not None and not 0.0 <= float(rate) <= 1.0:
        from sage_zmq.errors import ConfigError

        raise ConfigError(f"trace sample rate must be from 0 to 1, got {rate!r}")
    _rate = None if rate is None else float(rate)


def sample_rate() -> float:
    """The share of packets :func:`maybe_trace` starts a trace for."""
    global _rate
    rate = _rate
    if rate is None:
        from sage_zmq.config import current_config

        rate = _rate = float(current_config().observability.trace_sample_rate)
    return rate


def seed(value: int) -> None:
    """Make sampling decisions reproducible (tests, benchmarks)."""
    _random.seed(value)


def maybe_trace(packet: Packet) -> bool:
    """Start a trace on ``packet`` with probability ``trace_sample_rate``; True if traced.

    Call it where records enter the pipeline (sources). A packet that already carries a trace
    keeps it.
    """
    rate = _rate if _rate is not None else sample_rate()
    if not rate:
        return False
    headers = packet.headers
    if headers is not None and HOPS in headers:
        return True
    if rate < 1.0 and _random.random() >= rate:
        return False
    start_trace(packet)
    return True


def _span_id() -> str:
    return os.urandom(8).hex()


def start_trace(packet: Packet) -> str:
    """Trace ``packet`` from here on; returns its trace id (32 hex digits).

    If OpenTelemetry is installed and a span is active, the packet joins that span's trace.
    """
    global active
    active = True
    headers = dict(packet.headers) if packet.headers else {}
    parent = _otel_traceparent()
    headers[TRACEPARENT] = parent or f"00-{os.urandom(16).hex()}-{_span_id()}-01"
    headers[HOPS] = []
    packet.headers = headers
    return str(headers[TRACEPARENT]).split("-")[1]


def is_traced(packet: Any) -> bool:
    headers = getattr(packet, "headers", None)
    return isinstance(headers, dict) and HOPS in headers


def trace_id(packet: Any) -> str | None:
    """The trace id of a traced packet (from ``traceparent``), else None."""
    headers = getattr(packet, "headers", None)
    if not isinstance(headers, dict):
        return None
    parts = str(headers.get(TRACEPARENT, "")).split("-")
    return parts[1] if len(parts) == 4 else None


def hops(packet: Any) -> list[Hop]:
    headers = getattr(packet, "headers", None)
    if not isinstance(headers, dict) or not isinstance(headers.get(HOPS), list):
        return []
    out: list[Hop] = []
    for item in headers[HOPS]:
        try:
            out.append(Hop.from_list(item))
        except (TypeError, ValueError):
            continue  # a hop a foreign peer wrote in another shape: show the rest
    return out


# ----------------------------------------------------------------------------- hop marks
def add_hop(packet: Packet, queue: str, role: str) -> None:
    """Append a hop to a traced packet (no-op for untraced ones).

    The hop list is replaced, not appended to in place: copies of one packet (a broadcast)
    share the list object until then.
    """
    headers = packet.headers
    if headers is None or HOPS not in headers:
        return
    old = headers[HOPS]
    prior = old if isinstance(old, list) else []
    headers[HOPS] = [*prior, [queue, _process(), role, time.time()]]


def local_hops(records: list[Any], queue: str) -> None:
    """Add a ``local`` hop to the traced Packets of a batch handed over inside one process.

    For queue types without a codec (``local``); call it only ``if tracing.active``.
    """
    for record in records:
        if record.__class__ is Packet:
            headers = record.headers
            if headers is not None and HOPS in headers:
                add_hop(record, queue, "local")


def on_encode(headers: dict[str, Any], queue: str | None) -> dict[str, Any]:
    """The headers to put on the wire for a traced packet: a ``put`` hop appended.

    Returns a new dict; the sender's packet is left as it was.
    """
    old = headers.get(HOPS)
    prior = old if isinstance(old, list) else []
    return {**headers, HOPS: [*prior, [queue or "?", _process(), "put", time.time()]]}


def on_decode(headers: dict[str, Any], queue: str | None) -> None:
    """Append a ``get`` hop to headers just decoded from the wire (in place: they are new)."""
    global active
    active = True
    hop = [queue or "?", _process(), "get", time.time()]
    hop_list = headers.get(HOPS)
    if isinstance(hop_list, list):
        hop_list.append(hop)
    else:  # a peer sent something else under the key: replaced (PROTOCOL.md §7)
        headers[HOPS] = [hop]


def propagate(source: Any, target: Packet) -> Packet:
    """Carry ``source``'s trace (if any) onto ``target``, a packet derived from it.

    The target gets a new span id under the same trace id and a copy of the hops so far.
    """
    headers = getattr(source, "headers", None)
    if not isinstance(headers, dict) or HOPS not in headers:
        return target
    new = dict(target.headers) if target.headers else {}
    parent = str(headers.get(TRACEPARENT, ""))
    parts = parent.split("-")
    if len(parts) == 4:
        new[TRACEPARENT] = f"{parts[0]}-{parts[1]}-{_span_id()}-{parts[3]}"
    hop_list = headers[HOPS]
    new[HOPS] = list(hop_list) if isinstance(hop_list, list) else []
    target.headers = new
    return target


# ----------------------------------------------------------------------- finished traces
def set_trace_log(path: str | os.PathLike[str] | None) -> None:
    """Append every finished trace of this process to ``path`` (JSON lines); None: stop."""
    global _log_path
    _log_path = None if path is None else os.fspath(path)


def finish(packet: Any, where: str | None = None) -> dict[str, Any] | None:
    """Record a traced packet's path as complete (call it where records leave the pipeline).

    Returns the trace record ``{"trace_id", "traceparent", "hops", "finished_by", "time"}``,
    or None for an untraced packet.
    """
    tid = trace_id(packet)
    if tid is None or not is_traced(packet):
        return None
    record = {
        "trace_id": tid,
        "traceparent": packet.headers.get(TRACEPARENT),
        "hops": [[h.queue, h.process, h.role, h.timestamp] for h in hops(packet)],
        "finished_by": where or _process(),
        "time": time.time(),
    }
    with _recent_lock:
        _recent.append(record)
    path = _log_path
    if path is not None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with _log_lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(line)  # one write per line: concurrent writers do not interleave lines
    return record


def recent_traces(since: float = 0.0) -> list[dict[str, Any]]:
    """Finished traces of this process still in the ring buffer, finished after ``since``."""
    with _recent_lock:
        return [r for r in _recent if r["time"] > since]


def clear_recent() -> None:
    with _recent_lock:
        _recent.clear()


# ---------------------------------------------------------------------- OpenTelemetry
def _otel_api() -> Any:
    global _otel
    if _otel is None:
        try:
            from opentelemetry import propagate as otel_propagate
            from opentelemetry import trace as otel_trace
        except ImportError:
            _otel = False
        else:
            _otel = (otel_propagate, otel_trace)
    return _otel


def _otel_traceparent() -> str | None:
    api = _otel_api()
    if not api:
        return None
    otel_propagate, otel_trace = api
    if not otel_trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    otel_propagate.inject(carrier)
    value = carrier.get(TRACEPARENT)
    return value if isinstance(value, str) else None


def otel_context(packet: Any) -> Any:
    """An OpenTelemetry ``Context`` extracted from a packet's headers (None without OTel).

    Start a span with ``tracer.start_as_current_span(name, context=otel_context(pkt))`` so
    that it joins the producer's trace.
    """
    api = _otel_api()
    headers = getattr(packet, "headers", None)
    if not api or not isinstance(headers, dict):
        return None
    carrier = {k: v for k, v in headers.items() if isinstance(v, str)}
    return api[0].extract(carrier)


def _after_fork() -> None:
    # A lock held by another thread at fork time would never be released in the child.
    global _recent_lock, _log_lock
    _recent_lock = threading.Lock()
    _log_lock = threading.Lock()
    _recent.clear()


os.register_at_fork(after_in_child=_after_fork)
