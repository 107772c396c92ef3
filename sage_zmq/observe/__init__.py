"""Seeing a running pipeline: metrics, tracing, logging and the stats endpoint.

* :mod:`sage_zmq.observe.metrics` -- ``snapshot()`` of every live queue/router of the process;
* :mod:`sage_zmq.observe.prometheus` -- the Prometheus exporter (extra ``metrics``);
* :mod:`sage_zmq.observe.tracing` -- W3C ``traceparent`` ids and per-hop records in headers;
* :mod:`sage_zmq.observe.logging` -- ``configure_logging`` and connection events;
* :mod:`sage_zmq.observe.stats_server` -- the endpoint ``sage-zmq stats`` / ``top`` read.

:func:`activate` applies the ``observability`` section of the configuration to this process
once (the first queue end it opens calls it): log level, trace sampling and, when
``metrics_port`` is set, the Prometheus exporter on that port.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

__all__ = ["activate", "deactivate", "link_opened", "metrics_server", "new_latency_window"]

log = logging.getLogger("sage_zmq.observe")

_lock = threading.Lock()
_active_pid: int | None = None
_server: Any = None  # the MetricsServer started from config, if any
_server_pid: int | None = None


def activate(cfg: Any = None, *, force: bool = False) -> None:
    """Apply ``observability.*`` (of ``cfg``, default the process config) once per process.

    ``force`` applies it again (after ``set_config``); a metrics server already started on
    another port is stopped first. A metrics port that is taken is logged, never raised: the
    queues work without their exporter.
    """
    global _active_pid
    pid = os.getpid()
    if _active_pid == pid and not force:
        return
    with _lock:
        if _active_pid == pid and not force:
            return
        _active_pid = pid
        if cfg is None:
            from sage_zmq.config import current_config

            cfg = current_config()
        obs = cfg.observability
        from sage_zmq.observe import tracing
        from sage_zmq.observe.logging import apply_config_level

        apply_config_level(obs.log_level)
        tracing.set_sample_rate(obs.trace_sample_rate)
        _apply_metrics_port(obs.metrics_port)


def _apply_metrics_port(port: int | None) -> None:
    global _server, _server_pid
    if _server is not None and _server_pid == os.getpid():
        if port == _server.port:
            return
        _server.close()
    _server = _server_pid = None
    if port is None:
        return
    from sage_zmq.errors import MissingDependency
    from sage_zmq.observe.prometheus import start_metrics_server

    try:
        _server = start_metrics_server(port)
        _server_pid = os.getpid()
    except MissingDependency as exc:
        log.warning("observability.metrics_port is %d but %s", port, exc)
    except OSError as exc:
        log.warning(
            "observability.metrics_port %d: cannot serve metrics from process %d (%s); "
            "another process probably serves it",
            port,
            os.getpid(),
            exc,
        )


def metrics_server() -> Any:
    """The exporter :func:`activate` started in this process, or None."""
    return _server if _server_pid == os.getpid() else None


def deactivate() -> None:
    """Stop what :func:`activate` started; the next queue opened activates again."""
    global _active_pid, _server, _server_pid
    with _lock:
        if _server is not None and _server_pid == os.getpid():
            _server.close()
        _server = _server_pid = None
        _active_pid = None
        from sage_zmq.observe import tracing

        tracing.set_sample_rate(None)


def new_latency_window(maxlen: int = 2048) -> Any:
    """A consumer's latency samples (and histogram); opening a consumer activates this process."""
    from sage_zmq.observe.metrics import LatencySamples

    if _active_pid != os.getpid():
        activate()
    return LatencySamples(maxlen)


def link_opened(role: str, endpoint: str, queue_id: str, codec: Any) -> None:
    """A queue socket was opened: log it, tag its codec for trace hops, activate the process."""
    if _active_pid != os.getpid():
        activate()
    codec.trace_queue = queue_id
    from sage_zmq.observe.logging import connection_event

    connection_event("bind" if role == "consumer" else "connect", queue=queue_id, peer=endpoint)


def link_closed(role: str, endpoint: str, queue_id: str) -> None:
    from sage_zmq.observe.logging import connection_event

    event = "unbind" if role == "consumer" else "disconnect"
    connection_event(event, queue=queue_id, peer=endpoint)


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
