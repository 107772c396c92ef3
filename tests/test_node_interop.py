"""Python and Node.js peers on one queue over tcp on 127.0.0.1 (``transports/node``).

Skipped when ``node`` is not on PATH. When ``transports/node/node_modules`` is missing, the
``node_peer`` fixture installs it (``npm ci``) first, so a clean clone works in CI. Set
``SAGE_ZMQ_REQUIRE_NODE=1`` to turn every skip into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from sage_zmq import DescriptorError, Empty, EndOfStream, Packet, QueueDescriptor
from sage_zmq._fault_proxy import FaultProxy
from sage_zmq.router.keys import instance_for_key

pytestmark = pytest.mark.node

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "transports" / "node"
TIMEOUT = 30.0
PARALLELISMS = (1, 2, 3, 7, 128)
# Reliability timings (PROTOCOL.md section 5) short enough for faults to heal within a test.
FAST = {
    "heartbeat_interval": 0.1,
    "liveness": 3,
    "ack_timeout": 0.2,
    "reconnect_initial": 0.02,
    "reconnect_max": 0.2,
}
NODE_RELIABLE = (
    "--reliable",
    *(arg for key, value in FAST.items() for arg in (f"--{key.replace('_', '-')}", str(value))),
)


def _load_typed() -> ModuleType:
    path = ROOT / "transports" / "vectors" / "make_vectors.py"
    spec = importlib.util.spec_from_file_location("make_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mv = _load_typed()


# ---------------------------------------------------------------------------------- setup
def _unavailable(reason: str) -> None:
    if os.environ.get("SAGE_ZMQ_REQUIRE_NODE") == "1":
        pytest.fail(f"{reason} (SAGE_ZMQ_REQUIRE_NODE=1)")
    pytest.skip(reason)


def ensure_node_modules() -> str | None:
    """Install ``transports/node`` dependencies if node exists and they are missing.

    Returns why the Node peer cannot run, or None when it can.
    """
    node = shutil.which("node")
    if node is None:
        return "node is not on PATH: install Node.js >= 18 to run the interop tests"
    if (NODE_DIR / "node_modules" / "zeromq").is_dir():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return f"{NODE_DIR / 'node_modules'} is missing and npm is not on PATH to install it"
    command = "ci" if (NODE_DIR / "package-lock.json").exists() else "install"
    done = subprocess.run(
        [npm, command, "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        return f"`npm {command}` in {NODE_DIR} failed: {done.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="session")
def node_peer() -> str:
    """Path of the node binary, with the Node peer's dependencies installed."""
    reason = ensure_node_modules()
    if reason is not None:
        _unavailable(reason)
    node = shutil.which("node")
    assert node is not None
    return node


