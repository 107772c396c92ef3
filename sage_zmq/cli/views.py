"""Text views of stats snapshots and traces for ``sage-zmq stats``, ``top`` and ``trace``."""

from __future__ import annotations

import json
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
    hist = q.get("latency_histogram")
    if q.get(key) is not None:
        return float(q[key])
    if hist:
        return Histogram.from_dict(hist).quantile(quantile)
    return None


def _operator(meta: Mapping[str, Any] | None) -> str:
    if not meta or "operator" not in meta:
        return "-"
    return f"{meta['operator']}[{meta.get('instance', 0)}]"


def rates_between(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> dict[tuple[str, str, str], tuple[float, float]]:
    """Records/s ``(sent, received)`` per ``(process, queue, role)`` between two snapshot lists."""
    old = {p["process"]: p for p in before}
    out: dict[tuple[str, str, str], tuple[float, float]] = {}
    for snap in after:
        prev = old.get(snap["process"])
        dt = float(snap["time"]) - float(prev["time"]) if prev else 0.0
        prev_q = {(q["queue_id"], q["role"]): q for q in prev["queues"]} if prev else {}
        for q in snap["queues"]:
            p = prev_q.get((q["queue_id"], q["role"]))
            key = (snap["process"], q["queue_id"], q["role"])
            if p is None or dt <= 0:
                out[key] = (0.0, 0.0)
            else:
                out[key] = (
                    max(0.0, (q["sent"] - p["sent"]) / dt),
                    max(0.0, (q["received"] - p["received"]) / dt),
                )
    return out


def format_queues(
    processes: Sequence[Mapping[str, Any]],
    rates: Mapping[tuple[str, str, str], tuple[float, float]] | None = None,
) -> str:
    """A table with one row per queue end per process."""
    rows: list[tuple[str, ...]] = [_HEAD]
    for snap in sorted(processes, key=lambda p: (_operator(p.get("meta")), p["process"])):
        for q in snap["queues"]:
            out_rate, in_rate = (rates or {}).get(
                (snap["process"], q["queue_id"], q["role"]),
                (
                    None,
                    None,
                ),
            )
            maxsize = q.get("maxsize") or 0
            rows.append(
                (
                    str(snap["process"]),
                    _operator(snap.get("meta")),
                    str(q["queue_id"]),
                    str(q["role"]),
                    str(q.get("sent", 0)),
                    str(q.get("received", 0)),
                    "-" if out_rate is None else f"{out_rate:.0f}",
                    "-" if in_rate is None else f"{in_rate:.0f}",
                    f"{q.get('depth', 0)}/{maxsize}",
                    f"{100 * float(q.get('utilisation') or 0):.0f}%",
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
    hops = trace.get("hops") or []
    total = (hops[-1][3] - hops[0][3]) * 1000 if len(hops) > 1 else 0.0
    lines = [
        f"trace {trace.get('trace_id')}  {len(hops)} hops  {total:.3f} ms  "
        f"finished by {trace.get('finished_by', '?')}"
    ]
    t0 = hops[0][3] if hops else 0.0
    for queue, process, role, ts in hops:
        lines.append(f"  +{(ts - t0) * 1000:9.3f} ms  {role:<5} {queue:<30} {process}")
    return "\n".join(lines)


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
