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


def test_a_polling_read_takes_what_arrives_and_gives_up_at_its_timeout(
    inlet_and_sender: Any,
) -> None:
    inlet, dealer = inlet_and_sender
    codec = Codec()
    polls: list[Any] = []
    spin_recv = inlet._spin_recv

    def counted(timeout: float) -> Any:
        got = spin_recv(timeout)
        polls.append(got is not None)
        return got

    inlet._spin_recv = counted
    for seq in range(4):  # quick replies: the reader starts polling
        dealer.send(_frame(codec, seq))
        events = inlet.recv(5.0)
        assert [e[5] for e in events] == [[seq]]
    assert inlet.spin.wants_spin()
    polls.clear()
    sender = threading.Timer(0.01, lambda: dealer.send(_frame(codec, 4)))
    sender.start()
    try:
        events = inlet.recv(5.0)  # the record comes while the read polls
    finally:
        sender.join()
    assert [e[5] for e in events] == [[4]] and polls == [True]
    started = time.perf_counter()
    assert inlet.recv(0.005) == []  # nothing comes: the poll stops at the read's timeout
    assert time.perf_counter() - started < 0.04  # not the 0.05 s limit, nor more
    assert polls == [True, False]


def test_spin_wait_comes_from_the_config() -> None:
    with pytest.raises(ConfigError, match="spin_wait"):
        load_config({"performance": {"spin_wait": -1}})
    with pytest.raises(ConfigError, match="spin_wait"):
        load_config({"performance": {"spin_wait": 0.5}})
    assert load_config({"performance": {"spin_wait": 0}}).performance.spin_wait == 0
