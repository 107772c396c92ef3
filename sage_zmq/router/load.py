"""Per-instance load from receiver reports, with a short-term prediction.

Each downstream instance periodically reports its queue depth (records not yet consumed) and,
optionally, the total number of records it has consumed. Between two reports this sender adds
what it has sent since (``note_sent``). From consecutive reports the tracker keeps EWMAs
(half-life in seconds, irregular intervals allowed) of depth, depth slope, arrival rate, this
sender's own send rate, throughput and utilisation (share of time with depth > 0); the rate
EWMAs weigh each sample by the time it covers from the first one, so a few milliseconds of a
slow start do not stand for a whole half-life. Capacity is throughput / utilisation (the
utilisation law), which stays right for a mostly idle instance, where throughput alone would
only measure the traffic it happened to get.

An idle instance (nothing queued, nothing consumed) is not being measured, so a low capacity
from its past would never be corrected: it would get no traffic because it looks slow, and look
slow because it gets no traffic (one slow first record, e.g. a consumer still starting, would
starve it for good; so would a fleet mean pulled down by such an instance, for one never
measured). So while an instance is idle, the capacity it is *ranked* by drifts from its own
(or the fleet's) to the fastest other instance's, linearly over two half-lives: idle instances
end up tied. A record it wins on the drifted rate is a probe, judged at the next report: served
by then, it was served as fast as reports can tell, and the instance keeps its drifted rank;
still queued, the instance is ranked by its measurement again. A probe consumed ``t`` seconds
after it was sent shows a capacity of at least ``1 / t``: the measurement is raised to that (at
most to the rate the probe was won with). A slow instance so costs a probe now and then and
stays measured slow; one that was slow only for a while takes its share again.

Time is always passed in (``now``, monotonic seconds); nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sage_zmq.errors import ConfigError, RoutingError

MODES = ("predictive", "instantaneous")
_MIN_UTIL = 0.05


class _Stat:
    __slots__ = (
        "arrival",
        "consumed",
        "depth",
        "eff",
        "ewma_depth",
        "idle_from",
        "own",
        "probe_rate",
        "probe_t",
        "rate",
        "rated",
        "sent",
        "slope",
        "t",
        "throughput",
        "util",
        "weight",
    )

    def __init__(self) -> None:
        self.depth = 0  # last reported depth
        self.t: float | None = None  # time of the last report
        self.sent = 0  # sent by us since the last report
        self.consumed: int | None = None  # last reported consumed_total
        self.ewma_depth = 0.0
        self.slope = 0.0  # d(depth)/dt, records/s, all senders
        self.own = 0.0  # our send rate, records/s
        self.rated = False  # slope and own hold a sample (else they start from it)
        self.rate: float | None = None  # capacity, records/s; None: use the fleet's
        self.eff: float | None = None  # capacity to rank by: ``rate``, or drifted while idle
        self.idle_from: float | None = None  # report time since which it is idle, if it is
        self.probe_rate: float | None = None  # a probe is out, won with this ranking rate
        self.probe_t = 0.0  # the last report before the probe was sent
        # EWMAs from zero; divide by ``weight`` (how much of them is data, 0: none yet).
        self.throughput = 0.0  # consumed/s
        self.util = 0.0  # fraction of time with work (depth > 0)
        self.arrival = 0.0  # records/s, all senders
        self.weight = 0.0


@dataclass(frozen=True, slots=True)
class LoadEstimate:
    """A snapshot of one instance's load, for metrics and benchmarks."""

    instance: int
    reported_depth: int
    sent_since_report: int
    depth_estimate: int
    predicted_depth: float
    mean_depth: float
    arrival_rate: float | None
    service_rate: float | None
    predicted_wait: float


