"""Pickle protocol 5 out-of-band buffers: only with allow_pickle, large buffers via the pool."""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from sage_zmq import QueueDescriptor
from sage_zmq.shm import is_shared
from sage_zmq.wire.codec import EXT_PICKLE_OOB, Codec


@dataclass
class Frame:
    """A user type holding a large buffer: only pickle can carry it."""

    name: str
    pixels: np.ndarray


def test_codec_sends_large_buffers_out_of_band() -> None:
    codec = Codec(allow_pickle=True)
    record = Frame("cam-1", np.arange(100_000, dtype=np.float32))
    frame, sent, errors = codec.encode_batch("p", 0, [record])
    assert not errors and sent == [record]
    plain = pickle.dumps(record, protocol=5)
    assert len(frame) < len(plain) + 200  # the array bytes are in the frame once, not twice
    got = codec.decode(frame).fields[2][0]
    assert got.name == "cam-1"
    np.testing.assert_array_equal(got.pixels, record.pixels)


def test_out_of_band_pickle_is_refused_without_allow_pickle() -> None:
    sender = Codec(allow_pickle=True)
    frame, _, _ = sender.encode_batch("p", 0, [Frame("x", np.zeros(10))])
    receiver = Codec(allow_pickle=False)
    with pytest.raises(Exception, match="pickle"):
        receiver.decode(frame)
    # and a codec without pickle will not produce one
    _, sent, errors = Codec().encode_batch("p", 0, [Frame("x", np.zeros(10))])
    assert sent == [] and "pickle" in errors[0] and "Frame" in errors[0]
    assert EXT_PICKLE_OOB == 126


def test_shm_queue_carries_pickled_objects_with_buffers_through_the_pool() -> None:
    qd = QueueDescriptor(queue_type="shm", metadata={"allow_pickle": True, "maxsize": 10})
    try:
        record = Frame("cam-2", np.arange(1 << 18, dtype=np.float64))  # 2 MiB: above threshold
        qd.put(record)
        got = qd.get(timeout=10)
        assert isinstance(got, Frame) and got.name == "cam-2"
        np.testing.assert_array_equal(got.pixels, record.pixels)
        assert is_shared(got.pixels)  # the buffer came through the pool, not the socket
        del got
    finally:
        with contextlib.suppress(Exception):
            qd.close()


def _producer_with_pickle_on(qd: QueueDescriptor, records: list[Any]) -> None:
    """A producer process whose config turns pickle on (the consumer's does not)."""
    import os
    import sys

    os.environ["SAGE_ZMQ__SECURITY__ALLOW_PICKLE"] = "true"
    from sage_zmq import DeliveryError, EndOfStream
    from sage_zmq.config import reset_config

    reset_config()
    for record in records:
        qd.put(record, timeout=20)
    qd.put(EndOfStream(), timeout=20)
    try:
        qd.close(timeout=20)
    except DeliveryError as exc:
        sys.exit(3 if "1 record put was lost in transit" in str(exc) else 4)


@pytest.mark.parametrize("with_set", [False, True], ids=["plain", "one-set"])
def test_a_producer_with_pickle_on_reaches_a_consumer_with_it_off(with_set: bool) -> None:
    # Every frame of a pickle-enabled producer was marked PICKLE, so a consumer with pickle
    # off refused them all (0 of 3000 arrived) and the producer's close() still returned.
    import multiprocessing as mp

    from sage_zmq import EndOfStream

    records: list[Any] = [{"i": i} for i in range(3000)]
    if with_set:
        records = [{1, 2}]  # needs pickle: refused, and close() must say so
    qd = QueueDescriptor(queue_type="shm", metadata={"maxsize": 5000})
    with contextlib.suppress(Exception):
        qd.get_nowait()  # bind
    proc = mp.get_context("spawn").Process(target=_producer_with_pickle_on, args=(qd, records))
    proc.start()
    try:
        got = []
        while not isinstance(item := qd.get(timeout=30), EndOfStream):
            got.append(item)
        proc.join(30)
        if with_set:
            assert got == [] and proc.exitcode == 3
        else:
            assert got == records and proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        qd.close()


def test_idle_puts_of_pickled_objects_leave_no_pool_slot_behind() -> None:
    # The put-time check encoded such a record once more to see if it can be: the pickle's
    # out-of-band buffer took a pool slot that no frame carried, and it was never given back.
    import gc

    qd = QueueDescriptor(queue_type="shm", metadata={"allow_pickle": True, "maxsize": 10})
    try:
        for i in range(5):
            qd.put(Frame(f"h{i}", np.arange(1 << 16, dtype=np.float64)), timeout=10)
            got = qd.get(timeout=10)
            assert got.name == f"h{i}"
            del got
        gc.collect()
        producer = qd._handle().producer(qd)
        placed = producer.shm.statistics()["placed"]
        assert placed == 5, placed  # one slot per put, not two
    finally:
        qd.close()
