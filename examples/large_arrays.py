"""Large arrays through shared memory: the producer fills pool memory in place, the consumer
reads it where it lies (no copy by the queue on either side).

Run: python examples/large_arrays.py
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from sage_zmq import EndOfStream, QueueDescriptor
from sage_zmq.shm import is_shared, release

FRAMES = 100
SHAPE = (480, 640, 3)  # 900 KiB per frame, far above the 64 KiB shm_threshold


def camera(qd: QueueDescriptor) -> None:
    for i in range(FRAMES):
        frame = qd.alloc(SHAPE, np.uint8)  # a buffer in this process's shared-memory pool
        frame[:] = i % 256  # fill it in place: the only copy
        qd.put(frame)  # sends a reference; the queue owns the memory now
    qd.put(EndOfStream())
    qd.close()


def main() -> None:
    qd = QueueDescriptor("frames", "shm", {"maxsize": 16})
    proc = mp.get_context("spawn").Process(target=camera, args=(qd,))
    proc.start()
    total = shared = 0
    try:
        for frame in qd:
            shared += is_shared(frame) and not frame.flags.writeable  # a view of the slot
            total += int(frame[-1, -1, -1])
            release(frame)  # the slot goes back now (dropping the last reference also does)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        qd.close()
    expected = sum(i % 256 for i in range(FRAMES))
    if (total, shared) != (expected, FRAMES) or proc.exitcode != 0:
        raise SystemExit(f"large_arrays: sum {total}, {shared} shared views; expected {expected}")
    print(f"large_arrays: {FRAMES} frames of {SHAPE}, all zero-copy views, sum {total} (ok)")


if __name__ == "__main__":
    main()
