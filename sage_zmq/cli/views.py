"""Text views of stats snapshots and traces for ``sage-zmq stats``, ``top`` and ``trace``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sage_zmq.observe.metrics import Histogram

__all__ = ["format_queues", "format_trace", "load_trace_file", "rates_between"]

_HEAD = (
    "PROCESS",
    "OPERATOR",
    "QUEUE",
    "ROLE",
    "SENT",
    "RECV",
    "OUT/s",
    "IN/s",
    "DEPTH",
    "UTIL",
    "P50ms",
    "P99ms",
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def _latency(q: Mapping[str, Any], quantile: float, key: str) -> float | None:
    given = _float(q.get(key))
    if given is not None:
        return given
    hist = q.get("latency_histogram")
    if isinstance(hist, Mapping) and hist:
        try:
            return Histogram.from_dict(dict(hist)).quantile(quantile)
        except (KeyError, TypeError, ValueError):
            return None  # a histogram from some other writer: show '-' rather than fail
    return None


def _float(value: Any) -> float | None:
    """A number from a snapshot field, or None for a missing or non-numeric one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int:
    number = _float(value)
    return int(number) if number is not None and math.isfinite(number) else 0


def _queues(snap: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The queue entries of a process snapshot that are mappings (others are skipped)."""
    queues = snap.get("queues")
    if not isinstance(queues, list):
        return []
    return [q for q in queues if isinstance(q, Mapping)]


def _qkey(q: Mapping[str, Any]) -> tuple[str, str]:
    # The stats server drops reports without these; a snapshot from elsewhere may lack them.
    return str(q.get("queue_id", "?")), str(q.get("role", "?"))


def _operator(meta: Any) -> str:
    if not isinstance(meta, Mapping) or "operator" not in meta:
        return "-"
    return f"{meta['operator']}[{meta.get('instance', 0)}]"


def rates_between(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> dict[tuple[str, str, str], tuple[float, float]]:
    """Records/s ``(sent, received)`` per ``(process, queue, role)`` between two snapshot lists."""
    old = {str(p.get("process")): p for p in before if isinstance(p, Mapping)}
    out: dict[tuple[str, str, str], tuple[float, float]] = {}
    for snap in after:
        if not isinstance(snap, Mapping):
            continue
        process = str(snap.get("process"))
        prev = old.get(process)
        t_now, t_prev = _float(snap.get("time")), _float(prev.get("time")) if prev else None
        dt = t_now - t_prev if t_now is not None and t_prev is not None else 0.0
        prev_q = {_qkey(q): q for q in _queues(prev)} if prev else {}
        for q in _queues(snap):
            p = prev_q.get(_qkey(q))
            key = (process, *_qkey(q))
            if p is None or dt <= 0:
                out[key] = (0.0, 0.0)
            else:
                out[key] = (
                    max(0.0, (_int(q.get("sent")) - _int(p.get("sent"))) / dt),
                    max(0.0, (_int(q.get("received")) - _int(p.get("received"))) / dt),
                )
    return out


def _average_rates(q: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Records/s sent and received since the end opened (``sent / uptime``)."""
    uptime = _float(q.get("uptime"))
    if uptime is None or uptime <= 0:
        return None, None
    sent, received = _float(q.get("sent")), _float(q.get("received"))
    return (
        None if sent is None else sent / uptime,
        None if received is None else received / uptime,
    )


def format_queues(
    processes: Sequence[Mapping[str, Any]],
    rates: Mapping[tuple[str, str, str], tuple[float, float]] | None = None,
) -> str:
    """A table with one row per queue end per process.

    ``rates`` (from :func:`rates_between`) fill OUT/s and IN/s; without them, each end's
    average since it opened (``sent`` and ``received`` over ``uptime``) does."""
    rows: list[tuple[str, ...]] = [_HEAD]
    procs = [p for p in processes if isinstance(p, Mapping)]
    for snap in sorted(procs, key=lambda p: (_operator(p.get("meta")), str(p.get("process")))):
        for q in _queues(snap):
            queue_id, role = _qkey(q)
            if rates is None:  # one snapshot: the averages since each end opened
                out_rate, in_rate = _average_rates(q)
            else:
                out_rate, in_rate = rates.get(
                    (str(snap.get("process")), queue_id, role), (None, None)
                )
            rows.append(
                (
                    str(snap.get("process")),
                    _operator(snap.get("meta")),
                    queue_id,
                    role,
                    str(_int(q.get("sent"))),
                    str(_int(q.get("received"))),
                    "-" if out_rate is None else f"{out_rate:.0f}",
                    "-" if in_rate is None else f"{in_rate:.0f}",
                    f"{_int(q.get('depth'))}/{_int(q.get('maxsize'))}",
                    f"{100 * (_float(q.get('utilisation')) or 0.0):.0f}%",
                    _ms(_latency(q, 0.5, "latency_p50")),
                    _ms(_latency(q, 0.99, "latency_p99")),
                )
            )
    if len(rows) == 1:
        return "no open queues"
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_trace(trace: Mapping[str, Any]) -> str:
    """One trace: its id and each hop with the time since the first hop."""
    hops = [h for h in trace.get("hops") or () if _is_hop(h)]
    total = (hops[-1][3] - hops[0][3]) * 1000 if len(hops) > 1 else 0.0
    lines = [
        f"trace {trace.get('trace_id')}  {len(hops)} hops  {total:.3f} ms  "
        f"finished by {trace.get('finished_by', '?')}"
    ]
    t0 = hops[0][3] if hops else 0.0
    for queue, process, role, ts in hops:
        lines.append(f"  +{(ts - t0) * 1000:9.3f} ms  {role!s:<5} {queue!s:<30} {process}")
    return "\n".join(lines)


def _is_hop(hop: Any) -> bool:
    """``[queue, process, role, timestamp]``; anything else (a foreign writer's) is skipped."""
    return isinstance(hop, list | tuple) and len(hop) == 4 and _float(hop[3]) is not None


def load_trace_file(path: str) -> list[dict[str, Any]]:
    """Traces from a JSON-lines trace log; a clear error for a line that is not a trace."""
    traces: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a JSON trace record") from None
            if not isinstance(item, dict) or "hops" not in item:
                raise ValueError(f"{path}:{number}: not a trace record (no 'hops')")
            traces.append(item)
    return traces


def select_traces(
    traces: Iterable[Mapping[str, Any]], trace_id: str | None, limit: int
) -> list[Mapping[str, Any]]:
    chosen = [t for t in traces if trace_id is None or str(t.get("trace_id")) == trace_id]
    return chosen[-limit:] if limit > 0 else chosen
