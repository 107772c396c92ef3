"""DedupState: semantics, persistence across reopen and SIGKILL, growth, torn slots."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_zmq.errors import ConfigError
from sage_zmq.flow import DedupClosed, DedupState, PersistLockedError
from sage_zmq.flow.dedup import DedupCorruptionError

HEADER, SLOT = 256, 256  # format 2
NAME = 40  # offset of the name in a slot; the tag is the u64 at 32


@pytest.fixture(params=["memory", "file"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> DedupState:
    path = None if request.param == "memory" else tmp_path / "dedup.state"
    s = DedupState(path, initial_slots=2)
    request.addfinalizer(s.close)
    return s


def test_mark_and_is_duplicate(state: DedupState) -> None:
    assert state.last("a") is None and not state.is_duplicate("a", 0)
    state.mark("a", 5)
    assert [state.is_duplicate("a", s) for s in (0, 5, 6)] == [True, True, False]
    state.mark("a", 3)  # never moves down
    assert state.last("a") == 5
    state.mark("b", 0, epoch=7)
    assert state.is_duplicate("b", 0) and not state.is_duplicate("a", 6)
    assert (state.epoch("a"), state.epoch("b")) == (None, 7)
    state.mark("b", 1, epoch=8)
    assert state.epoch("b") == 8
    state.mark("c", 1)  # third producer: grows past initial_slots=2
    assert state.capacity >= 3
    assert state.producers() == {"a": 5, "b": 1, "c": 1}
    state.reset("a")
    state.reset("nobody")
    assert state.last("a") is None and not state.is_duplicate("a", 0)
    assert "a" not in state and "b" in state and len(state) == 2


def test_bad_input_is_named(state: DedupState) -> None:
    with pytest.raises(ValueError, match="seq must be an int"):
        state.mark("a", -1)
    with pytest.raises(ValueError, match="seq must be an int"):
        state.mark("a", 2**64)
    state.mark("a", 1)
    with pytest.raises(ValueError, match="seq must be an int"):
        state.mark("a", 2**64)
    with pytest.raises(ValueError, match="seq must be an int"):
        state.mark("a", "7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seq must be an int"):
        state.is_duplicate("a", "7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch must be an int"):
        state.mark("a", 2, epoch=-3)
    with pytest.raises(ValueError, match="longer than"):
        state.mark("x" * 105, 1)
    with pytest.raises(ValueError, match="non-empty str"):
        state.mark("", 1)
    assert state.last("a") == 2  # the seq of the call with a bad epoch was still recorded
    with pytest.raises(ConfigError, match="initial_slots"):
        DedupState(None, initial_slots=0)


def test_closed_state_refuses_use(state: DedupState) -> None:
    state.mark("a", 1)
    state.close()
    state.close()
    assert state.closed
    for call in (
        lambda: state.mark("a", 2),
        lambda: state.mark("new", 2),
        lambda: state.is_duplicate("a", 2),
        lambda: state.is_duplicate("new", 2),
        lambda: state.last("a"),
    ):
        with pytest.raises(DedupClosed, match="closed"):
            call()


def test_persists_across_reopen_and_grows(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dedup.state"
    names = [f"producer-{i}-é" for i in range(100)]
    with DedupState(path, initial_slots=4) as s:
        for i, name in enumerate(names):
            s.mark(name, i * 1000, epoch=i + 1)
        s.reset(names[7])
        s.sync()
        assert s.capacity == 128
    assert path.stat().st_size == HEADER + 128 * SLOT
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with DedupState(path, initial_slots=4) as s:
        expected = {n: i * 1000 for i, n in enumerate(names) if i != 7}
        assert s.producers() == expected
        assert s.epoch(names[99]) == 100
        s.mark("newcomer", 1)  # reuses the slot freed by reset: no growth
        assert s.capacity == 128
    with DedupState(path) as s:
        assert s.last("newcomer") == 1 and len(s) == 100


def test_claim_cut_short_before_its_tag_is_a_free_slot(tmp_path: Path) -> None:
    path = tmp_path / "dedup.state"
    with DedupState(path, initial_slots=4) as s:
        for name in "abc":
            s.mark(name, 10)
    data = bytearray(path.read_bytes())
    slot = HEADER + 3 * SLOT  # the free slot: name and seq written, the tag never was
    data[slot + NAME : slot + NAME + 1] = b"d"
    data[slot : slot + 8] = (77).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with DedupState(path) as s:
        assert s.producers() == {"a": 10, "b": 10, "c": 10}
        s.mark("e", 1)  # the slot is free
        assert s.capacity == 4


def test_damaged_name_is_refused_not_forgotten(tmp_path: Path) -> None:
    """A claim writes the tag last, so a tag that does not match its name is damage."""
    path = tmp_path / "dedup.state"
    with DedupState(path, initial_slots=4) as s:
        for i, name in enumerate("abcd"):
            s.mark(name, 10 + i)
    data = bytearray(path.read_bytes())
    data[HEADER + 1 * SLOT + NAME] ^= 0xFF  # the name of "b"
    path.write_bytes(bytes(data))
    with pytest.raises(DedupCorruptionError, match=rf"{path} is damaged: slot 1 .*name check"):
        DedupState(path)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-dedup"
    path.write_bytes(b"hello world, this is not a dedup table" * 10)
    with pytest.raises(ConfigError, match="not a sage-zmq dedup state file"):
        DedupState(path)


def test_one_owner_per_file(tmp_path: Path) -> None:
    path = tmp_path / "dedup.state"
    with DedupState(path), pytest.raises(PersistLockedError, match="already open"):
        DedupState(path)
    DedupState(path).close()


def test_survives_sigkill_mid_marking(tmp_path: Path) -> None:
    """Everything the killed process reported as marked is there, and no slot is torn."""
    path = tmp_path / "dedup.state"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_marker, args=(str(path), child), daemon=True)
    proc.start()
    child.close()
    try:
        reported: dict[str, int] = {}
        while len(reported) < 40 or min(reported.values()) < 200:
            assert parent.poll(60), "marking process did not report"
            producer, seq = parent.recv()
            reported[producer] = seq
    finally:
        proc.kill()  # SIGKILL
        proc.join(30)
        parent.close()
    assert proc.exitcode == -signal.SIGKILL
    with DedupState(path) as s:
        assert s.capacity >= 40  # it grew from 4 slots in the killed process
        got = s.producers()
        for producer, seq in reported.items():
            assert got[producer] >= seq
            assert s.is_duplicate(producer, seq)
        assert all(p.startswith("p") for p in got)


def _marker(path: str, conn: Connection) -> None:
    s = DedupState(path, initial_slots=4)
    seq = 0
    while True:  # runs until SIGKILLed
        seq += 1
        for i in range(50):
            s.mark(f"p{i}", seq)
        conn.send((f"p{seq % 50}", seq))


def test_mark_is_cheap(tmp_path: Path) -> None:
    """mark() is on the per-record path; a syscall or msync per call would show up here."""
    with DedupState(tmp_path / "d") as s:
        s.mark("p", 0)
        n = 200_000
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter_ns()
            for i in range(n):
                s.mark("p", i)
            best = min(best, (time.perf_counter_ns() - t0) / n)
        assert s.last("p") == n - 1
    assert best < 2_000, f"mark() costs {best:.0f} ns"


ops = st.lists(
    st.tuples(
        st.sampled_from(["mark", "reset", "check", "reopen"]),
        st.sampled_from(["a", "b", "ü", "x" * 104, "p:1", "p:2", "p:3", "p:4", "p:5"]),
        st.integers(0, 2**64 - 1) | st.integers(0, 20),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, persistent=st.booleans())
def test_matches_a_dict_model(ops: list[tuple[str, str, int]], persistent: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state") if persistent else None
        s = DedupState(path, initial_slots=1)
        model: dict[str, int] = {}
        try:
            for op, producer, seq in ops:
                if op == "mark":
                    s.mark(producer, seq)
                    model[producer] = max(model.get(producer, seq), seq)
                elif op == "reset":
                    s.reset(producer)
                    model.pop(producer, None)
                elif op == "reopen" and persistent:
                    s.close()
                    s = DedupState(path, initial_slots=1)
                expected = producer in model and seq <= model[producer]
                assert s.is_duplicate(producer, seq) == expected
                assert s.last(producer) == model.get(producer)
            assert s.producers() == model
        finally:
            s.close()
