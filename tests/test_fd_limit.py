"""A process near its file limit gets a clear error, not libzmq's abort (SIGABRT)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
from sage_zmq import DescriptorError, QueueDescriptor
held = []
try:
    for i in range(1000):
        qd = QueueDescriptor(f"q{i}", "tcp", {"maxsize": 10})  # binds its port now
        qd.put(i, timeout=5)
        assert qd.get(timeout=5) == i
        held.append(qd)
except DescriptorError as exc:
    print("refused", len(held), exc)
for qd in held[: len(held) // 2]:
    qd.close()
# Room again once some are closed: libzmq's reaper thread releases a closed socket's
# descriptors on its own time (after the linger), so look until they are back.
import time
deadline = time.monotonic() + 20
while True:
    try:
        qd = QueueDescriptor("again", "tcp")
        break
    except DescriptorError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
qd.put("x")
assert qd.get(timeout=5) == "x"
print("usable")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("limit", [64, 100])
def test_running_out_of_file_descriptors_is_a_clear_error(limit: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(limit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]  # -6 was libzmq's assertion
    refused, usable = done.stdout.strip().splitlines()
    assert refused.startswith("refused") and "ulimit -n" in refused, refused
    assert usable == "usable"


_AT_LIMIT = """
import logging, os, resource, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from sage_zmq import Empty, QueueDescriptor
from sage_zmq.queues import _zmq
_zmq.FD_LOOK_INTERVAL = 0.05  # look at every tick, so the test need not wait seconds
qd = QueueDescriptor("at-limit", "tcp", {"maxsize": 10})
try:
    qd.get(timeout=0.3)  # room left: nothing to say
except Empty:
    pass
print("--- filling")
sys.stdout.flush()
held = []
while len(os.listdir("/proc/self/fd")) < 60:
    held.append(os.open(os.devnull, os.O_RDONLY))
try:
    qd.get(timeout=1.5)
except Empty:
    pass
for fd in held:
    os.close(fd)
qd.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_a_consumer_at_the_file_limit_says_so_in_the_log() -> None:
    # At the limit libzmq cannot accept producers and tells no one; the log names the limit.
    done = subprocess.run(
        [sys.executable, "-c", _AT_LIMIT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, _, after = done.stdout.partition("--- filling")
    assert "file descriptors" not in before, before
    warnings = [line for line in after.splitlines() if "file descriptors open" in line]
    assert len(warnings) == 1, after  # once a minute, not at every look
    assert "at-limit" in warnings[0] and "of its 64" in warnings[0] and "ulimit -n" in warnings[0]
