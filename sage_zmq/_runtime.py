"""Per-process runtime state: the ZeroMQ context, open queue handles and the flusher thread.

Everything here is created lazily *in the process that uses it* and forgotten in a forked child,
because ZeroMQ contexts and sockets must never cross a fork.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import zmq

log = logging.getLogger("sage_zmq.runtime")

_lock = threading.RLock()
_context: zmq.Context[Any] | None = None
_handles: dict[tuple[str, str], Any] = {}
_flusher: _Flusher | None = None


def context() -> zmq.Context[Any]:
    """This process's ZeroMQ context (created on first use)."""
    global _context
    ctx = _context
    if ctx is None:
        with _lock:
            if _context is None:
                _context = zmq.Context()
            ctx = _context
    return ctx


def handle_for(key: tuple[str, str], factory: Callable[[], Any]) -> Any:
    """The process-wide handle for a queue, created by ``factory`` on first use."""
    handle = _handles.get(key)
    if handle is None:
        with _lock:
            handle = _handles.get(key)
            if handle is None:
                handle = _handles[key] = factory()
    return handle


def existing_handle(key: tuple[str, str]) -> Any | None:
    return _handles.get(key)


def forget_handle(key: tuple[str, str], handle: Any) -> None:
    with _lock:
        if _handles.get(key) is handle:
            del _handles[key]


def shutdown(linger: float = 0.0) -> None:
    """Close every queue handle of this process and terminate the ZeroMQ context."""
    global _context
    with _lock:
        handles = list(_handles.values())
    for handle in handles:
        try:
            handle.close(timeout=linger)
        except Exception as exc:  # shutting down: report, keep closing the rest
            log.warning("closing %r at shutdown: %s", handle, exc)
    with _lock:
        _handles.clear()
        flusher, ctx = _flusher, _context
        _context = None
    if flusher is not None:
        flusher.stop()
    if ctx is not None:
        ctx.destroy(linger=int(linger * 1000))


def runtime_dir() -> str:
    """A private (0700) directory for ipc socket files, created on first use."""
    base = os.environ.get("SAGE_ZMQ_RUNTIME_DIR") or os.path.join(
        tempfile.gettempdir(), f"sage-zmq-{os.getuid()}"
    )
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    st = os.stat(base)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        from sage_zmq.errors import SecurityError

        raise SecurityError(
            f"runtime directory {base} must be owned by uid {os.getuid()} with mode 0700; "
            "remove it or set SAGE_ZMQ_RUNTIME_DIR to a private directory"
        )
    return base


class Flushable(Protocol):
    def flush_if_stale(self) -> None: ...


class _Flusher:
    """One daemon thread per process that flushes partial batches of busy producers.

    A producer in batching mode registers here; each tick, a producer whose partial batch did not
    move since the previous tick is flushed, so a burst's tail waits at most ~2 ticks.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._members: weakref.WeakSet[Any] = weakref.WeakSet()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sage-zmq-flusher", daemon=True)
        self._thread.start()

    def add(self, member: Flushable) -> None:
        with self._wake:
            self._members.add(member)
            self._wake.notify()

    def discard(self, member: Flushable) -> None:
        with self._wake:
            self._members.discard(member)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._members:
                    self._wake.wait()
                if self._stopped:
                    return
                self._wake.wait(self.interval)
                members = list(self._members)
            for member in members:
                try:
                    member.flush_if_stale()
                except Exception as exc:
                    log.debug("background flush failed: %s", exc)


def flusher(interval: float) -> _Flusher:
    global _flusher
    with _lock:
        if _flusher is None:
            _flusher = _Flusher(interval)
        return _flusher


def _after_fork_in_child() -> None:
    # The parent's context, sockets and threads do not exist here; start from nothing.
    global _context, _flusher, _lock
    _lock = threading.RLock()
    _context = None
    _flusher = None
    _handles.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(lambda: shutdown(linger=0.0))
