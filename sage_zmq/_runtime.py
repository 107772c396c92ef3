"""Per-process runtime state: the ZeroMQ context, open queue handles and the ticker thread.

Everything here is created lazily *in the process that uses it* and forgotten in a forked child,
because ZeroMQ contexts and sockets must never cross a fork.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

log = logging.getLogger("sage_zmq.runtime")

_lock = threading.RLock()
_context: zmq.Context[Any] | None = None
_handles: dict[tuple[str, str], Any] = {}
_ticker: _Ticker | None = None
# Producers in batching mode, by id: their partial batches leave when the thread that fills
# them is about to wait for input (see Consumer._get_slow), or on the ticker's next pass.
_batching: dict[int, Any] = {}


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
    global _context, _ticker
    with _lock:
        handles = list(_handles.values())
    for handle in handles:
        try:
            handle.close(timeout=linger)
        except Exception as exc:  # shutting down: report, keep closing the rest
            log.warning("closing %r at shutdown: %s", handle, exc)
    with _lock:
        _handles.clear()
        tick, ctx = _ticker, _context
        _context = None
        _ticker = None
    if tick is not None:
        tick.stop()
    security = sys.modules.get("sage_zmq.security")  # loaded only where CURVE was used
    if security is not None:
        security.stop_authenticator()
    if ctx is not None:
        ctx.destroy(linger=int(linger * 1000))


def batching(producer: Any, on: bool) -> None:
    """Note that ``producer`` entered (``on``) or left batching mode."""
    if on:
        _batching[id(producer)] = producer
    else:
        _batching.pop(id(producer), None)


def batching_in_this_thread() -> list[Any]:
    """The producers in batching mode whose batches the calling thread fills."""
    if not _batching:
        return []
    me = threading.get_ident()
    return [p for p in list(_batching.values()) if p.putter == me]  # list(): one C call


def runtime_dir_path() -> str:
    """Where :func:`runtime_dir` is, without creating it."""
    # Absolute: the endpoints derived here travel in descriptors to processes that may run
    # in another working directory.
    return os.path.abspath(
        os.environ.get("SAGE_ZMQ_RUNTIME_DIR")
        or os.path.join(tempfile.gettempdir(), f"sage-zmq-{os.getuid()}")
    )


def runtime_dir() -> str:
    """A private (0700) directory for ipc socket files, created on first use."""
    base = runtime_dir_path()
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        from sage_zmq.errors import DescriptorError

        raise DescriptorError(
            f"cannot create the runtime directory {base} for ipc socket files: "
            f"{exc.strerror}; set SAGE_ZMQ_RUNTIME_DIR to a private directory you can create"
        ) from None
    st = os.stat(base)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        from sage_zmq.errors import SecurityError

        raise SecurityError(
            f"runtime directory {base} must be owned by uid {os.getuid()} with mode 0700; "
            "remove it or set SAGE_ZMQ_RUNTIME_DIR to a private directory"
        )
    global _swept_by
    if _swept_by != os.getpid():
        _swept_by = os.getpid()
        sweep_stale_ipc_files(base)
    return base


_swept_by = 0  # the process that last swept the runtime directory
STALE_AFTER = 60.0
"""Seconds a socket file must have existed before a sweep may judge it (a consumer that is
still between its bind and its listen refuses connections too)."""


def sweep_stale_ipc_files(directory: str, limit: int = 256) -> list[str]:
    """Remove ipc socket files nobody listens on any more (their consumer was killed).

    A consumer removes its socket file when it closes; one killed by a signal leaves it
    behind, and a later process sweeps it here (as the shared-memory pool sweeps segments).
    Only ``*.sock`` files older than :data:`STALE_AFTER` that refuse a connection go, at most
    ``limit`` per sweep. Returns the paths removed.
    """
    import socket
    import stat

    removed: list[str] = []
    now = time.time()
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".sock")]
    except OSError:
        return removed
    candidates = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode) and now - st.st_mtime >= STALE_AFTER:
            candidates.append((path, st))
    for path, st in candidates[:limit]:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.1)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == st.st_ino:  # not replaced meanwhile
                    os.unlink(path)
                    removed.append(path)
        except OSError:
            pass  # busy or unreadable: leave it
        finally:
            probe.close()
    if removed:
        log.debug("removed %d stale ipc socket files from %s", len(removed), directory)
    return removed


class Tickable(Protocol):
    def tick(self, now: float) -> float | None:
        """Do background work; return seconds until the next tick, or None to leave."""
        ...


class _Ticker:
    """One daemon thread per process for background work on queue ends.

    Producers in batching mode ship a partial batch that did not move for a tick; consumers
    read what arrived while their application is not in ``get`` (so a closing producer gets its
    receipt and heartbeats are answered). Members say when they next want a tick.
    """

    def __init__(self) -> None:
        self._due: dict[Any, float] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sage-zmq-ticker", daemon=True)
        self._thread.start()

    def add(self, member: Tickable, delay: float = 0.0) -> None:
        with self._wake:
            due = time.monotonic() + delay
            if due < self._due.get(member, float("inf")):
                self._due[member] = due
                self._wake.notify()

    def discard(self, member: Tickable) -> None:
        with self._wake:
            self._due.pop(member, None)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped:
                    now = time.monotonic()
                    due = [m for m, t in self._due.items() if t <= now]
                    if due:
                        break
                    wait = min(self._due.values(), default=now + 3600) - now
                    self._wake.wait(wait)
                if self._stopped:
                    return
                for member in due:
                    del self._due[member]
            for member in due:
                try:
                    delay = member.tick(now)
                except Exception as exc:
                    log.debug("background tick failed for %r: %s", member, exc)
                    delay = 0.05
                if delay is not None:
                    self.add(member, delay)


def ticker() -> _Ticker:
    global _ticker
    with _lock:
        if _ticker is None:
            _ticker = _Ticker()
        return _ticker


def _after_fork_in_child() -> None:
    # The parent's context, sockets and threads do not exist here; start from nothing.
    global _context, _ticker, _lock
    _lock = threading.RLock()
    _context = None
    _ticker = None
    for handle in list(_handles.values()):
        # A descriptor the parent used holds its producer's bound put (the fast path): in
        # the child that would write to the parent's socket (lost, or a hang), or use a
        # local queue's objects outside their process. Unbound, it opens its own end here.
        unbind_all = getattr(handle, "unbind_all", None)  # a local queue's channel has none
        if unbind_all is not None:
            unbind_all()
    _handles.clear()
    _batching.clear()  # the parent's producers: their sockets are not ours to use


os.register_at_fork(after_in_child=_after_fork_in_child)
_exiting = False


def _at_exit() -> None:
    global _exiting
    _exiting = True
    shutdown(linger=0.0)


def stop_if_exiting() -> None:
    """End a daemon thread quietly when the interpreter exits under it.

    At exit the queues are closed (``_at_exit``), which wakes a ``get``/``put`` blocked in a
    daemon thread. It would raise ``QueueClosed`` and print a traceback while the process
    exits; ``SystemExit`` ends the thread silently instead, as if it had simply been left
    blocked, which is what a daemon thread on ``queue.Queue`` gets.
    """
    if _exiting and threading.current_thread().daemon:
        raise SystemExit


atexit.register(_at_exit)
