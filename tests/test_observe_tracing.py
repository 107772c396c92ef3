"""Tracing: traceparent ids, hops added by the codec, propagation, finished traces."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sage_zmq import Packet, QueueDescriptor
from sage_zmq.observe import metrics, tracing
from sage_zmq.wire.codec import Codec

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


@pytest.fixture(autouse=True)
def clean_traces() -> None:
    tracing.clear_recent()
    tracing.set_trace_log(None)


def _roundtrip(codec_out: Codec, codec_in: Codec, packets: list[Packet]) -> list[Packet]:
    frame, _sent, errors = codec_out.encode_batch("p1", 0, packets)
    assert not errors
    return list(codec_in.decode(frame).fields[2])


def test_start_trace_is_w3c_compatible() -> None:
    packet = Packet("x", headers={"user": 1})
    tid = tracing.start_trace(packet)
    assert TRACEPARENT.match(packet.headers["traceparent"])
    assert tracing.trace_id(packet) == tid and len(tid) == 32
    assert packet.headers["user"] == 1 and tracing.hops(packet) == []


def test_codec_adds_put_and_get_hops_without_touching_the_sender() -> None:
    out, inp = Codec(), Codec()
    out.trace_queue = inp.trace_queue = "q-a"
    traced, plain = Packet("t"), Packet("p")
    tracing.start_trace(traced)
    before = dict(traced.headers)
    got_traced, got_plain = _roundtrip(out, inp, [traced, plain])
    assert traced.headers == before  # the sender's packet did not change
    assert got_plain.headers is None  # untraced packets stay untouched
    hops = tracing.hops(got_traced)
    assert [(h.queue, h.role) for h in hops] == [("q-a", "put"), ("q-a", "get")]
    assert {h.process for h in hops} == {metrics.process_label()}
    assert hops[0].timestamp <= hops[1].timestamp
    assert got_traced.headers["traceparent"] == traced.headers["traceparent"]


def test_foreign_malformed_hops_do_not_break_decoding() -> None:
    packet = Packet("x", headers={"sage_trace": "not a list", "traceparent": "junk"})
    (got,) = _roundtrip(Codec(), Codec(), [packet])
    assert got.payload == "x" and tracing.trace_id(got) is None
    # the malformed list is replaced by the hops this link saw
    assert [h.role for h in tracing.hops(got)] == ["put", "get"]


def test_propagate_keeps_trace_id_new_span_and_copies_hops() -> None:
    src = Packet(1)
    tracing.start_trace(src)
    tracing.add_hop(src, "q1", "local")
    dst = tracing.propagate(src, Packet(2))
    assert tracing.trace_id(dst) == tracing.trace_id(src)
    assert dst.headers["traceparent"] != src.headers["traceparent"]  # a child span
    tracing.add_hop(dst, "q2", "local")
    assert [h.queue for h in tracing.hops(src)] == ["q1"]  # src's list was not shared
    assert [h.queue for h in tracing.hops(dst)] == ["q1", "q2"]
    untraced = tracing.propagate(Packet(3), Packet(4))
    assert untraced.headers is None


def test_traced_packet_through_a_tcp_queue_gets_hops(tmp_path: Path) -> None:
    log = tmp_path / "traces.jsonl"
    tracing.set_trace_log(log)
    qd = QueueDescriptor("trace-q", "tcp")
    try:
        packet = Packet({"n": 1})
        tracing.start_trace(packet)
        qd.put(packet)
        qd.put(Packet({"n": 2}))
        got = qd.get(timeout=5)
        plain = qd.get(timeout=5)
    finally:
        qd.close()
    assert plain.headers is None
    hops = [(h.queue, h.role) for h in tracing.hops(got)]
    assert hops == [("trace-q", "put"), ("trace-q", "get")]
    record = tracing.finish(got, "test")
    assert record is not None and record["finished_by"] == "test"
    assert tracing.finish(plain) is None
    assert tracing.recent_traces() == [record]
    (line,) = log.read_text().splitlines()
    assert json.loads(line) == record


def test_local_hops_mark_only_traced_packets() -> None:
    traced, plain = Packet(1), Packet(2)
    tracing.start_trace(traced)
    assert tracing.active
    tracing.local_hops([traced, plain, "not a packet"], "q-local")
    assert [(h.queue, h.role) for h in tracing.hops(traced)] == [("q-local", "local")]
    assert plain.headers is None


def test_opentelemetry_context_is_propagated() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("sage-zmq-test")
    with tracer.start_as_current_span("produce") as span:
        packet = Packet(1)
        tid = tracing.start_trace(packet)
        assert tid == f"{span.get_span_context().trace_id:032x}"
    (got,) = _roundtrip(Codec(), Codec(), [packet])
    ctx = tracing.otel_context(got)
    with tracer.start_as_current_span("consume", context=ctx) as child:
        assert child.get_span_context().trace_id == span.get_span_context().trace_id
        assert child.parent is not None and child.parent.span_id == span.get_span_context().span_id
    # without an active span the packet gets its own trace id
    other = Packet(2)
    assert tracing.start_trace(other) != tid


def test_bad_sample_rate_is_a_clear_error() -> None:
    from sage_zmq.errors import ConfigError

    with pytest.raises(ConfigError, match="from 0 to 1"):
        tracing.set_sample_rate(1.5)
    assert os.getpid() > 0


def test_a_foreign_malformed_hop_list_is_replaced_by_the_get_hop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A peer that does not replace it (Python senders do, at encode): the receiver kept 5.
    monkeypatch.setattr(tracing, "on_encode", lambda headers, queue: headers)
    packet = Packet("x", headers={"sage_trace": 5})
    (got,) = _roundtrip(Codec(), Codec(), [packet])
    assert isinstance(got.headers["sage_trace"], list)
    assert [h.role for h in tracing.hops(got)] == ["get"]
