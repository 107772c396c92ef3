"""Tests for sage_zmq.router.load: EWMAs, prediction, least-loaded choice, in simulated time."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import pytest

from sage_zmq.errors import ConfigError, RoutingError
from sage_zmq.router.load import LoadTracker


def _simulate(
    tracker: LoadTracker,
    rates: Sequence[float],
    offered: float,
    *,
    seconds: float = 40.0,
    warmup: float = 15.0,
    tick: float = 0.002,
    report_every: float = 0.05,
) -> list[float]:
    """Share of the traffic each instance got after warm-up.

    Instance ``i`` serves ``rates[i]`` records/s from a FIFO; every ``report_every`` s each
    reports its depth and consumed total; the sender offers ``offered`` records/s and routes
    each to ``least_loaded``.
    """
    n = len(rates)
    queue = [0] * n
    consumed = [0] * n
    budget = [0.0] * n
    got = [0] * n
    live = list(range(n))
    backlog = 0.0
    next_report = 0.0
    for step in range(int(seconds / tick)):
        now = step * tick
        if now >= next_report:
            for i in live:
                tracker.observe(i, queue[i], now, consumed[i])
            next_report += report_every
        backlog += offered * tick
        while backlog >= 1.0:
            backlog -= 1.0
            i = tracker.least_loaded(live, now)
            tracker.note_sent(i)
            queue[i] += 1
            if now >= warmup:
                got[i] += 1
        for i in live:
            budget[i] += rates[i] * tick
            served = min(int(budget[i]), queue[i])
            queue[i] -= served
            consumed[i] += served
            budget[i] -= served
            if queue[i] == 0:
                budget[i] = min(budget[i], 1.0)  # an idle server cannot bank capacity
    total = sum(got)
    return [g / total for g in got]


# -- steady state ------------------------------------------------------------------------------


@pytest.mark.parametrize("offered", [110.0, 130.0])
def test_ten_times_slower_instance_gets_a_tenth(offered: float) -> None:
    shares = _simulate(LoadTracker(half_life=1.0), [100.0, 10.0], offered)
    # capacity-proportional is 10/110 = 0.091 of all traffic, i.e. 1/10 of the fast one's
    assert 0.07 <= shares[1] <= 0.11, shares
    assert 0.07 <= shares[1] / shares[0] <= 0.125, shares


def test_light_load_avoids_the_slow_instance() -> None:
    # The fast one alone keeps up; a record waits 10x longer on the slow one, so it gets little.
    shares = _simulate(LoadTracker(half_life=1.0), [100.0, 10.0], 50.0)
    assert shares[1] < 0.05, shares


def test_equal_instances_share_equally_when_saturated() -> None:
    shares = _simulate(LoadTracker(half_life=1.0), [50.0, 50.0, 50.0], 160.0, seconds=20.0)
    assert all(abs(s - 1 / 3) < 0.02 for s in shares), shares


def _fifo_shares(
    tracker: LoadTracker,
    service: Callable[[int, int], float],
    n: int,
    *,
    send_every: float = 0.002,
    seconds: float = 4.0,
    measure_from: float = 2.0,
    tick: float = 0.001,
) -> list[float]:
    """Share of the records sent after ``measure_from`` that each instance got.

    Like the router: every tick each instance reports its depth (records sent and not yet
    consumed) and consumed total; one record every ``send_every`` s goes to ``least_loaded``.
    Instance ``i`` serves its records one at a time, the ``k``-th (from 0) taking
    ``service(i, k)`` seconds; nothing is served faster than a tick.
    """
    queue = [0] * n
    consumed = [0] * n
    busy_until = [0.0] * n
    got = [0] * n
    live = list(range(n))
    next_send = 0.0
    for step in range(int(seconds / tick)):
        now = step * tick
        for i in live:
            if queue[i] and busy_until[i] <= now:  # the record in service is done
                queue[i] -= 1
                consumed[i] += 1
                busy_until[i] = now + service(i, consumed[i]) if queue[i] else 0.0
            tracker.observe(i, queue[i], now, consumed[i])
        while next_send <= now:
            next_send += send_every
            i = tracker.least_loaded(live, now)
            tracker.note_sent(i)
            if not queue[i]:
                busy_until[i] = now + service(i, consumed[i])
            queue[i] += 1
            if now >= measure_from:
                got[i] += 1
    total = sum(got)
    return [g / total for g in got]


def _exponential(seed: int, means: Callable[[int, int], float]) -> Callable[[int, int], float]:
    """Service times drawn around ``means(i, k)``: jitter, so that no schedule locks in step."""
    rng = random.Random(seed)
    return lambda i, k: rng.expovariate(1.0 / means(i, k))


@pytest.mark.parametrize("seed", range(4))
def test_instance_slow_for_one_record_gets_its_share_back(seed: int) -> None:
    # Instance 0 takes 0.5 s for its first record (a consumer still starting), then is as fast
    # as the others (3 ms a record, half busy with a fair share). Its old slowness must not
    # keep it from traffic: once idle it is tried, found fast, and takes a share again. (It
    # used to get nothing more, its estimate frozen at the 0.5 s record.)
    jitter = _exponential(seed, lambda i, k: 0.003)

    def service(i: int, k: int) -> float:
        return 0.5 if i == 0 and k == 0 else jitter(i, k)

    shares = _fifo_shares(LoadTracker(half_life=0.25), service, 3)
    assert shares[0] > 0.1, shares  # a fair share is 1/3; it used to get none


@pytest.mark.parametrize("send_every", [0.002, 0.005, 0.01])
def test_probing_a_slow_instance_costs_little(send_every: float) -> None:
    # 10x slower for good (20 ms a record) beside two 2 ms ones that keep up alone: it is
    # tried now and then while idle, and each try shows it slow again.
    service = _exponential(7, lambda i, k: 0.02 if i == 0 else 0.002)
    shares = _fifo_shares(LoadTracker(half_life=0.25), service, 3, send_every=send_every)
    assert shares[0] < 0.06, shares


def _slow_once(half_life: float = 0.5) -> LoadTracker:
    """Instance 0 measured slow (one record in its first second), 1 at 100/s; both drained."""
    tr = LoadTracker(half_life=half_life)
    for i in (0, 1):
        tr.observe(i, 5, 0.0, 0)
    tr.observe(0, 5, 1.0, 1)
    tr.observe(1, 5, 1.0, 100)
    tr.observe(0, 0, 1.1, 6)
    tr.observe(1, 0, 1.1, 105)
    return tr


def _idle(tr: LoadTracker, *times: float) -> None:
    for now in times:
        tr.observe(0, 0, now, 6)
        tr.observe(1, 0, now, 105)


def test_idle_instance_with_a_stale_low_rate_ties_again() -> None:
    tr = _slow_once()
    measured = tr.service_rate(0)
    assert measured < 50.0 and tr.least_loaded([0, 1], 1.1) == 1
    # Idle from here on: the rate it is ranked by drifts to the other's in two half-lives ...
    _idle(tr, 1.6)
    assert measured * 2 < tr.service_rate(0) < tr.service_rate(1)
    _idle(tr, 2.1, 2.2)
    assert tr.service_rate(0) == pytest.approx(tr.service_rate(1))
    assert sorted(tr.least_loaded([0, 1], 2.2) for _ in range(2)) == [0, 1]  # a tie again
    # ... and the record it wins is a probe, judged at the next report: not served by then, the
    # instance is ranked by its measurement again.
    tr.note_sent(0)
    tr.observe(0, 1, 2.3, 6)
    assert tr.service_rate(0) <= measured


def test_a_slow_probe_leaves_it_slow_and_a_fast_one_makes_it_fast() -> None:
    slow = _slow_once()
    _idle(slow, 2.2)
    slow.note_sent(0)  # the probe, sent after the report at 2.2
    slow.observe(0, 1, 2.3, 6)
    slow.observe(0, 0, 2.45, 7)  # consumed within 0.25 s: at least 4/s is all it shows
    assert slow.service_rate(0) < 10.0
    assert slow.least_loaded([0, 1], 2.45) == 1
    fast = _slow_once()
    _idle(fast, 2.2)
    fast.note_sent(0)
    fast.observe(0, 0, 2.21, 7)  # served by the next report: as fast as the other, as far as known
    assert fast.service_rate(0) == pytest.approx(fast.service_rate(1))
    fast.note_sent(0)
    fast.observe(0, 1, 2.22, 7)  # this one is still there at the next report: it stops drifting,
    assert fast.service_rate(0) > 50.0  # but what the first one showed stands


# -- prediction --------------------------------------------------------------------------------


def _rising_and_steady(mode: str, *, with_consumed: bool = True) -> LoadTracker:
    # Equal consumers, 100/s each. A's depth climbs 1, 3, 5, 7, 9 (other senders outpace
    # it); B holds at 10.
    tr = LoadTracker(half_life=0.2, mode=mode)
    for step in range(5):
        now = step * 0.1
        tr.observe(0, 2 * step + 1, now, 10 * step if with_consumed else None)
        tr.observe(1, 10, now, 10 * step if with_consumed else None)
    return tr


@pytest.mark.parametrize("with_consumed", [True, False])
def test_prediction_reacts_to_rising_trend_before_depth_does(with_consumed: bool) -> None:
    now = 0.5  # the next reports, due now, would show A at 11 > B at 10
    predictive = _rising_and_steady("predictive", with_consumed=with_consumed)
    instantaneous = _rising_and_steady("instantaneous", with_consumed=with_consumed)
    assert predictive.depth_estimate(0) == 9 < predictive.depth_estimate(1) == 10
    assert predictive.predicted_depth(0, now) == pytest.approx(11.0)
    assert predictive.predicted_depth(1, now) == pytest.approx(10.0)
    assert instantaneous.least_loaded([0, 1], now) == 0  # depth alone still says A
    assert predictive.least_loaded([0, 1], now) == 1  # prediction already says B


def test_own_sends_are_not_extrapolated_twice() -> None:
    # The depth rises only because this sender sends 20/s; the trend is ours, already counted.
    tr = LoadTracker(half_life=0.2)
    for step in range(20):
        now = step * 0.1
        tr.observe(0, 2 * step, now)
        tr.note_sent(0, 2)
    assert tr.depth_estimate(0) == 38 + 2
    assert tr.predicted_depth(0, 1.95) == pytest.approx(40.0, abs=0.5)


def test_extrapolation_is_capped() -> None:
    tr = LoadTracker(half_life=1.0, max_extrapolation=0.5)
    tr.observe(0, 0, 0.0)
    tr.observe(0, 10, 1.0)  # slope 10/s
    assert tr.predicted_depth(0, 1.25) == pytest.approx(12.5)
    assert tr.predicted_depth(0, 1.5) == pytest.approx(15.0)
    assert tr.predicted_depth(0, 100.0) == pytest.approx(15.0)


def test_falling_trend_floors_at_zero() -> None:
    tr = LoadTracker(half_life=0.1)
    for step in range(10):
        tr.observe(0, max(0, 50 - 10 * step), step * 0.1)
    assert tr.predicted_depth(0, 0.95) == 0.0


# -- EWMAs and rates ---------------------------------------------------------------------------


def test_ewma_half_life_with_irregular_intervals() -> None:
    one = LoadTracker(half_life=1.0)
    one.observe(0, 0, 0.0)
    one.observe(0, 10, 1.0)
    two = LoadTracker(half_life=1.0)
    two.observe(0, 0, 0.0)
    two.observe(0, 10, 0.3)
    two.observe(0, 10, 1.0)
    assert one.estimate(0, 1.0).mean_depth == pytest.approx(5.0)
    assert two.estimate(0, 1.0).mean_depth == pytest.approx(5.0)


def test_service_and_arrival_rates_while_backlogged() -> None:
    tr = LoadTracker(half_life=0.5)
    for step in range(40):  # depth steady at 20, 30 records consumed per 0.1 s
        tr.observe(0, 20, step * 0.1, 30 * step)
    est = tr.estimate(0, 4.0)
    assert est.service_rate == pytest.approx(300.0)
    assert est.arrival_rate == pytest.approx(300.0)
    assert tr.predicted_wait(0, 3.9) == pytest.approx(21 / 300.0)


def test_capacity_from_utilization_law_when_partly_idle() -> None:
    # Busy half the time while consuming 25/s: capacity is 50/s, not the 25/s it happens to do.
    tr = LoadTracker(half_life=0.3)
    for step in range(40):
        tr.observe(0, step % 2, step * 0.1, int(2.5 * step))
    assert tr.service_rate(0) == pytest.approx(50.0, rel=0.1)


def test_never_seen_busy_instance_is_taken_for_fast() -> None:
    tr = LoadTracker(half_life=0.3)
    for step in range(20):
        tr.observe(0, 0, step * 0.1, 3 * step)  # 30/s, never a queue at report time
    assert tr.service_rate(0) >= 30.0 / 0.05 * 0.99


def test_instance_without_traffic_keeps_its_estimate() -> None:
    tr = LoadTracker(half_life=0.1)
    tr.observe(0, 5, 0.0, 0)
    tr.observe(0, 5, 0.1, 10)  # backlogged: 100/s
    tr.observe(0, 0, 0.15, 15)  # drained
    for step in range(2, 12):  # then nothing sent, nothing consumed, for seconds
        tr.observe(0, 0, step * 0.1, 15)
    settled = tr.service_rate(0)
    for step in range(12, 600):
        tr.observe(0, 0, step * 0.1, 15)
    assert 80.0 < tr.service_rate(0) == settled < 150.0


def test_a_consumer_late_to_start_is_not_taken_for_slow() -> None:
    # Two equal 1000/s consumers, reported every ms. Instance 1 is not scheduled for its first
    # 20 ms (full, consuming nothing), then drains its 16 records. Its 20 ms of nothing must
    # weigh as 20 ms, not as a whole half-life: once empty it is the better choice again.
    tr = LoadTracker(half_life=0.25)
    for ms in range(37):
        now = ms / 1000
        tr.observe(0, 8, now, ms)
        tr.observe(1, 16 if ms <= 20 else 36 - ms, now, 0 if ms <= 20 else ms - 20)
    assert tr.depth_estimate(1) == 0
    assert tr.service_rate(1) > 300.0
    assert tr.least_loaded([0, 1], 0.036) == 1


def test_unknown_service_rate_uses_fleet_mean_then_default() -> None:
    tr = LoadTracker(default_service_rate=4.0)
    assert tr.service_rate(7) == 4.0
    assert tr.predicted_wait(7, 0.0) == pytest.approx(1 / 4.0)
    for i, rate in ((0, 10), (1, 30)):
        tr.observe(i, 5, 0.0, 0)
        tr.observe(i, 5, 1.0, rate)
    assert tr.service_rate(7) == pytest.approx(20.0)


def test_stalled_instance_gets_large_finite_wait() -> None:
    tr = LoadTracker(min_service_rate=0.01)
    tr.observe(0, 5, 0.0, 100)
    tr.observe(0, 5, 1.0, 100)  # backlogged, consumed nothing
    w = tr.predicted_wait(0, 1.0)
    assert math.isfinite(w) and w == pytest.approx(600.0)


def test_consumer_restart_resets_baseline() -> None:
    tr = LoadTracker(half_life=0.1)
    tr.observe(0, 5, 0.0, 1000)
    tr.observe(0, 5, 0.1, 1010)
    tr.observe(0, 5, 0.2, 3)  # counter went back: a restart, not -1007 records
    tr.observe(0, 5, 0.3, 13)
    assert tr.service_rate(0) == pytest.approx(100.0)


def test_note_sent_counts_until_next_report() -> None:
    tr = LoadTracker()
    tr.observe(0, 3, 0.0)
    tr.note_sent(0)
    tr.note_sent(0, 4)
    assert tr.depth_estimate(0) == 8
    tr.observe(0, 6, 0.5)
    assert tr.depth_estimate(0) == 6
    tr.note_sent(9)  # never reported: counts from zero
    assert tr.depth_estimate(9) == 1


def test_same_instant_report_replaces_level() -> None:
    tr = LoadTracker()
    tr.observe(0, 3, 1.0)
    tr.observe(0, 7, 1.0)
    tr.observe(0, 2, 0.5)  # out of order: taken as a level, no rate from it
    assert tr.depth_estimate(0) == 2
    assert tr.estimate(0, 1.0).arrival_rate is None


# -- choice and membership ---------------------------------------------------------------------


def test_least_loaded_matches_load_argmin() -> None:
    rng = random.Random(3)
    for mode in ("predictive", "instantaneous"):
        tr = LoadTracker(half_life=0.3, mode=mode)
        for step in range(30):
            now = step * 0.1
            for i in range(5):
                tr.observe(i, rng.randint(0, 50), now, step * rng.randint(1, 9))
            if step % 3 == 0:
                tr.note_sent(rng.randint(0, 5), rng.randint(1, 5))
            later = now + 0.05
            live = rng.sample(range(6), rng.randint(1, 6))
            pick = tr.least_loaded(live, later)
            assert tr.load(pick, later) == pytest.approx(min(tr.load(i, later) for i in live))


def test_ties_rotate() -> None:
    tr = LoadTracker()
    for i in (0, 1, 2):
        tr.observe(i, 4, 0.0)
    assert [tr.least_loaded([2, 0, 1], 0.0) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_added_instance_gets_traffic_and_removed_one_none() -> None:
    tr = LoadTracker(mode="instantaneous")
    for i in (0, 1):
        tr.observe(i, 10, 0.0)
    picks = []
    for _ in range(10):
        pick = tr.least_loaded([0, 1, 2], 0.0)  # 2 just joined, no report yet
        tr.note_sent(pick)
        picks.append(pick)
    assert picks == [2] * 10
    tr.forget(2)
    assert tr.instances == (0, 1)
    assert tr.least_loaded([0, 1], 0.0) in (0, 1)
    tr.retain([1])
    assert tr.instances == (1,)
    tr.forget(42)  # unknown: ignored


def test_removed_instance_is_never_chosen() -> None:
    shares = []
    tr = LoadTracker()
    for i in range(3):
        tr.observe(i, 0, 0.0)
    for _ in range(30):
        pick = tr.least_loaded([0, 2], 0.0)
        tr.note_sent(pick)
        shares.append(pick)
    assert set(shares) == {0, 2}


def test_single_and_empty_live() -> None:
    tr = LoadTracker()
    assert tr.least_loaded([5], 0.0) == 5
    with pytest.raises(RoutingError, match="no live instance"):
        tr.least_loaded([], 0.0)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "psychic"}, "mode must be one of predictive, instantaneous"),
        ({"half_life": 0}, "half_life must be a number > 0"),
        ({"half_life": math.inf}, "half_life must be finite"),
        ({"min_service_rate": -1}, "min_service_rate"),
        ({"default_service_rate": "fast"}, "default_service_rate"),
        ({"max_extrapolation": -1}, "max_extrapolation"),
    ],
)
def test_bad_configuration(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LoadTracker(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("depth", "consumed", "match"),
    [(-1, None, "depth must be"), (1.5, None, "depth must be"), (1, -3, "consumed_total")],
)
def test_bad_report(depth: object, consumed: object, match: str) -> None:
    with pytest.raises(RoutingError, match=match):
        LoadTracker().observe(0, depth, 0.0, consumed)  # type: ignore[arg-type]