class LoadTracker:
    """Live load per downstream instance, and the least-loaded choice among them.

    ``mode="predictive"`` ranks instances by :meth:`predicted_wait`; ``mode="instantaneous"``
    ranks them by the current depth estimate alone (last report + sent since), the baseline a
    benchmark compares against.

    Service rates need ``consumed_total`` in the reports. ``default_service_rate`` is assumed
    for an instance with no service-rate history while no instance has any; otherwise such an
    instance gets the mean rate of those that have one.
    Service rates are floored at ``min_service_rate`` so a stalled instance gets a large but
    finite wait; an idle instance's rate drifts toward the others' and is probed (module doc),
    so a stale low estimate cannot starve it. Trend extrapolation past the last report is capped
    at ``max_extrapolation`` seconds (default: one half-life) so a silent instance's prediction
    does not run away.
    """

    def __init__(
        self,
        half_life: float = 1.0,
        *,
        mode: str = "predictive",
        default_service_rate: float = 1.0,
        min_service_rate: float = 1e-3,
        max_extrapolation: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"load tracker mode must be one of {', '.join(MODES)}; got {mode!r}")
        _positive("half_life", half_life)
        _positive("default_service_rate", default_service_rate)
        _positive("min_service_rate", min_service_rate)
        if max_extrapolation is None:
            max_extrapolation = half_life
        elif not (isinstance(max_extrapolation, int | float) and max_extrapolation >= 0):
            raise ConfigError(f"max_extrapolation must be a number >= 0, got {max_extrapolation!r}")
        self.half_life = float(half_life)
        self.mode = mode
        self.default_service_rate = float(default_service_rate)
        self.min_service_rate = float(min_service_rate)
        self.max_extrapolation = float(max_extrapolation)
        self._predictive = mode == "predictive"
        self._stats: dict[int, _Stat] = {}
        self._fleet_rate = self.default_service_rate
        # The two fastest measured instances: the fastest *other* one is what an idle instance
        # drifts to, looked up per report, so not worth a pass over the fleet each time.
        self._best: tuple[_Stat | None, float | None, float | None] = (None, None, None)
        self._last_pick: int | None = None

    # -- input ---------------------------------------------------------------------------

    def observe(
        self, instance: int, depth: int, now: float, consumed_total: int | None = None
    ) -> None:
        """Record a receiver-reported load sample for ``instance`` taken at ``now``."""
        if type(depth) is not int or depth < 0:
            raise RoutingError(
                f"load report for instance {instance}: depth must be an int >= 0, got {depth!r}"
            )
        if consumed_total is not None and (type(consumed_total) is not int or consumed_total < 0):
            raise RoutingError(
                f"load report for instance {instance}: consumed_total must be an int >= 0 "
                f"or None, got {consumed_total!r}"
            )
        s = self._stats.get(instance)
        if s is None:
            s = self._stats[instance] = _Stat()
        dt = -1.0 if s.t is None else now - s.t
        if dt <= 0:
            # First report, or a second one at the same instant: a level, not a rate.
            if s.t is None:
                s.ewma_depth = float(depth)
                s.t = now
            s.depth = depth
            s.sent = 0
            if consumed_total is not None:
                s.consumed = consumed_total
            return

        alpha = 1.0 - 0.5 ** (dt / self.half_life)
        slope = (depth - s.depth) / dt
        if s.rated:
            s.slope += alpha * (slope - s.slope)
            s.own += alpha * (s.sent / dt - s.own)
        else:
            s.slope = slope
            s.own = s.sent / dt
            s.rated = True
        s.ewma_depth += alpha * (depth - s.ewma_depth)
        if consumed_total is not None:
            if s.consumed is not None and consumed_total >= s.consumed:
                done = (consumed_total - s.consumed) / dt
                arrival = max(slope + done, 0.0)
                # Utilisation law: capacity = throughput / fraction of time busy. It holds
                # when the instance is mostly idle too, so a lightly used instance is neither
                # taken for slow (its throughput alone) nor for fast (the fleet's rate).
                busy = ((s.depth > 0) + (depth > 0)) * 0.5
                s.arrival += alpha * (arrival - s.arrival)
                s.throughput += alpha * (done - s.throughput)
                s.util += alpha * (busy - s.util)
                s.weight += alpha * (1.0 - s.weight)
                if s.util >= _MIN_UTIL * s.weight:
                    s.rate = s.throughput / s.util  # the weights cancel
                    self._refresh_fleet_rate()
                elif s.throughput > 0:
                    # Consuming but hardly ever seen busy: fast, by at least this much. Only
                    # ever raise it here, so an instance that stops getting traffic keeps its
                    # estimate instead of decaying into starvation.
                    floor = s.throughput / s.weight / _MIN_UTIL
                    if s.rate is None or floor > s.rate:
                        s.rate = floor
                        self._refresh_fleet_rate()
                # A probe served by the first report since it went out (s.t is still the
                # one before it): as fast as reports can tell, so it keeps drifting.
                served = False
                if s.probe_rate is not None:
                    served = s.t == s.probe_t and done > 0 and depth == 0
                    if done:
                        self._probe_done(s, s.probe_rate, now)
                    elif not depth:
                        s.probe_rate = None  # left the queue unreported (lost, taken back)
                if busy or done:
                    if not served:
                        s.idle_from = None
                elif s.idle_from is None:
                    s.idle_from = s.t  # idle since the previous report
            # A lower total means the receiver restarted: just take the new baseline.
            s.consumed = consumed_total
            s.eff = self._ranking_rate(s, now)
        s.depth = depth
        s.t = now
        s.sent = 0

    def note_sent(self, instance: int, n: int = 1) -> None:
        """Count ``n`` records sent to ``instance`` since its last report."""
        s = self._stats.get(instance)
        if s is None:
            s = self._stats[instance] = _Stat()
        s.sent += n
        if s.idle_from is not None and s.probe_rate is None and s.t is not None:
            base = self._fleet_rate if s.rate is None else s.rate
            if s.eff is not None and s.eff > base:
                # Won on the drifted rate: a probe, judged at the next report.
                s.probe_rate = s.eff
                s.probe_t = s.t

    def forget(self, instance: int) -> None:
        """Drop all state for an instance that left the group (unknown ones are ignored)."""
        if self._stats.pop(instance, None) is not None:
            self._refresh_fleet_rate()
        if self._last_pick == instance:
            self._last_pick = None

    def retain(self, instances: Iterable[int]) -> None:
        """Forget every instance not in ``instances``."""
        keep = set(instances)
        for inst in [i for i in self._stats if i not in keep]:
            self.forget(inst)

    @property
    def instances(self) -> tuple[int, ...]:
        """Instances with state (observed or sent to), sorted."""
        return tuple(sorted(self._stats))

    def _refresh_fleet_rate(self) -> None:
        total = 0.0
        n = 0
        top: _Stat | None = None
        first: float | None = None
        second: float | None = None
        for s in self._stats.values():
            r = s.rate
            if r is None:
                continue
            total += r
            n += 1
            if first is None or r > first:
                top, first, second = s, r, first
            elif second is None or r > second:
                second = r
        self._fleet_rate = total / n if n else self.default_service_rate
        self._best = (top, first, second)

    def _ranking_rate(self, s: _Stat, now: float) -> float | None:
        """``s.rate``, or while ``s`` is idle, that drifted toward the fastest other's."""
        if s.idle_from is None:
            return s.rate
        top, first, second = self._best
        best = second if top is s else first
        base = self._fleet_rate if s.rate is None else s.rate
        if best is None or base >= best:
            return s.rate  # nothing faster to drift to: it keeps its estimate while idle
        # Linear, so that it does get there: idle instances then share by ties, where an
        # exponential approach would leave this one forever just behind.
        k = (now - s.idle_from) / (2.0 * self.half_life)
        return best if k >= 1.0 else base + (best - base) * k

    def _probe_done(self, s: _Stat, won_with: float, now: float) -> None:
        """The probe sent to idle ``s`` was consumed by ``now``: a capacity it has shown."""
        s.probe_rate = None
        shown = min(1.0 / max(now - s.probe_t, 1e-9), won_with)
        if s.rate is not None and shown <= s.rate:
            return
        s.rate = shown
        # The EWMAs must say the same, or the next busy report would bring back the ratio of
        # the old episode the probe has just outdated.
        s.throughput = shown * s.util
        self._refresh_fleet_rate()

    # -- output --------------------------------------------------------------------------

    def depth_estimate(self, instance: int) -> int:
        """Last reported depth plus what was sent since that report."""
        s = self._stats.get(instance)
        return 0 if s is None else s.depth + s.sent

    def predicted_depth(self, instance: int, now: float) -> float:
        """Depth expected at ``now``: the estimate plus the trend not caused by this sender."""
        s = self._stats.get(instance)
        if s is None:
            return 0.0
        d = float(s.depth + s.sent)
        if s.t is not None:
            h = min(now - s.t, self.max_extrapolation)
            if h > 0:
                d += (s.slope - s.own) * h
        return d if d > 0 else 0.0

    def service_rate(self, instance: int) -> float:
        """Records/s the instance is expected to consume (its history, else the fleet's).

        While the instance is idle, its history drifted toward the others' (module doc).
        """
        s = self._stats.get(instance)
        r = self._fleet_rate if s is None or s.eff is None else s.eff
        return r if r > self.min_service_rate else self.min_service_rate

    def predicted_wait(self, instance: int, now: float) -> float:
        """Seconds until a record sent now is served: ``(predicted depth + 1) / service rate``.

        The ``+ 1`` is the record itself, so among empty instances the faster one wins.
        """
        return (self.predicted_depth(instance, now) + 1.0) / self.service_rate(instance)

    def load(self, instance: int, now: float) -> float:
        """The ranking score: predicted wait (predictive) or depth estimate (instantaneous)."""
        if self._predictive:
            return self.predicted_wait(instance, now)
        return float(self.depth_estimate(instance))

    def least_loaded(self, live_instances: Sequence[int], now: float) -> int:
        """The live instance with the lowest :meth:`load`; ties rotate round robin."""
        if not live_instances:
            raise RoutingError("no live instance to choose from; wait for a downstream instance")
        if len(live_instances) == 1:
            pick = live_instances[0]
            self._last_pick = pick
            return pick
        # Per-packet hot path: load() inlined, one pass, no allocation unless there is a tie.
        get = self._stats.get
        predictive = self._predictive
        fleet = self._fleet_rate
        floor = self.min_service_rate
        horizon = self.max_extrapolation
        best = math.inf
        tol = 0.0
        ties: list[int] = []
        for i in live_instances:
            s = get(i)
            if s is None:
                w = 1.0 / (fleet if fleet > floor else floor) if predictive else 0.0
            elif predictive:
                d = float(s.depth + s.sent)
                if s.t is not None:
                    h = now - s.t
                    if h > horizon:
                        h = horizon
                    if h > 0:
                        d += (s.slope - s.own) * h
                        if d < 0:
                            d = 0.0
                r = fleet if s.eff is None else s.eff
                w = (d + 1.0) / (r if r > floor else floor)
            else:
                w = float(s.depth + s.sent)
            if w < best - tol:
                best = w
                tol = w * 1e-9 + 1e-12
                ties = [i]
            elif w <= best + tol:
                ties.append(i)
        if len(ties) == 1:
            pick = ties[0]
        else:
            last = self._last_pick
            after = [i for i in ties if last is not None and i > last]
            pick = min(after) if after else min(ties)
        self._last_pick = pick
        return pick

    def estimate(self, instance: int, now: float) -> LoadEstimate:
        """Everything known about one instance, at ``now``."""
        s = self._stats.get(instance) or _Stat()
        return LoadEstimate(
            instance=instance,
            reported_depth=s.depth,
            sent_since_report=s.sent,
            depth_estimate=s.depth + s.sent,
            predicted_depth=self.predicted_depth(instance, now),
            mean_depth=s.ewma_depth,
            arrival_rate=s.arrival / s.weight if s.weight else None,
            service_rate=s.eff,
            predicted_wait=self.predicted_wait(instance, now),
        )


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")


__all__ = ["MODES", "LoadEstimate", "LoadTracker"]
