"""Shared fixtures: the queue types under test and a leak check around every test.

Add a queue type to the conformance suite by appending its name to ``QUEUE_TYPES``; tests
that need a cross-process type use ``remote_queue_type``, derived from the capabilities table.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import sage_zmq
from sage_zmq import _runtime
from sage_zmq.descriptor import lookup_queue_type
from sage_zmq.queues import _zmq
from sage_zmq.shm.sweep import list_segments, owner_pid, pid_alive
from sage_zmq.testing import DescriptorFactory, close_quietly, descriptor_factory

QUEUE_TYPES = ["local", "shm", "tcp", "sage"]
REMOTE_QUEUE_TYPES = [t for t in QUEUE_TYPES if lookup_queue_type(t).capabilities.cross_process]
_private_runtime_dir: str | None = None
SETTLE = 5.0  # socket files and threads go away asynchronously after close


def pytest_configure(config: pytest.Config) -> None:
    global _private_runtime_dir
    if not os.environ.get("SAGE_ZMQ_RUNTIME_DIR"):
        # A private runtime dir (inherited by spawned children): ipc files of this run are
        # not mixed with those of other runs, and a leak check can count them.
        _private_runtime_dir = tempfile.mkdtemp(prefix="sztest-", dir="/tmp")
        os.environ["SAGE_ZMQ_RUNTIME_DIR"] = _private_runtime_dir
    config.addinivalue_line(
        "markers", "allow_leaks: skip the per-test leak check (the test cleans up itself)"
    )


@pytest.fixture(autouse=True)
def _log_level_chosen_by_the_config() -> Iterator[None]:
    # configure_logging() (the CLI calls it) pins the level for the process; a test that
    # calls it must not pin it for the tests after it.
    import logging

    from sage_zmq.observe import logging as sz_logging

    logger = logging.getLogger(sz_logging.LOGGER_NAME)
    saved = sz_logging._level_from_app, sz_logging._level_set_here, logger.level
    yield
    sz_logging._level_from_app, sz_logging._level_set_here, level = saved
    logger.setLevel(level)  # a level a test set by hand would count as the application's


@pytest.fixture(params=QUEUE_TYPES)
def queue_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=REMOTE_QUEUE_TYPES)
def remote_queue_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def queues() -> Iterator[Callable[..., sage_zmq.QueueDescriptor]]:
    """``queues(*args, **kw)``: a new QueueDescriptor, closed (quietly) after the test."""
    made: list[sage_zmq.QueueDescriptor] = []

    def make(*args: Any, **kw: Any) -> sage_zmq.QueueDescriptor:
        qd = sage_zmq.QueueDescriptor(*args, **kw)
        made.append(qd)
        return qd

    yield make
    close_quietly(*made, timeout=0.5)


@pytest.fixture
def make_descriptor(queue_type: str) -> DescriptorFactory:
    return descriptor_factory(queue_type)


@pytest.fixture
def make_remote_descriptor(remote_queue_type: str) -> DescriptorFactory:
    return descriptor_factory(remote_queue_type)


# ----------------------------------------------------------------------------------- leaks
KNOWN_CORE_LEAKS: dict[str, str] = {
    # kind -> the strict-xfail test that pins the bug; delete the entry once that test passes.
}


@dataclass(frozen=True)
class _Snapshot:
    segments: frozenset[str]
    ipc_files: frozenset[str]
    threads: frozenset[threading.Thread]
    sockets: int
    handles: frozenset[Any]
    prebound: frozenset[str]
    batching: frozenset[int]


def _open_sockets() -> int:
    ctx = _runtime._context
    if ctx is None:
        return 0
    prebound = {id(inlet.sock) for inlet in list(_zmq._prebound.values())}
    return sum(1 for s in list(ctx._sockets) if not s.closed and id(s) not in prebound)


def _our_segments() -> frozenset[str]:
    # /dev/shm is shared with other processes' test runs: count only segments owned by this
    # process or by a process that no longer exists (what a dead child leaked).
    me = os.getpid()
    names = set()
    for name in list_segments():
        owner = owner_pid(name)
        if owner is not None and (owner == me or not pid_alive(owner)):
            names.add(name)
    return frozenset(names)


def _snapshot() -> _Snapshot:
    ipc = frozenset(os.listdir(_runtime.runtime_dir()))
    threads = frozenset(t for t in threading.enumerate() if not t.daemon)
    handles = frozenset(
        k
        for k in _runtime._handles
        if not (k[0] == "local-channel" and "local channels" in KNOWN_CORE_LEAKS)
    )
    prebound = frozenset(_zmq._prebound)
    batching = frozenset(_runtime._batching)
    return _Snapshot(_our_segments(), ipc, threads, _open_sockets(), handles, prebound, batching)


def _leaks(before: _Snapshot) -> dict[str, Any]:
    now = _snapshot()
    found: dict[str, Any] = {
        "shm segments": sorted(now.segments - before.segments),
        "ipc files": sorted(now.ipc_files - before.ipc_files),
        "non-daemon threads": sorted(t.name for t in now.threads - before.threads if t.is_alive()),
        "queue handles": sorted(map(str, now.handles - before.handles)),
        "child processes": [p.name for p in multiprocessing.active_children()],
        # tcp descriptors that bound on creation and were never consumed nor released
        "unused tcp sockets": sorted(now.prebound - before.prebound),
        # producers still registered for early flushes (closed ones must leave)
        "batching producers": sorted(
            repr(_runtime._batching.get(k)) for k in now.batching - before.batching
        ),
    }
    if now.sockets > before.sockets:
        found["zmq sockets"] = now.sockets - before.sockets
    return {k: v for k, v in found.items() if v}


def _clean_up(before: _Snapshot, leaks: dict[str, Any]) -> None:
    """Undo what a test leaked, so the next test starts clean."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)
    for key in set(_runtime._handles) - before.handles:
        handle = _runtime._handles.get(key)
        if handle is None:
            continue
        with contextlib.suppress(Exception):
            handle.close(timeout=0)
        _runtime.forget_handle(key, handle)
    for endpoint in leaks.get("unused tcp sockets", []):
        inlet = _zmq.claim_prebound(endpoint)
        if inlet is not None:
            inlet.close()
    for key in set(_runtime._batching) - before.batching:
        _runtime._batching.pop(key, None)
    rdir = _runtime.runtime_dir()
    for name in leaks.get("ipc files", []):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(rdir, name))


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves shm segments, ipc files, handles, sockets, threads or children."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    before = _snapshot()
    yield
    deadline = time.monotonic() + SETTLE
    leaks = _leaks(before)
    while leaks and set(leaks) - set(KNOWN_CORE_LEAKS) and time.monotonic() < deadline:
        time.sleep(0.02)
        leaks = _leaks(before)
    _clean_up(before, leaks)
    leaks = {k: v for k, v in leaks.items() if k not in KNOWN_CORE_LEAKS}
    if leaks:
        pytest.fail(f"test leaked: {leaks}", pytrace=False)


def pytest_unconfigure(config: pytest.Config) -> None:
    sage_zmq.shutdown()
    if _private_runtime_dir is not None:
        shutil.rmtree(_private_runtime_dir, ignore_errors=True)
        if os.environ.get("SAGE_ZMQ_RUNTIME_DIR") == _private_runtime_dir:
            del os.environ["SAGE_ZMQ_RUNTIME_DIR"]


@pytest.fixture(scope="session", autouse=True)
def _shutdown_at_end() -> Iterator[None]:
    yield
    sage_zmq.shutdown()
