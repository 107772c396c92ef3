"""A consumer polls before it sleeps only while its waits are short (performance.spin_wait).

How much it saves: ``python -m sage_zmq.bench --only core`` (the idle round trip rows), and
``SAGE_ZMQ__PERFORMANCE__SPIN_WAIT=0`` for the same without polling.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import zmq

from sage_zmq import ConfigError, load_config
from sage_zmq.queues._spin import SpinPolicy
from sage_zmq.queues._zmq import RouterInlet, SocketOptions
from sage_zmq.wire.codec import Codec

# ------------------------------------------------------------------ the policy, no sockets


def test_polling_starts_after_a_few_short_waits() -> None:
    policy = SpinPolicy(0.0002)
    assert not policy.wants_spin()  # a new reader sleeps
    for _ in range(2):
        policy.note(0.00005)
    assert not policy.wants_spin()  # one or two quick replies are not yet a pattern
    policy.note(0.00005)
    assert policy.wants_spin()


def test_polling_stops_when_polls_go_unanswered() -> None:
    policy = SpinPolicy(0.0002)
    for _ in range(20):
        policy.note(0.0)
    policy.note(None)  # one late reply does not end it
    assert policy.wants_spin()
    for _ in range(3):
        policy.note(None)
    assert not policy.wants_spin()


def test_waits_longer_than_the_limit_never_start_polling() -> None:
    policy = SpinPolicy(0.0002)
    for _ in range(50):
        policy.note(0.0003)
    assert not policy.wants_spin()


def test_a_zero_limit_never_polls() -> None:
    policy = SpinPolicy(0.0)
    for _ in range(50):
        policy.note(0.0)
    assert not policy.wants_spin()


# ------------------------------------------------------------------ on a real socket


@pytest.fixture
def inlet_and_sender(tmp_path: Any) -> Any:
    endpoint = f"ipc://{tmp_path}/spin.sock"
    inlet = RouterInlet(endpoint, Codec(), SocketOptions(spin_wait=0.05), queue_id="spin")
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(endpoint)
    try:
        yield inlet, dealer
    finally:
        dealer.close()
        inlet.close()


def _frame(codec: Codec, seq: int) -> bytes:
    frame, _, _ = codec.encode_batch("p", seq, [seq])
    return frame


class _Recording(SpinPolicy):
    """A SpinPolicy that keeps what it was told."""

    def __init__(self, limit: float) -> None:
        super().__init__(limit)
        self.notes: list[float | None] = []

    def note(self, waited: float | None) -> None:
        self.notes.append(waited)
        super().note(waited)


def _send_later(dealer: Any, frame: bytes, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, lambda: dealer.send(frame))
    timer.start()
    return timer


def test_a_polling_read_takes_what_arrives_and_gives_up_at_its_timeout(
    inlet_and_sender: Any,
) -> None:
    inlet, dealer = inlet_and_sender
    codec = Codec()
    policy = inlet.spin = _Recording(0.05)
    for seq in range(3):  # records that come soon after the read starts: short waits
        timer = _send_later(dealer, _frame(codec, seq), 0.005)
        assert [e[5] for e in inlet.recv(5.0)] == [[seq]]
        timer.join()
    assert policy.wants_spin() and all(w is not None and w < 0.05 for w in policy.notes)
    timer = _send_later(dealer, _frame(codec, 3), 0.01)
    assert [e[5] for e in inlet.recv(5.0)] == [[3]]  # taken while the read polls
    timer.join()
    assert policy.notes[-1] == 0.0  # a poll that was answered
    started = time.perf_counter()
    assert inlet.recv(0.02) == []  # nothing comes: the poll, then no sleep past the timeout
    elapsed = time.perf_counter() - started
    assert 0.02 <= elapsed < 0.035, elapsed  # the 0.02 s asked for, not 0.02 polled + 0.02 slept
    assert policy.notes[-1] is None


def test_a_message_already_there_says_nothing_about_waits(inlet_and_sender: Any) -> None:
    # Frames of a burst are waiting when the reader comes back: counting them as short waits
    # kept a reader of bursts polling at every gap, and missing (58% of a core instead of 7%).
    inlet, dealer = inlet_and_sender
    codec = Codec()
    policy = inlet.spin = _Recording(0.05)
    for seq in range(3):
        dealer.send(_frame(codec, seq))
        assert inlet.sock.poll(5000)  # here before the read starts
        assert [e[5] for e in inlet.recv(5.0)] == [[seq]]
    assert policy.notes == [] and not policy.wants_spin()


def test_spin_wait_comes_from_the_config() -> None:
    with pytest.raises(ConfigError, match="spin_wait"):
        load_config({"performance": {"spin_wait": -1}})
    with pytest.raises(ConfigError, match="spin_wait"):
        load_config({"performance": {"spin_wait": 0.5}})
    assert load_config({"performance": {"spin_wait": 0}}).performance.spin_wait == 0