class NodeProcess:
    """A node script whose stdout JSON lines are read by a thread, so reads can time out."""

    def __init__(self, node: str, script: str, *args: str) -> None:
        self.args = [node, str(NODE_DIR / script), *args]
        self.proc = subprocess.Popen(
            self.args,
            cwd=NODE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            if is_stdout:
                self.lines.put(line)
            else:
                self.stderr.append(line)
        if is_stdout:
            self.lines.put(None)

    def message(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next stdout line as JSON."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self._name()} printed nothing for {timeout} s") from None
        if line is None:
            self.proc.wait(timeout=TIMEOUT)
            raise AssertionError(
                f"{self._name()} exited ({self.proc.returncode}) early: {''.join(self.stderr)}"
            )
        return dict(json.loads(line))

    def until(self, key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages before the first one holding ``key``, and that one's value."""
        before: list[dict[str, Any]] = []
        while True:
            msg = self.message()
            if key in msg:
                return before, msg[key]
            before.append(msg)

    def finish(self) -> int:
        code = self.proc.wait(timeout=TIMEOUT)
        for t in self._threads:
            t.join(timeout=TIMEOUT)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        for t in self._threads:
            t.join(timeout=TIMEOUT)

    def _name(self) -> str:
        return " ".join(Path(a).name for a in self.args[1:3])


@pytest.fixture
def spawn(node_peer: str) -> Iterator[Any]:
    """Start node scripts; every one is killed (if still running) and waited for at the end."""
    started: list[NodeProcess] = []

    def start(script: str, *args: str) -> NodeProcess:
        proc = NodeProcess(node_peer, script, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def _producer_qd(endpoint: str, maxsize: int, **meta: Any) -> QueueDescriptor:
    return QueueDescriptor(
        queue_id="interop",
        queue_type="tcp",
        metadata={"maxsize": maxsize, "endpoint": endpoint, **meta},
    )


def _consumer_qd(maxsize: int, upstreams: int = 1) -> QueueDescriptor:
    return QueueDescriptor(
        queue_id="interop",
        queue_type="tcp",
        metadata={"maxsize": maxsize, "upstreams": upstreams},
    )


def _drain(qd: QueueDescriptor) -> list[Any]:
    out: list[Any] = []
    while True:
        rec = qd.get(timeout=TIMEOUT)
        if isinstance(rec, EndOfStream):
            return out
        out.append(rec)


def _serve_until_exit(qd: QueueDescriptor, proc: NodeProcess) -> int:
    """Keep the Python consumer reading until a Node producer has exited; its exit code.

    The Python consumer reads the wire only inside get(), and the producer's CLOSE (sent right
    after END) needs a reply, so after the last record we go on calling get() until the
    producer has its receipt and exits.
    """
    deadline = time.monotonic() + TIMEOUT
    while proc.proc.poll() is None and time.monotonic() < deadline:
        try:
            leftover = qd.get(timeout=0)
        except Empty:
            leftover = EndOfStream()
        assert isinstance(leftover, EndOfStream), f"unexpected record {leftover!r}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(timeout=0.05)
    return proc.finish()


def _python_records(n: int) -> list[Any]:
    """Every record type, in a cycle (no maps with integer-like str keys: JS reorders them)."""
    ts = 1700000000.125
    cycle: list[Any] = [
        0,
        -1,
        2**53 + 1,
        2**64 - 1,
        -(2**63),
        1.5,
        2.0,
        -0.0,
        float("inf"),
        "héllo",
        "",
        b"\x00\x01",
        b"",
        None,
        True,
        False,
        [1, [2.0, None]],
        {"a": 1, "b": [b"x"]},
        Packet({"p": 1}, 3, "key", "hash", {"h": "v"}, ts),
        Packet(b"raw", 0, None, None, None, ts),
        np.arange(6, dtype="<i4").reshape(2, 3),
        np.array([1.5, -2.0], dtype="<f8"),
        np.array([(1, 2.5)], dtype=[("x", "<i4"), ("y", "<f8")]),
    ]
    out: list[Any] = []
    for i in range(n):
        item = cycle[i % len(cycle)]
        out.append({"i": i, "v": item} if i % 5 == 0 else item)
    return out


def _keys() -> list[Any]:
    """Partition keys of every type, with edge values."""
    keys: list[Any] = [
        "",
        "a",
        "user-1",
        "ключ",
        "🙂",
        0,
        1,
        -1,
        2**31,
        -(2**31) - 1,
        2**53 + 3,
        2**64 - 1,
        -(2**63),
        b"",
        b"\x00",
        b"\xff\xfe\xfd\xfc\xfb",
        0.0,
        -0.0,
        1.0,
        3.0,
        -1.5,
        0.1,
        1e300,
        float("inf"),
        float("-inf"),
        True,
        False,
    ]
    keys += [f"k{i}" for i in range(60)] + list(range(1000, 1060)) + [i / 7 for i in range(30)]
    return keys


def _partition_headers(key: Any) -> dict[str, Any]:
    return {"partition": {str(p): instance_for_key(key, p) for p in PARALLELISMS}}


def _typed(value: Any) -> Any:
    return mv.to_typed(value)


# ---------------------------------------------------------------------------------- tests
def test_python_producer_to_node_consumer(spawn: Any) -> None:
    consumer = spawn("consume.js", "--maxsize", "40", "--print", "records")
    endpoint = consumer.message()["endpoint"]
    records = _python_records(460)
    qd = _producer_qd(endpoint, 40)
    for rec in records:
        qd.put(rec, timeout=TIMEOUT)
    qd.put(EndOfStream())
    qd.close(timeout=TIMEOUT)
    got, summary = consumer.until("summary")
    assert consumer.finish() == 0, "".join(consumer.stderr)
    assert summary["end_of_stream"] and summary["upstreams_ended"] == 1
    assert summary["records"] == len(records) and summary["rejected"] == 0
    assert [m["record"] for m in got] == [_typed(r) for r in records]


def test_python_lz4_producer_to_node_consumer(spawn: Any) -> None:
    # Batches of ~100 records of 3 KB: LZ4 frames of several linked 64 KB blocks.
    consumer = spawn("consume.js", "--maxsize", "500", "--print", "records")
    endpoint = consumer.message()["endpoint"]
    records = [{"i": i, "text": f"line {i} " + "abcdefgh" * 400} for i in range(300)]
    qd = _producer_qd(endpoint, 500, compression=True, batch_size=100)
    for rec in records:
        qd.put(rec, timeout=TIMEOUT)
    qd.put(EndOfStream())
    qd.close(timeout=TIMEOUT)
    got, summary = consumer.until("summary")
    assert consumer.finish() == 0
    assert [m["record"] for m in got] == [_typed(r) for r in records]
    assert summary["batches"] < len(records), "records should have travelled in batches"


def test_node_producer_to_python_consumer(spawn: Any) -> None:
    qd = _consumer_qd(maxsize=30)
    try:
        producer = spawn(
            "produce.js", str(qd.endpoint), "400", "--kind", "mixed", "--maxsize", "30", "--echo"
        )
        received = _drain(qd)
        assert _serve_until_exit(qd, producer) == 0, "".join(producer.stderr)
        echoed, done = producer.until("done")
        assert done["sent"] == 400 and done["credit_waits"] > 0
        assert [_typed(r) for r in received] == [m["record"] for m in echoed]
        kinds = {type(r).__name__ for r in received}
        expected = {"int", "float", "str", "bytes", "list", "dict", "ndarray", "Packet", "bool"}
        assert expected <= kinds
    finally:
        qd.close()


def test_two_node_upstreams_end_python_stream_only_when_both_end(spawn: Any) -> None:
    qd = _consumer_qd(maxsize=64, upstreams=2)
    try:
        first = spawn("produce.js", str(qd.endpoint), "800", "--maxsize", "64", "--start", "0")
        got = [qd.get(timeout=TIMEOUT) for _ in range(800)]
        assert _serve_until_exit(qd, first) == 0, "".join(first.stderr)
        # One END of two: the stream must go on (Empty), not end.
        with pytest.raises(Empty):
            qd.get(timeout=0.5)
        second = spawn("produce.js", str(qd.endpoint), "800", "--maxsize", "64", "--start", "5000")
        got += _drain(qd)
        assert _serve_until_exit(qd, second) == 0, "".join(second.stderr)
        assert got == list(range(800)) + list(range(5000, 5800))
        assert isinstance(qd.get(timeout=1), EndOfStream), "end of stream is sticky"
    finally:
        qd.close()


def test_node_consumer_counts_python_and_node_upstreams(spawn: Any) -> None:
    consumer = spawn("consume.js", "--maxsize", "50", "--upstreams", "2")
    endpoint = consumer.message()["endpoint"]
    qd = _producer_qd(endpoint, 50)
    for i in range(300):
        qd.put(i, timeout=TIMEOUT)
    qd.put(EndOfStream())
    qd.close(timeout=TIMEOUT)  # returns once the consumer confirmed the END too
    assert consumer.proc.poll() is None, "one END of two must not end the Node consumer"
    producer = spawn("produce.js", endpoint, "300", "--maxsize", "50", "--start", "1000")
    assert producer.finish() == 0, "".join(producer.stderr)
    _, summary = consumer.until("summary")
    assert consumer.finish() == 0
    assert summary["records"] == 600 and summary["upstreams_ended"] == 2
    assert summary["end_of_stream"] and summary["producers"] == 2


def test_keyed_stream_python_to_node_same_partitions(spawn: Any) -> None:
    consumer = spawn("consume.js", "--maxsize", "100", "--check-partition")
    endpoint = consumer.message()["endpoint"]
    keys = _keys()
    qd = _producer_qd(endpoint, 100)
    for i, key in enumerate(keys):
        qd.put(Packet({"i": i}, 0, key, "hash", _partition_headers(key)), timeout=TIMEOUT)
    qd.put(EndOfStream())
    qd.close(timeout=TIMEOUT)
    _, summary = consumer.until("summary")
    assert consumer.finish() == 0
    assert summary["records"] == len(keys)
    assert summary["partition_checked"] == len(keys) * len(PARALLELISMS)
    assert summary["partition_mismatches"] == 0, summary["mismatch_examples"]


def test_keyed_stream_node_to_python_same_partitions(spawn: Any) -> None:
    qd = _consumer_qd(maxsize=100)
    try:
        producer = spawn(
            "produce.js",
            str(qd.endpoint),
            "700",
            "--kind",
            "packets",
            "--keys",
            "100",
            "--maxsize",
            "100",
        )
        packets = _drain(qd)
        assert _serve_until_exit(qd, producer) == 0, "".join(producer.stderr)
        assert len(packets) == 700
        key_types = set()
        for pkt in packets:
            assert isinstance(pkt, Packet)
            key_types.add(type(pkt.partition_key).__name__)
            assert pkt.headers is not None
            for p, index in pkt.headers["partition"].items():
                assert instance_for_key(pkt.partition_key, int(p)) == index, (
                    pkt.partition_key,
                    p,
                )
        assert key_types == {"str", "int", "bytes", "float", "bool"}
        assert any(
            isinstance(k, float) and k.is_integer() for k in (p.partition_key for p in packets)
        ), "integral float keys must stay floats"
    finally:
        qd.close()


def test_node_peer_unit_tests_pass(node_peer: str) -> None:
    """The Node peer's own suite: every golden vector both ways, partition vectors, peers."""
    # `node --test` runs each file in a child process of its own: a session of their own, so
    # that a run that times out is ended whole (killing node alone orphaned the file's child).
    proc = subprocess.Popen(
        [node_peer, "--test", *sorted(str(p) for p in (NODE_DIR / "test").glob("*.test.js"))],
        cwd=NODE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the Node suite ran over 120 s:\n{stdout[-3000:]}{stderr[-2000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything a finished run left behind
    assert proc.returncode == 0, stdout[-3000:] + stderr[-2000:]
    assert "# fail 0" in stdout


# ---------------------------------------------------------------------------------- sage queues
def _sage_consumer_qd(queue_id: str, maxsize: int) -> QueueDescriptor:
    """A reliable Python consumer bound on a free loopback port (bound as it is created)."""
    return QueueDescriptor(queue_id, "sage", {**FAST, "transport": "tcp", "maxsize": maxsize})


def test_node_reliable_producer_through_cutting_proxy_to_python_sage(spawn: Any) -> None:
    # The proxy cuts every connection every 0.5 s; --pace makes the stream last >= 1.5 s, so
    # several cuts land mid-stream and frames in flight are lost and must be retransmitted.
    n = 30_000
    qd = _sage_consumer_qd("node-sage-cut", maxsize=500)
    port = int(str(qd.endpoint).rsplit(":", 1)[1])
    with FaultProxy(port, cut_every=0.5, stall_chance=0.5, stall_for=0.15, seed=3) as proxy:
        try:
            with contextlib.suppress(Empty):
                qd.get_nowait()  # bound and reading before the producer starts
            producer = spawn(
                "produce.js", proxy.endpoint, str(n), "--maxsize", "500", "--pace", "100",
                *NODE_RELIABLE,
            )  # fmt: skip
            got = _drain(qd)
            assert _serve_until_exit(qd, producer) == 0, "".join(producer.stderr)
            _, done = producer.until("done")
        finally:
            qd.close()
        stats = proxy.stats
    assert stats.connections >= 3, f"the stream outran the faults: {stats}"
    lost, doubled = n - len(set(got)), len(got) - len(set(got))
    assert got == list(range(n)), f"{len(got)} records, {lost} lost, {doubled} doubled"
    assert done["sent"] == n and done["resends"] >= 1, done


def test_python_sage_producer_to_node_reliable_consumer(spawn: Any) -> None:
    consumer = spawn("consume.js", "--maxsize", "40", "--print", "records", *NODE_RELIABLE)
    endpoint = consumer.message()["endpoint"]
    records = _python_records(460)
    qd = QueueDescriptor("py-sage-node", "sage", {**FAST, "endpoint": endpoint, "maxsize": 40})
    try:
        for rec in records:
            qd.put(rec, timeout=TIMEOUT)
        qd.put(EndOfStream())
        stats = qd.statistics()
    finally:
        qd.close(timeout=TIMEOUT)  # a reliable close returns once the Node side consumed it all
    got, summary = consumer.until("summary")
    assert consumer.finish() == 0, "".join(consumer.stderr)
    assert stats.extra is not None and stats.extra["producer_id"]
    assert summary["end_of_stream"] and summary["upstreams_ended"] == 1
    assert summary["records"] == len(records) and summary["rejected"] == 0
    assert summary["prompts"] == 0 and summary["gaps"] == 0
    assert [m["record"] for m in got] == [_typed(r) for r in records]


def test_python_sage_producer_through_cutting_proxy_to_node_reliable_consumer(
    spawn: Any,
) -> None:
    n = 20_000
    consumer = spawn("consume.js", "--maxsize", "300", "--print", "records", *NODE_RELIABLE)
    endpoint = consumer.message()["endpoint"]
    port = int(endpoint.rsplit(":", 1)[1])
    with FaultProxy(port, cut_every=0.3, seed=5) as proxy:
        qd = QueueDescriptor(
            "py-sage-node-cut", "sage", {**FAST, "endpoint": proxy.endpoint, "maxsize": 300}
        )
        try:
            for i in range(n):
                qd.put(i, timeout=TIMEOUT)
                if i % 100 == 99:
                    time.sleep(0.005)  # pacing, so that cuts land mid-stream (>= 1 s)
            qd.put(EndOfStream())
        finally:
            qd.close(timeout=TIMEOUT)  # returns once the Node side consumed everything
        stats = proxy.stats
    got, summary = consumer.until("summary")
    assert consumer.finish() == 0, "".join(consumer.stderr)
    assert stats.connections >= 3, f"the stream outran the faults: {stats}"
    values = [m["record"] for m in got]
    assert values == [{"int": i} for i in range(n)], (
        f"{len(values)} records, {summary['duplicates']} duplicates dropped"
    )
    assert summary["end_of_stream"] and summary["records"] == n


def test_python_sage_consumer_restarts_while_node_producer_runs(spawn: Any) -> None:
    n, first_life = 5000, 1500
    qd = _sage_consumer_qd("node-sage-restart", maxsize=200)
    producer = spawn("produce.js", str(qd.endpoint), str(n), "--maxsize", "200", *NODE_RELIABLE)
    try:
        first = [qd.get(timeout=TIMEOUT) for _ in range(first_life)]
    finally:
        qd.close()  # mid-stream: the producer holds what this life did not ack
    # A new consumer incarnation (new session) binds the same port, once libzmq has released
    # it (a socket closes in its I/O thread, after close() returned).
    again = qd.with_options()
    deadline = time.monotonic() + TIMEOUT
    head: list[Any] = []
    while True:
        try:
            head.append(again.get_nowait())  # binds
            break
        except Empty:
            break
        except DescriptorError:
            assert time.monotonic() < deadline, "the consumer's port was never released"
            time.sleep(0.01)
    try:
        assert not any(isinstance(r, EndOfStream) for r in head)
        rest = head + _drain(again)
        assert _serve_until_exit(again, producer) == 0, "".join(producer.stderr)
        _, done = producer.until("done")
    finally:
        again.close()
    assert first == list(range(first_life))
    # Without consumer persistence, records the first life received but had not reported as
    # consumed come again (at least once); nothing may be missing, and each life is in order.
    assert rest and rest[0] <= first_life, rest[:3]
    assert rest == list(range(rest[0], n)), "a record was lost or reordered after the restart"
    assert done["resends"] >= 1, done
