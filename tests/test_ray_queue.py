"""The ``ray`` queue type: driver, tasks and actors on two Ray nodes of this machine.

One Ray session for the whole module (a two-node ``ray.cluster_utils.Cluster`` on 127.0.0.1),
started and stopped by the module fixture. Actors take no CPU so that a few fit on 2 cores;
``node_a``/``node_b`` resources pin them to a node.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from sage_zmq import (  # noqa: E402
    DeliveryError,
    DescriptorError,
    Empty,
    EndOfStream,
    Full,
    MissingDependency,
    QueueDescriptor,
)
from sage_zmq.queues import ray as rayq  # noqa: E402
from sage_zmq.queues.ray import consume_here, lookup_consumer  # noqa: E402
from sage_zmq.testing import wait_until  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
ON_A = {"num_cpus": 0, "resources": {"node_a": 1}}
ON_B = {"num_cpus": 0, "resources": {"node_b": 1}}
WAIT = 60.0


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[Any]:
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"node_a": 100},
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
        },
    )
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 100}, node_ip_address="127.0.0.1")
        # Without this Ray rewrites 127.0.0.1 to the host's external address when the driver
        # connects; the switch only chooses loopback, the cluster itself is unchanged.
        saved = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address=cluster.address, namespace="sage-zmq-tests", log_to_driver=False)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# ----------------------------------------------------------------------------- actors
@ray.remote(max_restarts=1, max_task_retries=0)
class Consumer:
    """Binds at construction (also after a restart) and hands records back on request."""

    def __init__(self, qd: QueueDescriptor) -> None:
        self.qd = qd
        consume_here(qd)

    def where(self) -> tuple[str, str, int]:
        entry = lookup_consumer(self.qd)
        assert entry is not None
        return ray.get_runtime_context().get_node_id(), entry.endpoint, os.getpid()

    def take(self, n: int, timeout: float = WAIT) -> list[Any]:
        out: list[Any] = []
        while len(out) < n:
            item = self.qd.get(timeout=timeout)
            out.append(item)
            if isinstance(item, EndOfStream):
                break
        return out

    def take_until_quiet(self, quiet: float) -> list[Any]:
        """What arrives until nothing does for ``quiet`` seconds after the first record (or
        the end of stream). The first may take long: its producer actor is still starting."""
        out: list[Any] = []
        while True:
            try:
                item = self.qd.get(timeout=quiet if out else WAIT)
            except Empty:
                return out
            out.append(item)
            if isinstance(item, EndOfStream):
                return out

    def drain(self) -> list[Any]:
        out = list(self.qd)  # until every upstream ended
        self.qd.close()
        return out

    def close(self) -> bool:
        self.qd.close()
        return True

    def stats(self) -> dict[str, Any]:
        s = self.qd.statistics()
        return {
            "received": s.received,
            "gaps": (s.extra or {}).get("gaps", 0),
            "rejected": s.rejected,
        }


@ray.remote
class Producer:
    def __init__(self, qd: QueueDescriptor) -> None:
        self.qd = qd

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def produce(self, tag: str, n: int, end: bool = True) -> int:
        for i in range(n):
            self.qd.put([tag, i], timeout=WAIT)
        if end:
            self.qd.put(EndOfStream())
        self.qd.close()
        return n

    def produce_via(self, tag: str, n: int) -> str:
        """Produce like ``produce``; returns the endpoint the records went to."""
        for i in range(n):
            self.qd.put([tag, i], timeout=WAIT)
        self.qd.put(EndOfStream())
        extra = self.qd.statistics().extra or {}
        self.qd.close()
        return str(extra["endpoint"])


@ray.remote(num_cpus=1)
def produce_task(qd: QueueDescriptor, tag: str, n: int) -> int:
    for i in range(n):
        qd.put([tag, i], timeout=WAIT)
    qd.put(EndOfStream())
    qd.close()
    return n


def _per_producer(records: list[Any]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for tag, i in records:
        seen.setdefault(tag, []).append(i)
    return seen


# ----------------------------------------------------------------------------- value
def test_descriptor_is_a_small_value() -> None:
    qd = QueueDescriptor("rq-value", "ray", {"maxsize": 64})
    assert qd.endpoint == "ray://rq-value"
    assert len(pickle.dumps(qd)) < 300  # no actor handle, no address inside
    assert QueueDescriptor.from_json(qd.to_json()) == qd
    assert pickle.loads(pickle.dumps(qd)) == qd


def test_bad_ray_metadata_is_clear() -> None:
    with pytest.raises(DescriptorError, match="leave endpoint out"):
        QueueDescriptor("rq-bad", "ray", {"endpoint": "tcp://127.0.0.1:5555"})
    with pytest.raises(DescriptorError, match="not connectable"):
        QueueDescriptor("rq-bad", "ray", {"host": "0.0.0.0"})
    for host in ("tcp://127.0.0.1", "127.0.0.1:5555"):
        with pytest.raises(DescriptorError, match="no scheme or port"):
            QueueDescriptor("rq-bad", "ray", {"host": host})
    with pytest.raises(DescriptorError, match="not an IPv4 address"):
        QueueDescriptor("rq-bad", "ray", {"host": "256.1.1.1"})
    for bind in ("tcp://127.0.0.1:0", 42):  # the consumer picks its port; host names the address
        with pytest.raises(DescriptorError, match=r"'bind'\] does not apply.*metadata\['host'\]"):
            QueueDescriptor("rq-bad", "ray", {"bind": bind})
    with pytest.raises(DescriptorError, match="leave endpoint out"):
        QueueDescriptor.from_dict(
            {"queue_id": "a", "queue_type": "ray", "metadata": {"endpoint": "ray://b"}}
        )


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingDependency, match=r"pip install sage-zmq\[ray\]"):
        QueueDescriptor("rq-missing", "ray")
    restored = QueueDescriptor.from_dict(
        {"queue_id": "rq-m", "queue_type": "ray", "metadata": {"endpoint": "ray://rq-m"}}
    )
    with pytest.raises(MissingDependency, match=r"sage-zmq\[ray\]"):
        restored.put(1)
    restored.close()


def test_not_connected_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    qd = QueueDescriptor("rq-nc", "ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(rayq.RayNotConnected, match=r"ray\.init\(\)"):
        qd.put(1)
    qd.close()


# ----------------------------------------------------------------------------- topologies
def test_driver_to_actor_and_back() -> None:
    to_actor = QueueDescriptor("rq-d2a", "ray", {"maxsize": 200})
    back = QueueDescriptor("rq-a2d", "ray", {"maxsize": 200})
    consumer = Consumer.options(**ON_B).remote(to_actor)
    producer = Producer.options(**ON_B).remote(back)
    try:
        drained = consumer.drain.remote()
        for i in range(3000):
            to_actor.put(["driver", i])
        to_actor.put(EndOfStream())
        to_actor.close()  # returns once the actor's consumer confirmed everything
        got = ray.get(drained, timeout=WAIT)
        assert _per_producer(got) == {"driver": list(range(3000))}
        done = producer.produce.remote("actor", 3000)
        received = list(back)
        assert ray.get(done, timeout=WAIT) == 3000
        assert _per_producer(received) == {"actor": list(range(3000))}
    finally:
        back.close()
        ray.kill(consumer)
        ray.kill(producer)


def test_tasks_as_producers() -> None:
    qd = QueueDescriptor("rq-tasks", "ray", {"maxsize": 500, "upstreams": 3})
    refs = [produce_task.remote(qd, f"t{k}", 2000) for k in range(3)]
    try:
        got = list(qd)  # the driver consumes; tasks find it through Ray
        assert ray.get(refs, timeout=WAIT) == [2000] * 3
        assert _per_producer(got) == {f"t{k}": list(range(2000)) for k in range(3)}
    finally:
        qd.close()


def test_actor_to_actor_across_two_nodes() -> None:
    qd = QueueDescriptor("rq-nodes", "ray", {"maxsize": 1000, "upstreams": 2})
    consumer = Consumer.options(**ON_B).remote(qd)
    producers = [Producer.options(**ON_A).remote(qd) for _ in range(2)]
    try:
        node_b, endpoint, _ = ray.get(consumer.where.remote())
        node_a = ray.get(producers[0].node.remote())
        assert node_a != node_b, "the placement did not split the actors over two nodes"
        assert endpoint.startswith("tcp://127.0.0.1:")
        done = [p.produce.remote(f"p{k}", 5000) for k, p in enumerate(producers)]
        got = ray.get(consumer.drain.remote(), timeout=WAIT)
        assert ray.get(done, timeout=WAIT) == [5000, 5000]
        assert _per_producer(got) == {"p0": list(range(5000)), "p1": list(range(5000))}
    finally:
        for actor in (consumer, *producers):
            ray.kill(actor)


def test_a_producer_on_the_consumers_node_sends_over_ipc() -> None:
    qd = QueueDescriptor("rq-ipc", "ray", {"maxsize": 500, "upstreams": 2})
    consumer = Consumer.options(**ON_B).remote(qd)
    near, far = Producer.options(**ON_B).remote(qd), Producer.options(**ON_A).remote(qd)
    try:
        ray.get(consumer.where.remote(), timeout=WAIT)  # bound and published
        entry = lookup_consumer(qd)
        # The abstract namespace: no socket file, so a killed consumer leaves none behind.
        assert entry is not None and entry.local_endpoint.startswith("ipc://@")
        via = [near.produce_via.remote("near", 3000), far.produce_via.remote("far", 3000)]
        got = ray.get(consumer.drain.remote(), timeout=WAIT)  # closes the consumer
        assert ray.get(via, timeout=WAIT) == [entry.local_endpoint, entry.endpoint]
        assert _per_producer(got) == {"near": list(range(3000)), "far": list(range(3000))}
    finally:
        for actor in (consumer, near, far):
            ray.kill(actor)


def test_ipc_false_keeps_same_node_producers_on_tcp() -> None:
    qd = QueueDescriptor("rq-no-ipc", "ray", {"maxsize": 500, "ipc": False})
    consumer = Consumer.options(**ON_B).remote(qd)
    near = Producer.options(**ON_B).remote(qd)
    try:
        ray.get(consumer.where.remote(), timeout=WAIT)
        entry = lookup_consumer(qd)
        assert entry is not None and entry.local_endpoint == ""
        via = near.produce_via.remote("near", 1000)
        got = ray.get(consumer.drain.remote(), timeout=WAIT)
        assert ray.get(via, timeout=WAIT) == entry.endpoint
        assert entry.endpoint.startswith("tcp://")
        assert _per_producer(got) == {"near": list(range(1000))}
    finally:
        ray.kill(consumer)
        ray.kill(near)
    with pytest.raises(DescriptorError, match=r"metadata\['ipc'\].*true or false"):
        QueueDescriptor("rq-bad-ipc", "ray", {"ipc": "yes"})


def test_producer_before_consumer_and_backpressure_without_drops() -> None:
    qd = QueueDescriptor("rq-late", "ray", {"maxsize": 50})
    try:
        for i in range(50):  # no consumer yet: the window's records wait in the producer
            qd.put(i, timeout=1)
        with pytest.raises(Full):
            qd.put(50, timeout=0.3)  # credits, not drops: no room, no consumer
        consumer = Consumer.options(**ON_B).remote(qd)
        try:
            first = ray.get(consumer.take.remote(50), timeout=WAIT)
            assert first == list(range(50))  # the late consumer got the early records
            with pytest.raises(Full):
                for i in range(1000):  # the consumer does not read: put blocks, then Full
                    qd.put(100 + i, timeout=0.3)
            accepted = i
            qd.put(EndOfStream(), timeout=WAIT)
            rest = ray.get(consumer.take.remote(10_000), timeout=WAIT)
            assert rest[-1] == EndOfStream()
            assert rest[:-1] == [100 + k for k in range(accepted)]  # every accepted record
        finally:
            ray.kill(consumer)
    finally:
        _close_quietly(qd)


@pytest.mark.parametrize("ack", [False, True])
def test_records_put_between_two_consumers_wait_for_the_second(
    ack: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer that closes unpublishes itself; what is put before the next one appears
    waits in the producer (it went into the closed one's socket and was lost)."""
    caplog.set_level("INFO", logger="sage_zmq.connection")
    qd = QueueDescriptor(f"rq-between-{ack}", "ray", {"maxsize": 1000, "ack": ack})
    first = Consumer.options(**ON_B).remote(qd)
    second = None
    try:
        for i in range(10):
            qd.put(i, timeout=WAIT)
        assert ray.get(first.take.remote(10), timeout=WAIT) == list(range(10))
        ray.get(first.close.remote(), timeout=WAIT)
        assert lookup_consumer(qd) is None
        # What is sent before the producer sees the connection end goes to the closed one
        # (docs/tutorial.md; a loaded machine delays that event): wait until it has seen it.
        _until_the_producer_noticed(qd)
        for i in range(10, 60):  # nobody consumes now
            qd.put(i, timeout=WAIT)
        second = Consumer.options(**ON_B).remote(qd)
        drained = second.drain.remote()
        qd.put(EndOfStream())
        qd.close(timeout=WAIT)  # nothing lost: no DeliveryError
        assert ray.get(drained, timeout=WAIT) == list(range(10, 60))
        events = [getattr(r, "sage_event", "") for r in caplog.records]
        assert "reconnect" in events and "lost" not in events
    finally:
        _close_quietly(qd)
        for actor in (first, second):
            if actor is not None:
                ray.kill(actor)


