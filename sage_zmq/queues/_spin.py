"""When a consumer's blocking read polls before it sleeps (``performance.spin_wait``).

A message that arrives while the reading thread sleeps costs the wake-ups of that thread
(and, on a VM, of an idle vCPU): about half of an ~160 us idle round trip between two
processes here. Polling for a short while first takes a message that comes soon without
them (a round trip of ~80 us, as fast as raw pyzmq's blocking PAIR), at the cost of the CPU
spent polling. So a reader polls only while most of its recent waits were short: replies in a
request/response exchange, or a stage that keeps up with its input. Records that come further
apart than the limit are waited for asleep, at no cost.
"""

from __future__ import annotations

_WEIGHT = 0.25  # of the latest wait in the moving share: a few waits turn polling on or off


class SpinPolicy:
    """The moving share of recent waits shorter than ``limit`` seconds decides; no sockets."""

    __slots__ = ("_short", "limit")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._short = 0.0

    def wants_spin(self) -> bool:
        """Poll (up to ``limit``) before the next blocking read."""
        return self._short >= 0.5

    def note(self, waited: float | None) -> None:
        """The last read's wait in seconds; None if a poll went unanswered (a long wait)."""
        short = waited is not None and waited < self.limit
        self._short = self._short * (1 - _WEIGHT) + (_WEIGHT if short else 0.0)
