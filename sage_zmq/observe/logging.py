"""sage-zmq's logging: stdlib :mod:`logging` under the ``sage_zmq`` logger hierarchy.

Library code only creates loggers (``sage_zmq.queue``, ``sage_zmq.connection``, ...); it never
configures the root logger. ``observability.log_level`` sets the level of the ``sage_zmq``
logger where the application chose none (see :func:`apply_config_level`); when the application
has configured no logging at all, a stderr handler is added so that the level is visible.
:func:`connection_event` is the one way connection events (connect, bind, disconnect,
reconnect, failover, peer declared dead) are reported.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

__all__ = [
    "LOGGER_NAME",
    "WARNING_EVENTS",
    "apply_config_level",
    "configure_logging",
    "connection_event",
]

LOGGER_NAME = "sage_zmq"
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"

WARNING_EVENTS = frozenset({"failover", "peer_dead", "connect_failed", "lost"})
"""Connection events logged at WARNING; the others (connect, bind, disconnect, ...) at INFO."""

_conn_log = logging.getLogger(f"{LOGGER_NAME}.connection")
_OWN_HANDLER = "_sage_zmq_handler"
_level_from_app = False  # configure_logging() was called: its level wins over the config's
_level_set_here: int | None = None  # the level apply_config_level last gave the logger


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(str(level).upper())
    if not isinstance(value, int):
        from sage_zmq.errors import ConfigError

        known = ", ".join(n for n in logging.getLevelNamesMapping() if n != "NOTSET")
        raise ConfigError(f"unknown log level {level!r}; use one of {known}")
    return value


def _own_handler(logger: logging.Logger) -> logging.Handler | None:
    for handler in logger.handlers:
        if getattr(handler, _OWN_HANDLER, False):
            return handler
    return None


def configure_logging(
    level: int | str | None = None, *, stream: IO[str] | None = None, fmt: str = FORMAT
) -> logging.Logger:
    """Send sage-zmq's log records at ``level`` and above to ``stream`` (default stderr).

    ``level`` defaults to ``observability.log_level``. Calling it again replaces the handler
    it added before (so the CLI and tests can call it freely). Returns the ``sage_zmq`` logger.
    """
    if level is None:
        from sage_zmq.config import current_config

        level = current_config().observability.log_level or "WARNING"
    global _level_from_app
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(_level(level))
    _level_from_app = True
    old = _own_handler(logger)
    if old is not None:
        logger.removeHandler(old)
    logger.addHandler(_stderr_handler(stream or sys.stderr, fmt))
    return logger


def _stderr_handler(stream: IO[str], fmt: str, *, fallback: bool = False) -> logging.Handler:
    handler = _FallbackHandler(stream) if fallback else logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    setattr(handler, _OWN_HANDLER, True)
    return handler


class _FallbackHandler(logging.StreamHandler):
    """The handler added where nothing logged: silent once the application configures its own
    logging (``basicConfig`` after the first queue), whose handlers then print each record."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger(LOGGER_NAME).propagate and logging.getLogger().handlers:
            return
        super().emit(record)


def apply_config_level(level: int | str | None) -> None:
    """Set the ``sage_zmq`` logger's level; add a stderr handler only if nothing logs anywhere.

    The config's level applies when queues first start (and on config changes) only where
    the application chose none: a level set with :func:`configure_logging` or with
    ``logging.getLogger("sage_zmq").setLevel(...)`` stays. ``None`` (the default) leaves the
    logger to the application's logging: ``logging.basicConfig(level=logging.INFO)`` shows
    sage-zmq's INFO events as it does every other library's, and with no logging configured
    at all the level is the root logger's, WARNING.
    """
    global _level_set_here
    if _level_from_app:
        return
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level in (logging.NOTSET, _level_set_here):  # else the application set it
        value = logging.NOTSET if level is None else _level(level)
        logger.setLevel(value)
        _level_set_here = value
    if not logger.handlers and not logging.getLogger().handlers:
        # Nothing logs anywhere: without a handler, logging's last resort shows warnings only.
        logger.addHandler(_stderr_handler(sys.stderr, FORMAT, fallback=True))


def connection_event(
    event: str,
    *,
    queue: str,
    peer: str,
    level: int | None = None,
    detail: str = "",
    **fields: Any,
) -> None:
    """Log one connection event of ``queue`` with its ``peer`` (endpoint or peer id).

    The record carries ``sage_event``, ``sage_queue`` and ``sage_peer`` attributes (and any
    ``fields`` as ``sage_<name>``) for structured handlers.
    """
    if level is None:
        level = logging.WARNING if event in WARNING_EVENTS else logging.INFO
    if not _conn_log.isEnabledFor(level):
        return
    extra = {"sage_event": event, "sage_queue": queue, "sage_peer": peer}
    extra.update({f"sage_{k}": v for k, v in fields.items()})
    tail = f": {detail}" if detail else ""
    _conn_log.log(level, "queue %s: %s %s%s", queue, event, peer, tail, extra=extra)
