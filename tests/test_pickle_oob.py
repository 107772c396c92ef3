"""Pickle protocol 5 out-of-band buffers: only with allow_pickle, large buffers via the pool."""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass

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
