"""A replaceable clock, so timeout logic (heartbeats, retransmits, fsync intervals) is testable.

Production code takes a ``clock`` argument defaulting to :class:`SystemClock`; tests pass a
:class:`FakeClock` and move time with :meth:`FakeClock.advance` instead of sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class TimerHandle(Protocol):
    """What :meth:`Clock.call_at` returns."""

    def cancel(self) -> None: ...


@runtime_checkable
class Clock(Protocol):
    """Monotonic time, sleeping, waiting on an event, and one-shot timers."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def wait(self, event: threading.Event, timeout: float | None) -> bool: ...

    def call_at(self, when: float, fn: Callable[[], object]) -> TimerHandle: ...


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`time.sleep`, :class:`threading.Timer`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    def call_at(self, when: float, fn: Callable[[], object]) -> TimerHandle:
        timer = threading.Timer(max(0.0, when - time.monotonic()), fn)
        timer.daemon = True
        timer.start()
        return timer


class _FakeTimer:
    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], object]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Manual time. Timers fire, in time order, inside :meth:`advance`; thread-safe.

    ``sleep`` and ``wait`` in other threads block until some thread advances time past their
    deadline (``wait`` also returns early when the event is set). With ``autoadvance=True``,
    ``sleep`` advances the clock itself instead, for single-threaded code under test.
    """

    # Bounds how long a waiter takes to notice an Event set by another thread, which does
    # not notify our condition; it is real time but never affects fake-time results.
    _EVENT_POLL = 0.002

    def __init__(self, start: float = 0.0, *, autoadvance: bool = False) -> None:
        self._now = float(start)
        self._autoadvance = autoadvance
        self._cond = threading.Condition()
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        with self._cond:
            return self._now

    def call_at(self, when: float, fn: Callable[[], object]) -> TimerHandle:
        timer = _FakeTimer(float(when), fn)
        with self._cond:
            heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, fn: Callable[[], object]) -> TimerHandle:
        with self._cond:
            return self.call_at(self._now + delay, fn)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing due timers at their own times."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance needs seconds >= 0, got {seconds!r}")
        with self._cond:
            target = self._now + seconds
        while True:
            with self._cond:
                if not self._timers or self._timers[0][0] > target:
                    self._now = max(self._now, target)
                    self._cond.notify_all()
                    return
                when, _, timer = heapq.heappop(self._timers)
                self._now = max(self._now, when)
                self._cond.notify_all()
            # Outside the lock: a callback may schedule timers or read the clock.
            if not timer.cancelled:
                timer.fn()

    def pending_timers(self) -> int:
        with self._cond:
            return sum(1 for _, _, t in self._timers if not t.cancelled)

    def sleep(self, seconds: float) -> None:
        if self._autoadvance:
            self.advance(max(0.0, seconds))
            return
        with self._cond:
            deadline = self._now + seconds
            while self._now < deadline:
                self._cond.wait()

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        if event.is_set():
            return True
        with self._cond:
            deadline = None if timeout is None else self._now + timeout
        while True:
            with self._cond:
                if deadline is not None and self._now >= deadline:
                    return event.is_set()
                self._cond.wait(self._EVENT_POLL)
            if event.is_set():
                return True


__all__ = ["Clock", "FakeClock", "SystemClock", "TimerHandle"]
