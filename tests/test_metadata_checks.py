"""Metadata and arguments checked where they are given: booleans, compression, typos in keys,
timeouts, and binds that fail (or would take a queue over) with an error that says why."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import socket
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from sage_zmq import (
    DescriptorError,
    EndOfStream,
    InvalidArgument,
    InvalidArgumentType,
    QueueDescriptor,
    SageZmqError,
)
from sage_zmq import testing as conf
from sage_zmq.descriptor import lookup_queue_type
from sage_zmq.errors import Empty
from sage_zmq.flow.reliable import _TIMING_KEYS
from sage_zmq.queues._socket_type import SocketQueueType

T = 20.0


def _typo_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sage_zmq.queue" and "did you mean" in r.getMessage()
    ]


# ----------------------------------------------------------------------------- booleans
@pytest.mark.parametrize("key", ["allow_pickle", "zero_copy", "ack"])
@pytest.mark.parametrize("value", ["false", "no", "true", 0, 1, None])
@pytest.mark.parametrize("queue_type", ["shm", "tcp", "sage"])
def test_boolean_metadata_must_be_a_real_bool(queue_type: str, key: str, value: Any) -> None:
    # "false" is truthy: bool() of it turned pickle ON. Refused before anything binds.
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor(None, queue_type, {key: value})
    message = str(exc.value)
    assert f"metadata[{key!r}]" in message and repr(value) in message, message
    assert "use true or false" in message, message


def test_real_bools_work_and_with_options_checks_flags_too() -> None:
    meta = {"allow_pickle": True, "zero_copy": False, "ack": False}
    with conf.released(QueueDescriptor(None, "shm", meta)) as qd:
        qd.put(1)
        assert qd.get(timeout=T) == 1
        with pytest.raises(DescriptorError, match="use true or false"):
            qd.with_options(allow_pickle="no")


def test_a_string_flag_put_into_metadata_later_does_not_turn_pickle_on() -> None:
    # The socket end reads the flag again when it opens: never as bool("false").
    qd = QueueDescriptor(None, "tcp", {"endpoint": "tcp://127.0.0.1:1"})
    qd.metadata["allow_pickle"] = "false"
    try:
        with pytest.raises(DescriptorError, match=r"allow_pickle.*use true or false"):
            qd.put(1, timeout=1)
    finally:
        qd.close()


def test_curve_enabled_must_be_a_real_bool() -> None:
    with pytest.raises(DescriptorError, match=r"metadata\['curve'\]\['enabled'\].*'false'"):
        QueueDescriptor(None, "shm", {"curve": {"enabled": "false"}})


# -------------------------------------------------------------------------- compression
@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "AUTO", None])
def test_compression_is_checked_at_creation(value: Any) -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor(None, "shm", {"compression": value})
    message = str(exc.value)
    assert "compression" in message and repr(value) in message, message
    assert "true, false or 'auto'" in message, message


def test_compression_accepts_its_three_values_and_nothing_close() -> None:
    for value in (True, False, "auto"):
        with conf.released(QueueDescriptor(None, "shm", {"compression": value})) as qd:
            qd.put("x")
            assert qd.get(timeout=T) == "x"
            with pytest.raises(DescriptorError, match="'auto'"):
                qd.with_options(compression="on")


# ---------------------------------------------------------------------------- key typos
def test_a_key_close_to_a_known_one_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sage_zmq.queue")
    meta = {"maxsise": 5, "shm_threshold": 1024, "team": "search", "zero_copy": True}
    with conf.released(QueueDescriptor(None, "shm", meta)) as qd:
        assert qd.metadata["maxsise"] == 5  # kept: users may carry their own keys
    assert _typo_warnings(caplog) == [
        "metadata key 'maxsise' is not used by shm queues; did you mean 'maxsize'?"
    ]


def test_two_swapped_letters_in_a_short_key_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sage_zmq.queue")
    with conf.released(QueueDescriptor(None, "tcp", {"akc": True, "team": "search"})):
        pass
    assert _typo_warnings(caplog) == [
        "metadata key 'akc' is not used by tcp queues; did you mean 'ack'?"
    ]


def test_with_options_warns_about_a_typo_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sage_zmq.queue")
    qd = QueueDescriptor(None, "local")
    try:
        qd.with_options(batch_sise=10)
    finally:
        qd.close()
    assert _typo_warnings(caplog) == [
        "metadata key 'batch_sise' is not used by local queues; did you mean 'batch_size'?"
    ]


def test_every_key_the_code_reads_is_known(caplog: pytest.LogCaptureFixture) -> None:
    # The reliable layer's options are named in _socket_type (no import of flow.reliable on a
    # plain queue's path): the two lists must not drift apart.
    assert set(_TIMING_KEYS) <= SocketQueueType.metadata_keys
    assert {"shm_threshold", "memory_pool_size", "shm_wait"} <= lookup_queue_type(
        "shm"
    ).metadata_keys
    assert {"host", "namespace", "ipc"} <= lookup_queue_type("ray").metadata_keys
    assert "transport" in lookup_queue_type("sage").metadata_keys
    caplog.set_level(logging.WARNING, logger="sage_zmq.queue")
    meta = {
        "maxsize": 10,
        "upstreams": 1,
        "batch_size": 5,
        "flush_interval": 0.01,
        "timeout": 5,
        "allow_pickle": False,
        "zero_copy": True,
        "compression": False,
        "compression_min_bytes": 100,
        "max_message_size": 1 << 20,
        "shm_threshold": 1 << 16,
        "memory_pool_size": 1,
        "shm_wait": 1.0,
        "ack": False,
        "liveness": 3,
        "heartbeat_interval": 1.0,
    }
    with conf.released(QueueDescriptor(None, "shm", meta)):
        pass
    assert _typo_warnings(caplog) == []


# ----------------------------------------------------------------------------- timeouts
@pytest.mark.parametrize("timeout", ["1", b"1", True, [1]])
def test_get_with_a_timeout_of_the_wrong_type(make_descriptor: Any, timeout: Any) -> None:
    with conf.released(make_descriptor()) as qd, pytest.raises(InvalidArgumentType) as exc:
        qd.get(timeout=timeout)
    assert isinstance(exc.value, TypeError) and isinstance(exc.value, SageZmqError)
    assert "get(timeout=...)" in str(exc.value) and repr(timeout) in str(exc.value)


@pytest.mark.parametrize("timeout", [-1, -0.5, math.nan, float("-inf")])
def test_get_with_a_negative_or_nan_timeout(make_descriptor: Any, timeout: float) -> None:
    with conf.released(make_descriptor()) as qd, pytest.raises(InvalidArgument) as exc:
        qd.get(timeout=timeout)
    assert isinstance(exc.value, ValueError) and not isinstance(exc.value, TypeError)
    assert ">= 0" in str(exc.value)


@pytest.mark.parametrize(
    ("timeout", "error"), [(-1, InvalidArgument), (math.nan, InvalidArgument), ("1", TypeError)]
)
def test_put_with_a_bad_timeout_queues_nothing(
    make_descriptor: Any, timeout: Any, error: type[Exception]
) -> None:
    with conf.released(make_descriptor()) as qd:
        with pytest.raises(error) as exc:
            qd.put("x", timeout=timeout)
        assert isinstance(exc.value, SageZmqError)
        assert "put(timeout=...)" in str(exc.value)
        with pytest.raises(InvalidArgument):
            qd.put(EndOfStream(), timeout=-1)
        qd.put("y", timeout=T)
        assert qd.get(timeout=T) == "y"  # the refused put left nothing behind


def test_any_real_number_is_a_timeout_but_a_bool_is_not() -> None:
    with conf.released(QueueDescriptor(None, "local")) as qd:
        with pytest.raises(Empty):
            qd.get(timeout=np.float64(0.01))
        qd.put(1, timeout=np.int64(5))
        assert qd.get(timeout=math.inf) == 1
        for flag in (True, np.bool_(False)):
            with pytest.raises(TypeError, match=r"get\(timeout=\.\.\.\)"):
                qd.get(timeout=flag)


# ------------------------------------------------------------------ one consumer per ipc
def test_a_second_consumer_cannot_take_over_a_live_ipc_endpoint() -> None:
    qd = QueueDescriptor(None, "shm")
    path = str(qd.endpoint)[len("ipc://") :]
    with conf.released(qd):
        with pytest.raises(Empty):
            qd.get_nowait()  # the first consumer binds
        inlet: Any = None
        try:
            with pytest.raises(DescriptorError) as exc:
                inlet = lookup_queue_type("shm").open_consumer_inlet(qd)
        finally:
            if inlet is not None:
                inlet.close()
        message = str(exc.value)
        assert str(qd.endpoint) in message and "one consumer" in message, message
        qd.put("still mine")
        assert qd.get(timeout=T) == "still mine"
    # A socket file nobody listens on is what a killed consumer leaves: it may be replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    with conf.released(qd):
        qd.put("after")
        assert qd.get(timeout=T) == "after"


def _consume(conn: Connection, qd: QueueDescriptor) -> None:
    try:
        conn.send(f"got {qd.get(timeout=1)!r}")
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")


def test_a_consumer_in_another_process_is_refused() -> None:
    with conf.released(QueueDescriptor(None, "shm")) as qd:
        with pytest.raises(Empty):
            qd.get_nowait()
        ctx = mp.get_context("spawn")
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_consume, args=(theirs, qd), daemon=True)
        proc.start()
        theirs.close()
        try:
            assert mine.poll(T), "the child did not answer"
            answer = mine.recv()
        finally:
            proc.join(T)
            if proc.is_alive():
                proc.kill()
                proc.join(T)
        assert answer.startswith("DescriptorError") and "one consumer" in answer, answer
        qd.put(1)
        assert qd.get(timeout=T) == 1


def test_binding_never_deletes_a_file_that_is_not_a_socket(tmp_path: Any) -> None:
    path = tmp_path / "data.sock"
    path.write_text("precious")
    qd = QueueDescriptor(None, "shm", {"endpoint": f"ipc://{path}"})
    try:
        with pytest.raises(DescriptorError, match="is not a socket"):
            qd.get_nowait()
    finally:
        qd.close()
    assert path.read_text() == "precious"


# ------------------------------------------------------------------------- bind errors
@pytest.mark.parametrize(
    ("queue_type", "endpoint", "hint"),
    [
        ("shm", "ipc://{tmp}/no/such/dir/q.sock", "does not exist"),
        # TEST-NET-1: not an address of this host; the bind fails locally, nothing is sent.
        ("tcp", "tcp://192.0.2.1:5000", "not an address of this host"),
    ],
)
def test_a_bind_failure_says_why(tmp_path: Any, queue_type: str, endpoint: str, hint: str) -> None:
    qd = QueueDescriptor(None, queue_type, {"endpoint": endpoint.format(tmp=tmp_path)})
    try:
        with pytest.raises(DescriptorError) as exc:
            qd.get_nowait()
    finally:
        qd.close()
    message = str(exc.value)
    assert hint in message and "another consumer" not in message, message


@pytest.mark.parametrize("host", ["999.1.1.1", "10.0.0.256"])
def test_an_impossible_ipv4_address_is_refused_at_creation(host: str) -> None:
    with pytest.raises(DescriptorError, match=rf"{host} is not an IPv4 address"):
        QueueDescriptor(None, "tcp", {"endpoint": f"tcp://{host}:5000"})


def test_every_metadata_key_is_documented() -> None:
    from pathlib import Path

    from sage_zmq.descriptor import lookup_queue_type

    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    section = text.split("## Queue metadata", 1)[1].split("\n## ", 1)[0]
    keys = set().union(
        *(lookup_queue_type(t).metadata_keys for t in ("local", "shm", "tcp", "sage", "ray"))
    )
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert not missing, f"docs/configuration.md 'Queue metadata' does not name {missing}"


@pytest.mark.parametrize(
    "qtype, key, value",
    [
        ("tcp", "max_message_size", 10),
        ("tcp", "max_message_size", 1023),
        ("shm", "flush_interval", math.nan),
        ("shm", "flush_interval", math.inf),
        ("shm", "flush_interval", 0),  # the flush timer would spin
        ("shm", "timeout", math.nan),
        ("shm", "timeout", math.inf),
        ("tcp", "compression_min_bytes", -1),
        ("shm", "shm_wait", math.nan),
        ("shm", "shm_wait", -1),
        ("shm", "shm_threshold", 1.5),
        ("shm", "memory_pool_size", math.inf),
    ],
)
def test_numeric_metadata_is_checked_when_the_descriptor_is_made(
    qtype: str, key: str, value: Any
) -> None:
    with pytest.raises(DescriptorError, match=key):
        QueueDescriptor(None, qtype, {key: value})
