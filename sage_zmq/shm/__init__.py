"""Shared-memory transport pieces: producer pool, consumer segment cache, orphan sweeper."""

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

__all__ = [
    "ALIGN",
    "DEFAULT_PREFIX",
    "PayloadTooLarge",
    "PoolClosed",
    "PoolStatistics",
    "SegmentCache",
    "SharedMemoryPool",
    "ShmError",
    "Slot",
    "SlotRef",
    "SlotSizeError",
    "list_segments",
    "sweep_orphans",
]