def test_a_second_live_consumer_is_refused() -> None:
    """A queue has one consumer. A second one used to replace the first in the registry
    silently, and which of them got the records depended on when producers looked it up."""
    qd = QueueDescriptor("rq-second", "ray", {"maxsize": 100})
    first = Consumer.options(**ON_B).remote(qd)
    try:
        ray.get(first.where.remote(), timeout=WAIT)  # bound and published
        with pytest.raises(DescriptorError, match=r"already has a consumer .* one consumer"):
            consume_here(qd)
        qd.put("x", timeout=WAIT)
        assert ray.get(first.take.remote(1), timeout=WAIT) == ["x"]  # the first still has it
    finally:
        _close_quietly(qd)
        ray.kill(first)


def test_a_dead_consumers_stale_entry_does_not_block_its_successor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A killed actor never unpublishes. Its port may serve another socket by now (even the
    successor's), so on this host the kernel is asked whether its process lives."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()  # something unrelated now listens on the dead consumer's port
        endpoint = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        stale = rayq.ConsumerEntry(endpoint, "t", "n", int(dead.stdout), "", rayq._netns())
        monkeypatch.setattr(rayq, "lookup_consumer", lambda qd: stale)
        qd = QueueDescriptor("rq-stale", "ray")
        rayq._refuse_if_consumed(qd, "tcp://127.0.0.1:1")  # the dead one is replaced
        rayq._refuse_if_consumed(qd, endpoint)  # nor is a consumer refused by its own entry
        alive = rayq.ConsumerEntry(endpoint, "t", "n", os.getppid(), "", rayq._netns())
        monkeypatch.setattr(rayq, "lookup_consumer", lambda qd: alive)
        with pytest.raises(DescriptorError, match="already has a consumer"):
            rayq._refuse_if_consumed(qd, "tcp://127.0.0.1:1")


def _until_the_producer_noticed(qd: QueueDescriptor) -> None:
    producer = qd._handle().producer(qd)
    link = getattr(producer, "_keeping", None)
    link = producer._link if link is None else link.inner  # the reliable layer wraps it

    def noticed() -> bool:
        with link._lock:
            link._watch()  # what its next put would read
        return bool(link._suspect or link._parked_at is not None)

    wait_until(noticed, WAIT, "the producer to see its consumer's connection end")


def _close_quietly(qd: QueueDescriptor) -> None:
    with contextlib.suppress(Exception):
        qd.close(timeout=2)


# ----------------------------------------------------------------------------- restarts
def _kill_and_wait_for_restart(consumer: Any, before: tuple[str, str, int]) -> tuple[str, str, int]:
    """Kill the consumer actor, let Ray restart it (max_restarts=1); its new ``where``."""
    ray.kill(consumer, no_restart=False)
    deadline = time.monotonic() + WAIT
    while True:  # the kill is asynchronous: the old instance may answer a call or two
        try:
            after: tuple[str, str, int] = ray.get(consumer.where.remote(), timeout=WAIT)
            if after[2] != before[2]:
                return after
        except ray.exceptions.RayActorError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the consumer actor was not restarted")
        time.sleep(0.05)  # polling the actor's state: there is no event to wait on


def _restart_run(
    qd: QueueDescriptor, n: int, placement: dict[str, Any] = ON_B
) -> tuple[list[Any], list[Any], list[BaseException], list[str]]:
    """Produce n records from the driver while the consumer actor is killed and restarted.

    The driver runs on node a: a consumer there is reached over ipc, one on node b over tcp.
    Returns what the consumer's two lives took, the producer's errors, and where it sent last.
    """
    consumer = Consumer.options(**placement).remote(qd)
    before = ray.get(consumer.where.remote())
    errors: list[BaseException] = []
    via: list[str] = []

    def produce() -> None:
        try:
            for i in range(n):
                qd.put(["driver", i], timeout=20)
            qd.put(EndOfStream(), timeout=20)
            extra = qd.statistics().extra or {}
            via.append(extra["endpoint"])
            via.append(f"reconnects={extra.get('reconnects')}")
            qd.close(timeout=20)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=produce, name="ray-restart-producer")
    thread.start()
    try:
        first = ray.get(consumer.take.remote(n // 4), timeout=WAIT)
        after = _kill_and_wait_for_restart(consumer, before)
        assert after[1] != before[1], "the restarted consumer did not publish a new endpoint"
        second = ray.get(consumer.take.remote(10 * n), timeout=WAIT)
        thread.join(WAIT)
        assert not thread.is_alive()
        # The producer introduced itself to the new consumer with a HELLO it accepted.
        assert ray.get(consumer.stats.remote(), timeout=WAIT)["rejected"] == 0
    finally:
        ray.kill(consumer)
        thread.join(WAIT)
    return first, second, errors, via


def test_consumer_restart_producers_follow(caplog: pytest.LogCaptureFixture) -> None:
    qd = QueueDescriptor("rq-restart", "ray", {"maxsize": 200})
    try:
        with caplog.at_level("INFO", logger="sage_zmq.connection"):
            first, second, errors, via = _restart_run(qd, 4000)
    finally:
        _close_quietly(qd)
    assert second[-1] == EndOfStream(), "the producer never reached the restarted consumer"
    assert via[1] == "reconnects=1"  # statistics count the move to the restarted consumer
    seqs = [i for _, i in first + second[:-1]]
    assert seqs[: len(first)] == list(range(len(first)))
    assert seqs == sorted(seqs) and seqs[-1] == 3999  # in order, up to the last record
    lost = 4000 - len(seqs)
    # Without ack, what the dead consumer held or had in flight is gone (at most a window),
    # and it is reported, never silent: the producer warns with the range at the switch, and
    # its close() raises DeliveryError saying how many at most.
    assert lost <= 200
    if lost:
        assert len(errors) == 1 and isinstance(errors[0], DeliveryError), errors
    for error in errors:
        assert isinstance(error, DeliveryError) and "restarted" in str(error), errors
        assert error.undelivered >= lost, (error.undelivered, lost)
    told = [r for r in caplog.records if "consumer restarted" in r.getMessage()]
    assert [r.sage_event for r in told][:1] == ["reconnect"], "the switch was not reported"
    if lost:
        (warned,) = [r.getMessage() for r in told if r.sage_event == "lost"]
        assert "ack" in warned and "up to" in warned, warned


@pytest.mark.parametrize("placement", [ON_B, ON_A], ids=["tcp", "ipc"])
def test_consumer_restart_with_ack_loses_nothing(placement: dict[str, Any]) -> None:
    qd = QueueDescriptor("rq-restart-ack", "ray", {"maxsize": 200, "ack": True})
    try:
        first, second, errors, via = _restart_run(qd, 4000, placement)
    finally:
        _close_quietly(qd)
    assert not errors, errors
    assert via[0].startswith("ipc://@" if placement is ON_A else "tcp://"), via
    assert via[1] not in ("reconnects=0", "reconnects=None"), via  # the move is counted
    assert second[-1] == EndOfStream()
    seqs = [i for _, i in first + second[:-1]]
    assert set(seqs) == set(range(4000))  # nothing lost
    assert seqs[len(first) :] == sorted(seqs[len(first) :])  # in order within each life
    # at least once: only records the dead consumer handed out before its ack may repeat
    assert len(seqs) - 4000 <= 200


# ----------------------------------------------------------------------------- others
def test_example_pipeline_runs_on_ray() -> None:
    sys.path.insert(0, EXAMPLES)
    try:
        import ray_pipeline
    finally:
        sys.path.remove(EXAMPLES)
    result = ray_pipeline.run_pipeline(5000)
    ray_pipeline.check(result)  # every record once, every key on its owner
    assert result["received"] == 5000
    assert all(result["per_worker"]), "one worker got nothing: keys were not spread"


def test_wrapped_ray_util_queue() -> None:
    from ray.util.queue import Queue

    rq = Queue(maxsize=10)
    qd = QueueDescriptor.from_existing(rq)
    assert qd.queue_type == "wrapped" and qd.maxsize == 10
    producer = Producer.options(**ON_A).remote(qd)  # the actor handle inside serializes
    try:
        done = producer.produce.remote("rq", 30)  # maxsize 10: it waits for us to read
        got = []
        while not isinstance(item := qd.get(timeout=WAIT), EndOfStream):
            got.append(item)
        assert ray.get(done, timeout=WAIT) == 30
        assert got == [["rq", i] for i in range(30)]
        with pytest.raises(Full):
            for i in range(11):
                qd.put(i, timeout=0.2)
        assert rq.qsize() == 10
    finally:
        qd.close()
        from sage_zmq.queues import wrapped

        wrapped.forget(qd)
        ray.kill(producer)
        rq.shutdown()


@pytest.mark.parametrize("ack", [False, True], ids=["plain", "ack"])
def test_an_upstream_that_ended_before_a_restart_is_not_waited_for(ack: bool) -> None:
    # Upstream a ends (its close returns: the consumer counted and confirmed its end), then the
    # consumer is killed and restarted; upstream b ends later. The restarted consumer must end
    # the stream after b: a never sends its end again. It waited forever before.
    qd = QueueDescriptor(f"rq-ends-{ack}", "ray", {"maxsize": 200, "upstreams": 2, "ack": ack})
    consumer = Consumer.options(**ON_B).remote(qd)
    try:
        before = ray.get(consumer.where.remote(), timeout=WAIT)
        taking = consumer.take_until_quiet.remote(2.0)
        assert ray.get(Producer.remote(qd).produce.remote("a", 50), timeout=WAIT) == 50
        first = ray.get(taking, timeout=WAIT)
        assert [i for _, i in first] == list(range(50))
        _kill_and_wait_for_restart(consumer, before)
        taking = consumer.take.remote(1000)
        assert ray.get(Producer.remote(qd).produce.remote("b", 50), timeout=WAIT) == 50
        second = ray.get(taking, timeout=WAIT)
        assert second[-1] == EndOfStream() and [i for _, i in second[:-1]] == list(range(50))
    finally:
        ray.kill(consumer)
        _close_quietly(qd)


def test_the_tutorial_snippet_runs() -> None:
    import contextlib as _contextlib
    import io
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "tutorial.md").read_text()
    section = text.split("## 6. Operators as Ray actors", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert "ray.init()\n" in code
    out = io.StringIO()
    with _contextlib.redirect_stdout(out):  # the module's Ray session stands in for ray.init()
        exec(compile(code.replace("ray.init()\n", ""), "docs/tutorial.md", "exec"), {})
    assert out.getvalue().strip() == "20000"
