"""Tests for sage_zmq.router.strategies: choices, fairness under churn, errors, factory."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from sage_zmq.errors import RoutingError
from sage_zmq.router.keys import instance_for_key
from sage_zmq.router.load import LoadTracker
from sage_zmq.router.strategies import (
    STRATEGY_NAMES,
    BroadcastStrategy,
    HashStrategy,
    LoadBalanceStrategy,
    RoundRobinStrategy,
    Strategy,
    make_strategy,
)


def _picks(strategy: Strategy, live: Sequence[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        sel = strategy.select(live)
        assert len(sel) == 1
        out.append(sel[0])
    return out


# -- round robin -------------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    rr = RoundRobinStrategy()
    assert _picks(rr, (0, 1, 2), 7) == [0, 1, 2, 0, 1, 2, 0]
    assert _picks(RoundRobinStrategy(), [4, 9], 4) == [4, 9, 4, 9]


def test_round_robin_empty_live_selects_nobody() -> None:
    rr = RoundRobinStrategy()
    assert rr.select(()) == ()
    assert rr.select([3]) == (3,)


def test_round_robin_removal_continues_with_successor() -> None:
    rr = RoundRobinStrategy()
    assert _picks(rr, [0, 1, 2, 3], 2) == [0, 1]
    # 1 was last; 2 is removed: the cycle goes on with 3, not back to 0 or past 3.
    assert _picks(rr, [0, 1, 3], 4) == [3, 0, 1, 3]
    # the last chosen (3) is removed: its successor (0, after wrap) is next.
    assert _picks(rr, [0, 1], 3) == [0, 1, 0]


def test_round_robin_removal_of_last_chosen_mid_list() -> None:
    rr = RoundRobinStrategy()
    assert _picks(rr, [0, 1, 2, 3], 2) == [0, 1]
    assert _picks(rr, [0, 2, 3], 3) == [2, 3, 0]


def test_round_robin_addition_gets_its_turn() -> None:
    rr = RoundRobinStrategy()
    assert _picks(rr, [1, 2], 1) == [1]
    assert _picks(rr, [0, 1, 2, 5], 5) == [2, 5, 0, 1, 2]
    # added before the cursor: no skip, no repeat
    rr = RoundRobinStrategy()
    assert _picks(rr, [1, 2, 3], 2) == [1, 2]
    assert _picks(rr, [0, 1, 2, 3], 3) == [3, 0, 1]


def test_round_robin_fair_under_random_churn() -> None:
    import random

    rng = random.Random(7)
    rr = RoundRobinStrategy()
    everyone = list(range(6))
    live = list(everyone)
    counts: Counter[int] = Counter()
    for step in range(6000):
        if step % 50 == 0:
            live = sorted(rng.sample(everyone, rng.randint(1, 6)))
        (inst,) = rr.select(live)
        assert inst in live
        counts[inst] += 1
    # Expected shares from replaying the same membership sequence.
    rng = random.Random(7)
    expected: Counter[int] = Counter()
    for step in range(6000):
        if step % 50 == 0:
            live = sorted(rng.sample(everyone, rng.randint(1, 6)))
        for i in live:
            expected[i] += 1 / len(live)
    for i in everyone:
        assert abs(counts[i] - expected[i]) <= 0.03 * expected[i] + 60, (counts, expected)


def test_round_robin_equal_share_between_changes() -> None:
    rr = RoundRobinStrategy()
    _picks(rr, [0, 1, 2, 3, 4], 3)
    c = Counter(_picks(rr, [0, 2, 4], 30))
    assert c == {0: 10, 2: 10, 4: 10}


def test_round_robin_in_place_mutation_does_not_index_error() -> None:
    rr = RoundRobinStrategy()
    live = [0, 1, 2, 3]
    _picks(rr, live, 4)
    live.pop()
    live.pop()
    assert _picks(rr, live, 4) == [0, 1, 0, 1]


# -- hash --------------------------------------------------------------------------------------


def test_hash_matches_instance_for_key_over_sorted_configuration() -> None:
    h = HashStrategy()
    configured = [7, 3, 11, 5]  # unsorted on purpose
    ordered = sorted(configured)
    for i in range(300):
        key = f"k{i}"
        expect = ordered[instance_for_key(key, 4)]
        assert h.target(key, configured) == expect
        assert h.select(configured, key, configured) == (expect,)


def test_hash_same_key_same_instance_and_spread() -> None:
    h = HashStrategy()
    live = (0, 1, 2)
    owners = {h.select(live, f"user-{i}", live)[0] for i in range(200)}
    assert owners == {0, 1, 2}
    assert all(h.select(live, "x", live) == h.select(live, "x", live) for _ in range(5))


def test_hash_dead_owner_selects_nobody_and_others_unaffected() -> None:
    h = HashStrategy()
    configured = (0, 1, 2, 3)
    keys = [f"k{i}" for i in range(200)]
    owner = {k: h.target(k, configured) for k in keys}
    live = (0, 1, 3)  # 2 is down
    for k in keys:
        sel = h.select(live, k, configured)
        if owner[k] == 2:
            assert sel == ()
        else:
            assert sel == (owner[k],)
    assert any(owner[k] == 2 for k in keys)


def test_hash_without_configuration_uses_live() -> None:
    h = HashStrategy()
    assert h.select([2, 9], "abc") == ((2, 9)[instance_for_key("abc", 2)],)
    assert h.select([], "abc") == ()


def test_hash_reconfiguration_is_picked_up() -> None:
    h = HashStrategy()
    cfg = [0, 1]
    key = next(f"k{i}" for i in range(1000) if instance_for_key(f"k{i}", 3) == 2)
    h.select(cfg, key, cfg)
    cfg.append(2)  # mutated in place: must not use a stale cached configuration
    assert h.select(cfg, key, cfg) == (2,)


def test_hash_custom_max_parallelism() -> None:
    h = HashStrategy(max_parallelism=16)
    assert h.max_parallelism == 16
    assert h.target("abc", (0, 1, 2)) == instance_for_key("abc", 3, 16)


def test_hash_errors() -> None:
    h = HashStrategy(max_parallelism=4)
    with pytest.raises(RoutingError, match="partition_key"):
        h.select((0, 1), None, (0, 1))
    with pytest.raises(RoutingError, match="max_parallelism"):
        h.select(range(5), "k", range(5))
    with pytest.raises(RoutingError, match="duplicates"):
        h.select((0, 1), "k", (0, 1, 1))
    with pytest.raises(RoutingError, match="at least one"):
        h.target("k", ())
    with pytest.raises(RoutingError, match="max_parallelism"):
        HashStrategy(max_parallelism=0)


# -- broadcast ---------------------------------------------------------------------------------


def test_broadcast_all_live() -> None:
    b = BroadcastStrategy()
    assert b.fanout is True
    assert b.select((0, 2, 5)) == (0, 2, 5)
    assert b.select([1, 3], "key-ignored") == (1, 3)
    assert b.select([]) == ()


# -- load balance ------------------------------------------------------------------------------


def test_load_balance_picks_least_loaded_and_counts_sends() -> None:
    tr = LoadTracker(mode="instantaneous")
    tr.observe(0, 5, 0.0)
    tr.observe(1, 2, 0.0)
    lb = LoadBalanceStrategy(tr, clock=lambda: 0.0)
    # 1 is at 2, 0 at 5: three sends fill 1 up to 5, then they alternate
    assert _picks(lb, (0, 1), 3) == [1, 1, 1]
    assert tr.depth_estimate(1) == 5
    assert sorted(_picks(lb, (0, 1), 4)) == [0, 0, 1, 1]


def test_load_balance_equal_loads_spread_round_robin() -> None:
    lb = LoadBalanceStrategy(LoadTracker(), clock=lambda: 0.0, note_on_select=False)
    assert _picks(lb, (0, 1, 2), 6) == [0, 1, 2, 0, 1, 2]


def test_load_balance_without_noting_and_empty() -> None:
    tr = LoadTracker(mode="instantaneous")
    lb = LoadBalanceStrategy(tr, clock=lambda: 0.0, note_on_select=False)
    assert lb.select(()) == ()
    lb.select((0, 1))
    assert tr.depth_estimate(0) == tr.depth_estimate(1) == 0


@pytest.mark.parametrize("served", [True, False])
def test_load_balance_tries_an_idle_instance_again(served: bool) -> None:
    now = 0.0
    tr = LoadTracker(half_life=0.5)
    lb = LoadBalanceStrategy(tr, clock=lambda: now)
    for step in range(16):  # 0 serves 2 records a second, 1 serves 100; both drained by 7.5 s
        t = step * 0.5
        tr.observe(0, max(0, 5 - max(0, step - 10)), t, step)
        tr.observe(1, 5 if step < 10 else 0, t, 50 * min(step, 10) + (5 if step > 10 else 0))
    now = 7.5
    assert _picks(lb, (0, 1), 6) == [1] * 6  # measured slow: avoided
    for t in (8.0, 8.5):  # two half-lives with nothing to do
        tr.observe(0, 0, t, 15)
        tr.observe(1, 0, t, 505)
    now = 8.5
    # Idle that long, it is as good a bet as the other again (it used to get nothing, ever).
    assert _picks(lb, (0, 1), 6) == [0, 1, 0, 1, 0, 1]
    # The next report judges: all 3 served by then, it stays an equal; not, it is slow again.
    tr.observe(0, 0 if served else 3, 8.502, 18 if served else 15)
    tr.observe(1, 0, 8.502, 508)
    now = 8.502
    assert _picks(lb, (0, 1), 6) == ([0, 1, 0, 1, 0, 1] if served else [1] * 6)


# -- protocol and factory ----------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_make_strategy_by_name(name: str) -> None:
    s = make_strategy(name)
    assert s.name == name
    assert isinstance(s, Strategy)
    assert isinstance(s.select((0, 1), "k", (0, 1)), tuple)


def test_make_strategy_forgives_case_and_dashes_and_passes_options() -> None:
    assert isinstance(make_strategy("Round-Robin"), RoundRobinStrategy)
    h = make_strategy("hash", max_parallelism=64)
    assert isinstance(h, HashStrategy) and h.max_parallelism == 64
    tr = LoadTracker()
    lb = make_strategy("load_balance", predictor=tr)
    assert isinstance(lb, LoadBalanceStrategy) and lb.tracker is tr


def test_make_strategy_unknown_name_suggests() -> None:
    with pytest.raises(RoutingError) as err:
        make_strategy("round_robbin")
    msg = str(err.value)
    assert "did you mean 'round_robin'" in msg
    for known in STRATEGY_NAMES:
        assert known in msg
    with pytest.raises(RoutingError, match="known: round_robin"):
        make_strategy("zzz")


def test_make_strategy_bad_options_and_name_type() -> None:
    with pytest.raises(RoutingError, match="bad options for strategy 'broadcast'"):
        make_strategy("broadcast", max_parallelism=3)
    with pytest.raises(RoutingError, match="must be a str"):
        make_strategy(None)  # type: ignore[arg-type]
