"""Shared-memory transport pieces: producer pool and sender, consumer cache and receiver,
orphan sweeper, and :func:`release` for a received view."""

from sage_zmq.shm.pool import (
    ALIGN,
    PayloadTooLarge,
    PoolClosed,
    PoolStatistics,
    SegmentCache,
    SharedMemoryPool,
    ShmError,
    Slot,
    SlotRef,
    SlotSizeError,
)
from sage_zmq.shm.sweep import DEFAULT_PREFIX, list_segments, sweep_orphans
from sage_zmq.shm.transfer import ShmReceiver, ShmSender, is_shared, release

__all__ = [
    "ALIGN",
    "DEFAULT_PREFIX",
    "PayloadTooLarge",
    "PoolClosed",
    "PoolStatistics",
    "SegmentCache",
    "SharedMemoryPool",
    "ShmError",
    "ShmReceiver",
    "ShmSender",
    "Slot",
    "SlotRef",
    "SlotSizeError",
    "is_shared",
    "list_segments",
    "release",
    "sweep_orphans",
]
