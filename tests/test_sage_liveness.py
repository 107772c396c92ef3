"""Heartbeats, dead-peer detection, backoff and the reliable producer's timers, on a FakeClock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sage_zmq.config import ReliabilityConfig
from sage_zmq.errors import ConfigError, DeliveryError
from sage_zmq.flow.clock import FakeClock
from sage_zmq.flow.liveness import Action, Backoff, PeerLiveness
from sage_zmq.flow.reliable import ReliabilitySettings, ReliableProducer
from sage_zmq.packet import EndOfStream
from sage_zmq.queues.base import Credit
from sage_zmq.wire.codec import Codec
from sage_zmq.wire.frame import Kind


# ------------------------------------------------------------------------------ liveness
def test_backoff_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(1.0, 32.0)
    assert [b.next() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 32, 32]
    assert b.attempts == 8
    b.reset()
    assert b.next() == 1.0
    with pytest.raises(ConfigError, match="reconnect_initial"):
        Backoff(2.0, 1.0)


def _run(
    live: PeerLiveness, clock: FakeClock, until: float, step: float
) -> list[tuple[float, Action]]:
    seen = []
    while clock.monotonic() < until - 1e-9:
        clock.advance(step)
        action = live.check()
        if action:
            seen.append((round(clock.monotonic(), 6), action))
    return seen


def test_heartbeat_loss_is_detected_within_interval_times_liveness() -> None:
    clock = FakeClock()
    live = PeerLiveness(clock, interval=1.0, liveness=3, reconnect_initial=1.0, reconnect_max=4.0)
    step = 0.05
    # The peer answers every heartbeat: never declared dead.
    for _ in range(200):
        clock.advance(step)
        if live.check() & Action.HEARTBEAT:
            live.heard()
        assert live.alive
    silent_from = clock.monotonic()
    live.heard()
    events = _run(live, clock, silent_from + 3.5, step)
    dead_at = [t for t, a in events if a & Action.DEAD]
    assert len(dead_at) == 1
    assert silent_from + 3.0 - 1e-6 <= dead_at[0] <= silent_from + 3.0 + step + 1e-6
    beats = [t for t, a in events if a & Action.HEARTBEAT]
    assert [round(t - silent_from, 2) for t in beats] == [1.0, 2.0, 3.0], beats
    assert not live.alive and live.dead_since == pytest.approx(dead_at[0])


def test_reconnects_back_off_while_dead_and_reset_on_revival() -> None:
    clock = FakeClock()
    live = PeerLiveness(clock, interval=1.0, liveness=2, reconnect_initial=1.0, reconnect_max=4.0)
    events = _run(live, clock, 20.0, 0.5)
    dead = [t for t, a in events if a & Action.DEAD]
    reconnects = [t for t, a in events if a & Action.RECONNECT]
    assert dead == [2.0]
    # 1 s after death, then 2, 4, 4, 4 s apart.
    assert reconnects == [3.0, 5.0, 9.0, 13.0, 17.0], reconnects
    live.heard()
    assert live.alive
    assert live.check() & Action.REVIVED
    assert not live.check() & Action.REVIVED  # reported once
    later = _run(live, clock, 40.0, 0.5)
    assert [t for t, a in later if a & Action.DEAD] == [22.0]
    assert next(t for t, a in later if a & Action.RECONNECT) == 23.0  # backoff was reset


def test_liveness_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="interval"):
        PeerLiveness(FakeClock(), interval=0)
    with pytest.raises(ConfigError, match="liveness"):
        PeerLiveness(FakeClock(), liveness=0)


# ------------------------------------------------------------------------------ producer timers
class FakeLink:
    """Stands in for a DealerLink: records what is sent, returns credits a test queues."""

    def __init__(self) -> None:
        self.codec = Codec()
        self.compress = False
        self.sent: list[tuple[Any, ...]] = []
        self.inbox: list[Credit] = []
        self.closed = False

    def send_hello(self, producer: str, epoch: int, next_seq: int, acked: int) -> None:
        self.sent.append(("hello", next_seq, acked))

    def send_frame(self, frame: bytes) -> None:
        msg = self.codec.decode(frame)
        if msg.kind is Kind.DATA:
            self.sent.append(("data", msg.fields[1], list(msg.fields[2])))
        else:
            self.sent.append(("end", msg.fields[1]))

    def send_close(self, producer: str, seq: int) -> None:
        self.sent.append(("close", seq))

    def send_heartbeat(self, producer: str) -> None:
        self.sent.append(("heartbeat",))

    def poll(self, timeout: float) -> list[Credit]:
        out, self.inbox = self.inbox, []
        return out

    def close(self) -> None:
        self.closed = True

    def take(self) -> list[tuple[Any, ...]]:
        out, self.sent = self.sent, []
        return out


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.links: list[FakeLink] = []
        timing = ReliabilityConfig(
            heartbeat_interval=1.0,
            liveness=3,
            ack_timeout=0.5,
            reconnect_initial=1.0,
            reconnect_max=4.0,
        )
        self.producer = ReliableProducer(
            self._open,  # type: ignore[arg-type]
            queue_id="unit",
            queue_type="sage",
            window=100,
            batch_size=10,
            flush_interval=0.001,
            timeout=1.0,
            settings=ReliabilitySettings(timing),
            clock=self.clock,
        )

    def _open(self) -> FakeLink:
        self.links.append(FakeLink())
        return self.links[-1]

    @property
    def link(self) -> FakeLink:
        return self.links[-1]

    def tick(self, credits: list[Credit] | None = None) -> list[tuple[Any, ...]]:
        if credits:
            self.clock.advance(1e-6)  # a frame is heard after the moment before it, never at it
        self.link.inbox.extend(credits or [])
        with self.producer._lock:  # as the timer thread does, but on this thread
            self.producer._apply(self.link.poll(0))
        return self.link.take()

    def advance(self, seconds: float, step: float = 0.05) -> list[tuple[Any, ...]]:
        sent = []
        end = self.clock.monotonic() + seconds
        while self.clock.monotonic() < end - 1e-9:
            self.clock.advance(step)
            sent += self.tick()
        return sent

    def put(self, *items: Any) -> list[tuple[Any, ...]]:
        for item in items:
            self.producer.put(item)
        self.producer.flush()
        return self.link.take()

    def close(self) -> None:
        p = self.producer
        self.link.inbox.append(Credit("end", p._next_seq, p._next_seq, p._next_seq + 100))
        p.close(timeout=1.0)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    if not h.producer.closed:
        h.close()


def _data(sent: list[tuple[Any, ...]]) -> list[Any]:
    return [r for s in sent if s[0] == "data" for r in s[2]]


def test_first_hello_and_no_retransmit_while_acks_progress(harness: Harness) -> None:
    assert harness.link.take() == [("hello", 0, 0)]
    assert _data(harness.put(*range(5))) == [0, 1, 2, 3, 4]
    assert harness.tick([Credit("s1", 5, 5, 105)]) == []
    assert harness.producer.statistics().extra["kept_frames"] == 0  # type: ignore[index]
    assert _data(harness.advance(2.0)) == []


def test_unreceived_frames_are_retransmitted_after_ack_timeout(harness: Harness) -> None:
    harness.link.take()
    harness.tick([Credit("s1", 0, 0, 100)])
    assert _data(harness.put(*range(5))) == list(range(5))
    assert _data(harness.advance(0.45)) == []
    sent = harness.advance(0.05 + harness.producer._tick_interval)  # ack_timeout + one tick
    assert sent[0] == ("hello", 5, 0)
    assert _data(sent) == list(range(5))
    # Received but not consumed: a slow consumer is not a loss, nothing is resent.
    harness.tick([Credit("s1", 5, 2, 102)])
    assert _data(harness.advance(2.0)) == []
    assert harness.producer.statistics().retransmits >= 1


def test_no_ack_timeout_resend_to_a_consumer_never_heard(harness: Harness) -> None:
    # PROTOCOL §5 (e): resend for an ack timeout only if the consumer was heard since the last
    # resend. A consumer never heard is liveness's case: declared dead, then a new connection.
    harness.link.take()
    assert _data(harness.put(*range(5))) == list(range(5))
    sent = harness.advance(2.5)
    assert _data(sent) == [] and not [s for s in sent if s[0] == "hello"], sent
    assert harness.producer.statistics().retransmits == 0
    sent = harness.advance(1.7)  # dead at 3 s (interval x liveness), a new link 1 s later
    assert len(harness.links) == 2
    assert _data(sent) == list(range(5))


def test_consumer_restart_and_unknown_producer_prompt_resend_unacked(harness: Harness) -> None:
    harness.link.take()
    harness.tick([Credit("s1", 0, 0, 100)])
    harness.put(*range(6))
    harness.tick([Credit("s1", 6, 3, 103)])
    sent = harness.tick([Credit("s2", 0, 0, 50)])  # a new consumer session
    assert sent[0] == ("hello", 6, 3)
    # Every frame not fully acked (whole frames: the consumer trims below acked).
    assert [r for r in _data(sent) if r >= 3] == [3, 4, 5]
    sent = harness.tick([Credit("s3", 0, 0, 0)])  # "who are you?"
    assert sent[0][0] == "hello" and [r for r in _data(sent) if r >= 3] == [3, 4, 5]
    assert harness.tick([Credit("s3", 0, 0, 0)]) == []  # repeated prompts are not resent at once


def test_dead_consumer_callback_reconnect_and_revival(harness: Harness) -> None:
    deaths: list[float] = []
    p = harness.producer
    p.add_dead_callback(lambda prod: deaths.append(harness.clock.monotonic()))
    harness.tick([Credit("s1", 0, 0, 100)])
    harness.put("a", "b")
    assert p.peer_alive and not p.dead_event.is_set()
    harness.advance(2.9)
    assert p.peer_alive
    harness.advance(0.2)
    assert deaths and 3.0 - 1e-6 <= deaths[0] <= 3.05 + 1e-6
    assert p.dead and p.dead_event.is_set() and p.reconnect_attempts == 0
    first_link = harness.link
    harness.advance(0.9)
    assert len(harness.links) == 1
    sent = harness.advance(0.2)
    assert len(harness.links) == 2 and first_link.closed  # reconnected 1 s after the death
    assert sent[0][0] == "hello" and _data(sent) == ["a", "b"]  # HELLO, then the unacked
    harness.advance(1.8)
    assert len(harness.links) == 2
    harness.advance(0.2)
    assert len(harness.links) == 3  # then 2 s later
    assert p.reconnect_attempts == 2
    assert len(deaths) == 1
    harness.tick([Credit("s1", 2, 2, 102)])
    assert p.peer_alive and p.reconnect_attempts == 0
    harness.advance(0.2)
    assert not p.dead_event.is_set()
    harness.advance(5.0)
    # Silent again: a new death, and a reconnect 1 s later (the backoff was reset).
    assert len(harness.links) == 4 and p.peer_alive is False
    assert len(deaths) == 2


def test_take_unacked_hands_records_over_and_skips_their_seqs(harness: Harness) -> None:
    p = harness.producer
    harness.tick([Credit("s1", 0, 0, 5)])
    harness.link.take()
    for i in range(8):  # 5 go out, 3 wait for credit
        p.put(i, timeout=0.01) if i < 5 else p._pending.append(i)
    p.flush(timeout=0.01)
    harness.tick([Credit("s1", 5, 2, 7)])
    harness.link.take()
    assert p.take_unacked() == [2, 3, 4, 5, 6, 7]
    assert harness.link.take() == [("hello", 8, 8)]
    assert p.statistics().extra["kept_frames"] == 0  # type: ignore[index]
    assert _data(harness.advance(1.0)) == []
    p.put(EndOfStream())
    sent = harness.link.take()
    assert ("end", 8) in sent


def test_close_without_acks_reports_every_unconsumed_record(harness: Harness) -> None:
    harness.put(*range(4))
    harness.tick([Credit("s1", 4, 1, 101)])  # received, one consumed
    with pytest.raises(DeliveryError) as info:
        harness.producer.close(timeout=0.05)
    assert info.value.undelivered == 3
