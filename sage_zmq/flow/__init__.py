"""Persistence for the reliable queue: producer write-ahead log, consumer dedup, test clock."""

from sage_zmq.flow.clock import Clock, FakeClock, SystemClock, TimerHandle
from sage_zmq.flow.dedup import DedupClosed, DedupCorruptionError, DedupState
from sage_zmq.flow.wal import (
    MAX_PRODUCER_ID_BYTES,
    PersistLockedError,
    WalCorruptionError,
    WalError,
    WalStatistics,
    WriteAheadLog,
    check_producer_id,
)

__all__ = [
    "MAX_PRODUCER_ID_BYTES",
    "Clock",
    "DedupClosed",
    "DedupCorruptionError",
    "DedupState",
    "FakeClock",
    "PersistLockedError",
    "SystemClock",
    "TimerHandle",
    "WalCorruptionError",
    "WalError",
    "WalStatistics",
    "WriteAheadLog",
    "check_producer_id",
]
