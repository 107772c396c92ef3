"""Metrics: the snapshot registry, latency histograms, the Prometheus exporter, activate()."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from sage_zmq import Packet, QueueDescriptor, observe
from sage_zmq.config import load_config
from sage_zmq.errors import ConfigError, MissingDependency
from sage_zmq.observe import metrics, prometheus, tracing
from sage_zmq.observe.logging import LOGGER_NAME, configure_logging

pytest.importorskip("prometheus_client")


@pytest.fixture(autouse=True)
def fresh_observability() -> Iterator[None]:
    yield
    observe.deactivate()
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.NOTSET)
    for handler in list(logger.handlers):
        if getattr(handler, "_sage_zmq_handler", False):
            logger.removeHandler(handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _metric(values: dict[str, float], name: str, **labels: str) -> float:
    found = [
        v
        for k, v in values.items()
        if k.split("{")[0] == name and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())
    ]
    assert len(found) == 1, f"{name} {labels}: {found} in {sorted(values)[:20]}"
    return found[0]


def _wait(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_latency_samples_histogram_buckets() -> None:
    samples = metrics.LatencySamples(maxlen=3)
    for value in (0.00005, 0.001, 0.003, 20.0):
        samples.append(value)
    assert list(samples) == [0.001, 0.003, 20.0]  # the window is bounded
    hist = samples.histogram()
    assert hist.count == 4  # the histogram is cumulative over all time
    assert hist.sum == pytest.approx(20.00405)
    cumulative = dict(hist.cumulative())
    assert cumulative[0.0001] == 1
    assert cumulative[0.001] == 2  # le is inclusive
    assert cumulative[0.005] == 3
    assert cumulative[10.0] == 3 and cumulative[float("inf")] == 4
    assert hist.quantile(0.5) == 0.001
    assert metrics.Histogram.from_dict(hist.to_dict()) == hist


def test_snapshot_lists_open_queues_with_statistics() -> None:
    qd = QueueDescriptor("obs-snap", "local", {"maxsize": 10})
    try:
        for i in range(4):
            qd.put(Packet(i))
        qd.flush()
        assert qd.get(timeout=5).payload == 0
        _wait(lambda: qd.statistics().received == 4)
        snap = metrics.snapshot()
        (entry,) = [q for q in snap["queues"] if q["queue_id"] == "obs-snap"]
        assert entry["sent"] == 4 and entry["received"] == 4
        assert entry["depth"] == 3 and entry["maxsize"] == 10
        assert entry["utilisation"] == pytest.approx(0.3)
        assert entry["latency_histogram"]["counts"]
        assert snap["process"].endswith(f":{snap['pid']}")
    finally:
        qd.close()
    assert all(q["queue_id"] != "obs-snap" for q in metrics.snapshot()["queues"])


def test_routers_are_weakly_registered() -> None:
    class FakeRouter:
        def statistics(self) -> dict[str, int]:
            return {"routed": 7}

    router = FakeRouter()
    metrics.register_router(router, "r1")
    assert {"name": "r1", "stats": {"routed": 7}} in metrics.snapshot()["routers"]
    del router
    assert all(r["name"] != "r1" for r in metrics.snapshot()["routers"])


def test_a_router_entry_has_the_derived_figures_too() -> None:
    from sage_zmq.router import Connection, make_router

    qd = QueueDescriptor("obs-router", "local", {"maxsize": 10})
    router = make_router("round_robin")
    try:
        router.add_connection(Connection(0, 0, "w", qd))
        router.route(Packet(1))
        metrics.register_router(router, "r-derived")
        (entry,) = [r for r in metrics.snapshot()["routers"] if r["name"] == "r-derived"]
        stats = entry["stats"]
        assert stats["routed"] == 1 and stats["delivered"] == {"(0, 0)": 1}
        assert stats["utilisation"] == pytest.approx(0.1) and stats["route_rate"] > 0
        assert qd.get(timeout=5).payload == 1
    finally:
        router.close()
        qd.close()


def test_prometheus_scrape_matches_what_was_sent() -> None:
    qd = QueueDescriptor("obs-prom", "tcp", {"maxsize": 1000})
    server = prometheus.start_metrics_server(0)
    try:
        for i in range(300):
            qd.put(Packet({"i": i, "pad": "x" * 50}))
        qd.flush()
        for _ in range(100):
            qd.get(timeout=5)
        _wait(lambda: qd.statistics().received == 300)
        stats = qd.statistics()
        values = _scrape(server.url)
        labels = {"queue": "obs-prom", "queue_type": "tcp"}
        assert _metric(values, "sage_zmq_messages_total", direction="sent", **labels) == 300
        assert _metric(values, "sage_zmq_messages_total", direction="received", **labels) == 300
        sent_bytes = _metric(values, "sage_zmq_bytes_total", direction="sent", **labels)
        assert sent_bytes == stats.bytes_sent > 300 * 50
        assert _metric(values, "sage_zmq_bytes_total", direction="received", **labels) == sent_bytes
        assert _metric(values, "sage_zmq_queue_depth", **labels) == 200
        assert _metric(values, "sage_zmq_queue_capacity", **labels) == 1000
        assert _metric(values, "sage_zmq_queue_utilisation_ratio", **labels) == pytest.approx(0.2)
        batches = _metric(values, "sage_zmq_batches_total", direction="received", **labels)
        # one latency observation per batch that get() has started on
        observed = _metric(values, "sage_zmq_latency_seconds_count", **labels)
        assert 1 <= observed <= batches
        assert _metric(values, "sage_zmq_latency_seconds_bucket", le="+Inf", **labels) == observed
        assert _metric(values, "sage_zmq_credit_waits_total", **labels) == 0
        for _ in range(200):
            qd.get(timeout=5)
        values = _scrape(server.url)
        assert _metric(values, "sage_zmq_queue_depth", **labels) == 0
    finally:
        server.close()
        qd.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=1)


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MissingDependency, match=re.escape("pip install 'sage-zmq[metrics]'")):
        prometheus.start_metrics_server(0)


def test_bad_metrics_port_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="metrics port"):
        prometheus.start_metrics_server(70000)


# ------------------------------------------------------------ observability.* config keys
def test_config_metrics_port_starts_exporter_when_set() -> None:
    port = _free_port()
    observe.activate(load_config({"observability": {"metrics_port": port}}), force=True)
    server = observe.metrics_server()
    assert server is not None and server.port == port
    qd = QueueDescriptor("obs-port", "local")
    try:
        qd.put(1)
        assert qd.get(timeout=5) == 1
        values = _scrape(f"http://127.0.0.1:{port}/metrics")
        assert _metric(values, "sage_zmq_messages_total", queue="obs-port", direction="sent") == 1
    finally:
        qd.close()
    observe.activate(load_config({}), force=True)  # null (the default): no exporter
    assert observe.metrics_server() is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_config_metrics_port_taken_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        observe.activate(load_config({"observability": {"metrics_port": port}}), force=True)
    assert observe.metrics_server() is None
    assert f"metrics_port {port}" in caplog.text


def test_config_trace_sample_rate_controls_sampling() -> None:
    observe.activate(load_config({"observability": {"trace_sample_rate": 0.0}}), force=True)
    assert not any(tracing.maybe_trace(Packet(i)) for i in range(500))
    observe.activate(load_config({"observability": {"trace_sample_rate": 1.0}}), force=True)
    assert all(tracing.maybe_trace(Packet(i)) for i in range(500))
    observe.activate(load_config({"observability": {"trace_sample_rate": 0.25}}), force=True)
    tracing.seed(7)
    hits = sum(tracing.maybe_trace(Packet(i)) for i in range(4000))
    assert 800 < hits < 1200


def test_config_log_level_filters_connection_events(caplog: pytest.LogCaptureFixture) -> None:
    observe.activate(load_config({"observability": {"log_level": "info"}}), force=True)
    qd = QueueDescriptor("obs-log", "tcp")
    qd.put(1)
    assert qd.get(timeout=5) == 1
    qd.close()
    events = [r for r in caplog.records if getattr(r, "sage_queue", None) == "obs-log"]
    kinds = {r.sage_event for r in events}  # type: ignore[attr-defined]
    assert {"bind", "connect", "disconnect", "unbind"} <= kinds
    assert all(r.levelno == logging.INFO and r.sage_peer.startswith("tcp://") for r in events)  # type: ignore[attr-defined]
    caplog.clear()
    observe.activate(load_config({"observability": {"log_level": "WARNING"}}), force=True)
    qd = QueueDescriptor("obs-log2", "tcp")
    qd.put(1)
    assert qd.get(timeout=5) == 1
    qd.close()
    assert not [r for r in caplog.records if getattr(r, "sage_queue", None) == "obs-log2"]


def test_configure_logging_adds_one_handler(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr("sage_zmq.observe.logging._level_from_app", False)  # restored after

    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    logger = configure_logging("DEBUG", stream=stream)  # again: replaces, does not add
    assert sum(getattr(h, "_sage_zmq_handler", False) for h in logger.handlers) == 1
    logging.getLogger("sage_zmq.test").debug("hello %d", 5)
    assert "DEBUG sage_zmq.test" in stream.getvalue() and "hello 5" in stream.getvalue()
    with pytest.raises(ConfigError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD")


def test_the_level_an_application_chose_outlives_the_first_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first queue applies the config (observability.log_level, WARNING by default): it
    # used to reset the level configure_logging("INFO") had just set, hiding connect events.
    import io

    from sage_zmq import QueueDescriptor, observe

    monkeypatch.setattr("sage_zmq.observe.logging._level_from_app", False)
    logger = logging.getLogger(LOGGER_NAME)
    monkeypatch.setattr(logger, "level", logger.level)
    configure_logging("INFO", stream=io.StringIO())
    observe.activate(force=True)  # what the first queue of a process does
    qd = QueueDescriptor(None, "tcp")
    try:
        assert logger.getEffectiveLevel() == logging.INFO
    finally:
        qd.close()
        for handler in [h for h in logger.handlers if getattr(h, "_sage_zmq_handler", False)]:
            logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("setup", "config_level", "level"),
    [
        ('logging.getLogger("sage_zmq").setLevel(logging.INFO)', None, logging.INFO),
        ('logging.getLogger("sage_zmq").setLevel(logging.INFO)', "ERROR", logging.INFO),
        ("logging.basicConfig(level=logging.INFO)", None, logging.INFO),
        # A level the config names applies over the root logger's (only its absence defers).
        ("logging.basicConfig(level=logging.INFO)", "WARNING", logging.WARNING),
    ],
    ids=["setLevel", "setLevel-over-config", "basicConfig", "basicConfig-config-WARNING"],
)
def test_a_level_the_application_set_itself_outlives_the_first_queue(
    setup: str, config_level: str | None, level: int
) -> None:
    # The first queue applied observability.log_level (WARNING by default) over a level the
    # application had set with plain logging, and the connection events at INFO vanished.
    script = (
        "import logging\n"
        f"{setup}\n"
        "import sage_zmq\n"
        "qd = sage_zmq.QueueDescriptor(queue_type='tcp')\n"
        "qd.put(1)\n"
        "assert qd.get(timeout=10) == 1\n"
        "print(logging.getLogger('sage_zmq').getEffectiveLevel())\n"
        "qd.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_ZMQ_")}
    if config_level is not None:
        env["SAGE_ZMQ__OBSERVABILITY__LOG_LEVEL"] = config_level
    env["SAGE_ZMQ_RUNTIME_DIR"] = os.environ.get("SAGE_ZMQ_RUNTIME_DIR", "")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(level)], done.stdout
    shown = "bind tcp://127.0.0.1:" in done.stderr  # an INFO event
    assert shown == (level == logging.INFO), done.stderr


def test_logging_configured_after_the_first_queue_prints_each_record_once() -> None:
    # Where nothing logged, the first queue adds a stderr handler; an application that calls
    # basicConfig later got every sage-zmq record twice (that handler and the root's).
    script = (
        "import logging, sys\n"
        "import sage_zmq\n"
        "qd = sage_zmq.QueueDescriptor(queue_type='tcp')\n"
        "qd.put(1)\n"
        "assert qd.get(timeout=10) == 1\n"
        "log = logging.getLogger('sage_zmq.connection')\n"
        "log.warning('before basicConfig')\n"
        "logging.basicConfig(format='ROOT %(message)s')\n"
        "log.warning('after basicConfig')\n"
        "qd.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SAGE_ZMQ_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("before basicConfig") == 1, done.stderr  # shown: no other handler
    assert done.stderr.count("after basicConfig") == 1, done.stderr
    assert "ROOT after basicConfig" in done.stderr, done.stderr
