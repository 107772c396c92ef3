"""The stats endpoint: a running process (or topology) answers snapshot and trace queries.

Protocol (one ZeroMQ ROUTER socket, ``tcp://127.0.0.1:PORT`` or ``ipc://PATH``): a client sends
one JSON object from a REQ socket and gets one JSON object back.

* ``{"cmd": "snapshot"}`` -> ``{"version": 1, "time": t, "processes": [snapshot, ...]}``, each
  snapshot as :func:`sage_zmq.observe.metrics.snapshot` returns it plus ``meta`` (e.g. the
  operator and instance of a topology process);
* ``{"cmd": "traces", "since": t}`` -> ``{"traces": [trace, ...]}``, finished traces
  (:func:`sage_zmq.observe.tracing.finish`) newer than ``t``;
* ``{"cmd": "ping"}`` -> ``{"ok": true}``.

Worker processes *report* to the same socket from a DEALER (:class:`Reporter`): ``{"cmd":
"report", "snapshot": ..., "traces": [...], "final": bool, "meta": {...}}``, which gets no
answer. The server keeps the latest report of each process, so one endpoint shows a whole
multi-process topology. Every process's report is what that process's ``statistics()`` said at
the time it was sent (every ``interval`` seconds, and once more as it ends).

Anyone who can reach the endpoint can send a report, so a report is checked when it arrives
(:func:`check_report`): a malformed one is dropped and counted (``rejected_reports`` in the
snapshot answer), never stored where it would break every later ``snapshot`` reader.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from sage_zmq.errors import SageZmqError
from sage_zmq.observe import metrics, tracing

__all__ = [
    "Reporter",
    "StatsError",
    "StatsServer",
    "advertise",
    "check_endpoint",
    "check_report",
    "discover",
    "query",
]

PROTOCOL_VERSION = 1
log = logging.getLogger("sage_zmq.metrics")
_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:(\d{1,5}|\*)|ipc://\S+)$")


class StatsError(SageZmqError):
    """A stats endpoint is malformed, unreachable or answered nonsense."""


def check_endpoint(endpoint: str) -> str:
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        raise StatsError(
            f"malformed stats endpoint {endpoint!r}: expected tcp://HOST:PORT (e.g. "
            "tcp://127.0.0.1:5600) or ipc:///path/to/socket"
        )
    return endpoint


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


# Queue-entry fields the views compute with: present (as metrics.snapshot() writes them), each
# must be a finite number; role and queue_id identify a row.
_QUEUE_NUMBERS = ("sent", "received", "depth", "maxsize")
_QUEUE_OPTIONAL_NUMBERS = ("utilisation", "latency_p50", "latency_p99")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_report(msg: Any) -> str | None:
    """Why a ``report`` message is malformed, or None if it can be stored.

    The snapshot must look like :func:`sage_zmq.observe.metrics.snapshot`'s: a ``process``
    label, a numeric ``time``, ``queues`` whose entries have a ``queue_id``, a ``role`` and
    numeric counters, and a list of ``routers``; ``meta`` (if any) a mapping.
    """
    if not isinstance(msg, dict):
        return "not a JSON object"
    snap = msg.get("snapshot")
    if not isinstance(snap, dict):
        return "no 'snapshot' object"
    if not isinstance(snap.get("process"), str) or not snap["process"]:
        return "snapshot has no 'process' label"
    if not _number(snap.get("time")):
        return "snapshot 'time' is not a number"
    queues = snap.get("queues")
    if not isinstance(queues, list):
        return "snapshot 'queues' is not a list"
    for i, q in enumerate(queues):
        if not isinstance(q, dict):
            return f"queues[{i}] is not an object"
        for key in ("queue_id", "role"):
            if not isinstance(q.get(key), str):
                return f"queues[{i}] has no {key!r} string"
        for key in _QUEUE_NUMBERS:
            if not _number(q.get(key)):
                return f"queues[{i}] {key!r} is not a number"
        for key in _QUEUE_OPTIONAL_NUMBERS:
            if q.get(key) is not None and not _number(q[key]):
                return f"queues[{i}] {key!r} is not a number"
        hist = q.get("latency_histogram")
        if hist is not None and not isinstance(hist, dict):
            return f"queues[{i}] 'latency_histogram' is not an object"
    if not isinstance(snap.get("routers", []), list):
        return "snapshot 'routers' is not a list"
    if not isinstance(msg.get("meta") or {}, dict):
        return "'meta' is not an object"
    if not isinstance(msg.get("traces") or [], list):
        return "'traces' is not a list"
    return None


def _is_trace(trace: Any) -> bool:
    # What views and `traces` readers rely on: a time to order by and a list of hops.
    return (
        isinstance(trace, dict)
        and _number(trace.get("time"))
        and isinstance(trace.get("hops"), list)
    )


class StatsServer:
    """Answers stats queries on ``endpoint`` from a background thread; ``close()`` stops it.

    ``include_local``: also report this process's own queues (on by default).
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:0",
        *,
        include_local: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        check_endpoint(endpoint)
        self._include_local = include_local
        self._meta = dict(meta or {})
        self._reports: dict[str, dict[str, Any]] = {}
        self._finals: set[str] = set()
        self.rejected_reports = 0
        """Reports dropped as malformed (:func:`check_report`)."""
        self._last_rejection_log = -1e9
        self._traces: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._changed = threading.Condition()
        self._ctx: zmq.Context[Any] = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            self._ctx.term()
            raise StatsError(f"cannot serve stats on {endpoint}: {exc}") from None
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        # libzmq leaves an ipc socket file behind: close() removes it if it is still ours.
        self._ipc_file: tuple[str, int, int] | None = None
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                path = self.endpoint[len("ipc://") :]
                st = os.stat(path)
                self._ipc_file = (path, st.st_dev, st.st_ino)
        self._wake_addr = f"inproc://stats-wake-{id(self):x}"
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        self._wake_recv.bind(self._wake_addr)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sage-zmq-stats", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- data
    def processes(self) -> list[dict[str, Any]]:
        """The latest snapshot of every process: this one (if included) and the reporters."""
        with self._changed:
            out = list(self._reports.values())
        if self._include_local:
            own = metrics.snapshot()
            own["meta"] = self._meta
            out.insert(0, own)
        return out

    def traces(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self._changed:
            out = [t for t in self._traces if t["time"] > since]
        if self._include_local:
            out.extend(tracing.recent_traces(since))
        return sorted(out, key=lambda t: t["time"])

    def wait_final(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` processes have sent their final report; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._finals) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _on_report(self, msg: dict[str, Any]) -> None:
        why = check_report(msg)
        if why is not None:
            self.rejected_reports += 1
            now = time.monotonic()
            if now - self._last_rejection_log > 10.0:  # one line per 10 s, not per report
                self._last_rejection_log = now
                log.warning(
                    "stats endpoint %s: dropped a malformed report (%s); %d dropped so far",
                    self.endpoint,
                    why,
                    self.rejected_reports,
                )
            return
        snap = msg["snapshot"]
        snap["meta"] = msg.get("meta") or {}
        with self._changed:
            self._reports[str(snap["process"])] = snap
            for trace in msg.get("traces") or ():
                if _is_trace(trace):
                    self._traces.append(trace)
            if msg.get("final"):
                self._finals.add(str(snap["process"]))
            self._changed.notify_all()

    def _answer(self, msg: Any) -> dict[str, Any] | None:
        cmd = msg.get("cmd") if isinstance(msg, dict) else None
        if cmd == "report":
            self._on_report(msg)
            return None
        if cmd == "snapshot":
            return {
                "version": PROTOCOL_VERSION,
                "time": time.time(),
                "processes": self.processes(),
                "rejected_reports": self.rejected_reports,
            }
        if cmd == "traces":
            since = msg.get("since", 0.0)
            return {"traces": self.traces(float(since) if isinstance(since, int | float) else 0.0)}
        if cmd == "ping":
            return {"ok": True}
        return {"error": f"unknown request {msg!r}; send {{'cmd': 'snapshot' | 'traces' | 'ping'}}"}

    # ---------------------------------------------------------------- thread
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_recv in ready:
                    return
                if self._sock in ready:
                    self._serve_one()
        finally:
            self._sock.close(linger=0)
            self._wake_recv.close(linger=0)

    def _serve_one(self) -> None:
        parts = self._sock.recv_multipart()
        if len(parts) < 2:
            return
        peer, body = parts[0], parts[-1]
        try:
            msg = json.loads(body)
        except ValueError:
            reply: dict[str, Any] | None = {"error": "request is not JSON"}
        else:
            reply = self._answer(msg)
        if reply is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart([peer, b"", _dumps(reply)], zmq.NOBLOCK)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)
        wake.send(b"")
        self._thread.join(5)
        wake.close(linger=0)
        self._ctx.term()
        if self._ipc_file is not None:
            from sage_zmq.queues._zmq import unlink_if_same

            unlink_if_same(self._ipc_file)

    def __enter__(self) -> StatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reporter:
    """Sends this process's snapshot (and finished traces) to a :class:`StatsServer`.

    Every ``interval`` seconds from a daemon thread, and once more (``final``) at ``close()``.
    """

    def __init__(
        self, endpoint: str, interval: float = 0.5, meta: dict[str, Any] | None = None
    ) -> None:
        check_endpoint(endpoint)
        self.endpoint = endpoint
        self.interval = interval
        self.meta = dict(meta or {})
        self._since = 0.0
        self._stop = threading.Event()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 2000)  # the final report must get out
        self._sock.setsockopt(zmq.SNDHWM, 4)
        self._sock.setsockopt(zmq.SNDTIMEO, 2000)  # a vanished server never blocks us for long
        self._sock.connect(endpoint)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sage-zmq-reporter", daemon=True)
        self._thread.start()

    def report(self, final: bool = False) -> None:
        with self._lock:
            if self._sock.closed:
                return
            now = time.time()
            traces = tracing.recent_traces(self._since)
            self._since = max([now, *(t["time"] for t in traces)])
            msg = {
                "cmd": "report",
                "snapshot": metrics.snapshot(),
                "traces": traces,
                "final": final,
                "meta": self.meta,
            }
            with contextlib.suppress(zmq.ZMQError):
                # Stats are best effort: with the server gone, skip rather than block.
                self._sock.send_multipart([b"", _dumps(msg)], zmq.NOBLOCK if not final else 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def close(self, final: bool = True) -> None:
        """Send the final report (unless ``final`` is False) and stop.

        ``final=False`` is for a process that is being stopped: its server may be gone, and
        the final report could wait the socket's send timeout and linger (2 s each).
        """
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        if final:
            self.report(final=True)
        with self._lock:
            self._sock.close(linger=None if final else 0)
        self._ctx.term()


def query(
    endpoint: str, cmd: str = "snapshot", timeout: float = 3.0, **args: Any
) -> dict[str, Any]:
    """Ask a stats endpoint (``cmd``: ``snapshot``, ``traces`` or ``ping``); its answer."""
    check_endpoint(endpoint)
    if not _number(timeout) or timeout <= 0:
        # ZeroMQ's poll waits forever for a negative timeout, and int(nan) raises.
        raise StatsError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(_dumps({"cmd": cmd, **args}))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise StatsError(
                f"no answer from stats endpoint {endpoint} within {timeout:g} s: is the "
                "topology running? (sage-zmq run prints its stats endpoint)"
            )
        try:
            reply = json.loads(sock.recv())
        except ValueError:
            raise StatsError(f"stats endpoint {endpoint} answered something not JSON") from None
        sock.close()
    finally:
        ctx.destroy(linger=0)
    if not isinstance(reply, dict):
        raise StatsError(f"stats endpoint {endpoint} answered {reply!r}")
    if "error" in reply:
        raise StatsError(f"stats endpoint {endpoint}: {reply['error']}")
    return reply


# ------------------------------------------------------------------------- discovery
def _advert_dir() -> str:
    from sage_zmq import _runtime

    return _runtime.runtime_dir()


def advertise(endpoint: str, name: str) -> str:
    """Write a small file so ``sage-zmq top`` finds this process's stats endpoint; returns it."""
    path = os.path.join(_advert_dir(), f"stats-{os.getpid()}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"endpoint": endpoint, "name": name, "pid": os.getpid()}, fh)
    os.replace(tmp, path)
    return path


def discover() -> list[dict[str, Any]]:
    """Stats endpoints advertised by live processes of this user on this host."""
    found: list[dict[str, Any]] = []
    directory = _advert_dir()
    for entry in sorted(os.listdir(directory)):
        if not (entry.startswith("stats-") and entry.endswith(".json")):
            continue
        path = os.path.join(directory, entry)
        try:
            with open(path, encoding="utf-8") as fh:
                info = json.load(fh)
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(path)  # its process is gone
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append(info)
    return found


SnapshotSource = Callable[[], list[dict[str, Any]]]
