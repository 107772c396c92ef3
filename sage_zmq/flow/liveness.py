"""Heartbeats, dead-peer detection and reconnect backoff (the ZeroMQ Guide's Paranoid Pirate).

Pure bookkeeping driven by a :class:`~sage_zmq.flow.clock.Clock`: nothing here sleeps or owns a
thread, so tests move a :class:`~sage_zmq.flow.clock.FakeClock` and call :meth:`check`.

Rules (``interval`` = ``reliability.heartbeat_interval``, ``liveness`` = ``reliability.liveness``):

- any frame from the peer counts as a heartbeat (:meth:`PeerLiveness.heard`);
- a HEARTBEAT is due when nothing was heard, and no HEARTBEAT was sent, for ``interval``: a busy
  link whose peer answers anyway sends none;
- the peer is declared dead once nothing was heard for ``interval * liveness`` (so a loss is
  detected within that bound of the last frame heard, plus the caller's tick);
- while dead, a reconnect is due after ``reconnect_initial`` seconds, then after twice that, up
  to ``reconnect_max``; hearing the peer again revives it and resets the backoff.
"""

from __future__ import annotations

import enum

from sage_zmq.errors import ConfigError
from sage_zmq.flow.clock import Clock, SystemClock


class Action(enum.Flag):
    """What :meth:`PeerLiveness.check` asks the caller to do now."""

    NONE = 0
    HEARTBEAT = enum.auto()  # send a HEARTBEAT (it asks the peer for an answer)
    DEAD = enum.auto()  # the peer was just declared dead (reported once per death)
    RECONNECT = enum.auto()  # recreate the connection and introduce ourselves again
    REVIVED = enum.auto()  # a dead peer was heard again (reported once)


class Backoff:
    """Exponential backoff: ``initial``, ``2 * initial``, ... capped at ``maximum``."""

    def __init__(self, initial: float, maximum: float) -> None:
        if not initial > 0 or not maximum >= initial:
            raise ConfigError(
                f"backoff needs 0 < initial <= maximum, got initial={initial!r}, "
                f"maximum={maximum!r} (reliability.reconnect_initial / reconnect_max)"
            )
        self.initial = float(initial)
        self.maximum = float(maximum)
        self.attempts = 0
        self._next = self.initial

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        delay = self._next
        self.attempts += 1
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.attempts = 0
        self._next = self.initial


class PeerLiveness:
    """Liveness of one peer as seen from this end; see the module docstring."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        interval: float = 1.0,
        liveness: int = 3,
        reconnect_initial: float = 1.0,
        reconnect_max: float = 32.0,
    ) -> None:
        if not interval > 0:
            raise ConfigError(f"heartbeat interval must be > 0 seconds, got {interval!r}")
        if not isinstance(liveness, int) or liveness < 1:
            raise ConfigError(f"liveness must be an int >= 1, got {liveness!r}")
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.interval = float(interval)
        self.liveness = liveness
        self.backoff = Backoff(reconnect_initial, reconnect_max)
        now = self.clock.monotonic()
        self.last_heard = now  # a new peer gets a full grace period
        self._last_ping = now
        self.alive = True
        self.deaths = 0
        self.dead_since: float | None = None
        self._reconnect_at = 0.0
        self._revived = False

    @property
    def timeout(self) -> float:
        """Silence after which the peer is declared dead: ``interval * liveness``."""
        return self.interval * self.liveness

    @property
    def deadline(self) -> float:
        """The clock time at which the peer will be declared dead unless heard before."""
        return self.last_heard + self.timeout

    def next_due(self) -> float:
        """The earliest clock time at which :meth:`check` may have something to do."""
        ping = max(self.last_heard, self._last_ping) + self.interval
        return min(ping, self.deadline if self.alive else self._reconnect_at)

    def heard(self) -> None:
        """Any frame arrived from the peer."""
        self.last_heard = self.clock.monotonic()
        if not self.alive:
            self.alive = True
            self.dead_since = None
            self._revived = True
            self.backoff.reset()

    def reset(self) -> None:
        """Start over as if the peer was just heard (a fresh connection)."""
        self.heard()
        self._last_ping = self.last_heard

    def check(self) -> Action:
        """What is due now; call it at least every ``interval / 2``."""
        now = self.clock.monotonic()
        action = Action.NONE
        if self._revived:
            self._revived = False
            action |= Action.REVIVED
        if self.alive:
            if now - self.last_heard >= self.timeout:
                self.alive = False
                self.deaths += 1
                self.dead_since = now
                self._reconnect_at = now + self.backoff.next()
                action |= Action.DEAD
        elif now >= self._reconnect_at:
            self._reconnect_at = now + self.backoff.next()
            action |= Action.RECONNECT
        if now - max(self.last_heard, self._last_ping) >= self.interval:
            self._last_ping = now
            action |= Action.HEARTBEAT
        return action


__all__ = ["Action", "Backoff", "PeerLiveness"]
