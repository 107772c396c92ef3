"""``sage-zmq demo``: the main job — source -> 2 parallel workers -> sink across processes.

The source keys sensor readings and hash-routes them to two worker processes over ``shm``
queues (``--queue-type`` picks another); each worker opens its own input queue, hands its
descriptor back, and enriches its records and sends them to the sink (this process), whose queue
counts two upstreams. While it runs, the sink prints throughput and end-to-end latency (from
each packet's creation time); at the end it prints a summary and checks that every record
arrived exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from sage_zmq import EndOfStream, Packet, QueueDescriptor
from sage_zmq.cli._args import finite_number, whole_number

QUEUE_SIZE = 5000
"""maxsize of the demo's queues."""

MIN_INTERVAL = 0.1
"""Shortest ``--interval``: one progress line per interval is for people to read."""


def _exit_with_parent(own: list[QueueDescriptor]) -> None:
    """End this demo process when the demo's main process is gone, even killed by SIGKILL.

    Nobody would read what it sends any more, and nobody would stop it: a source kept
    sending and the workers kept waiting, for good. The parent pid changes when the parent
    dies (the orphan is re-parented), which a thread can watch on every platform. ``own``:
    the queues this process consumes, whose socket files go with it.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _remove_socket_files(own)
        os._exit(1)

    threading.Thread(target=watch, name="sage-zmq-demo-parent-watch", daemon=True).start()


def _remove_socket_files(queues: Sequence[QueueDescriptor]) -> None:
    # Left behind by a consumer that ended without closing its queue (killed).
    for qd in queues:
        endpoint = str(qd.to_dict().get("metadata", {}).get("endpoint", ""))
        if endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(endpoint[len("ipc://") :])


def _source(
    worker_queues: list[QueueDescriptor], records: int, sensors: int, rate: float | None = None
) -> None:
    from sage_zmq.router import Connection, HashRouter

    _exit_with_parent([])

    router = HashRouter()
    for index, qd in enumerate(worker_queues):
        router.add_connection(
            Connection(
                broadcast_index=0,
                parallel_index=index,
                target_name=f"worker-{index}",
                target_handle=qd,
            )
        )
    start = time.perf_counter()
    for seq in range(records):
        if rate:
            # Paced: keep to the schedule (a pause, not a wait for anything).
            ahead = start + seq / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        sensor = f"sensor-{seq % sensors:04d}"
        reading = {"seq": seq, "sensor": sensor, "celsius": 20.0 + (seq % 100) / 10}
        router.route(Packet(reading, partition_key=sensor))
    router.send_stop_signal()
    router.close()
    for qd in worker_queues:
        qd.close()


def _worker(index: int, queue_type: str, sink: QueueDescriptor, parent: Connection) -> None:
    own: list[QueueDescriptor] = []
    _exit_with_parent(own)
    # The worker consumes its inbox, so it creates it: a tcp queue without an endpoint is
    # bound by the process that creates it, on a port only that process knows.
    inbox = QueueDescriptor(
        queue_id=f"demo-worker-{index}", queue_type=queue_type, metadata={"maxsize": QUEUE_SIZE}
    )
    inbox.qsize()  # opens (binds) the consumer end before the source connects
    own.append(inbox)
    parent.send(inbox)
    parent.close()
    for packet in inbox:
        reading = packet.payload
        reading["fahrenheit"] = reading["celsius"] * 9 / 5 + 32
        reading["worker"] = index
        sink.put(packet)
    sink.put(EndOfStream())
    sink.close()
    inbox.close()


class _Report:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.per_worker = [0, 0]
        self.latencies: list[float] = []
        self.window: list[float] = []
        self.seen = bytearray(expected)
        self.duplicates = 0
        self.start = time.perf_counter()

    def line(self, now: float, last_count: int, last_time: float) -> str:
        rate = (self.count - last_count) / max(now - last_time, 1e-9)
        lat = sorted(self.window)
        p50 = lat[len(lat) // 2] * 1e3 if lat else 0.0
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else 0.0
        done = 100.0 * self.count / self.expected
        return (
            f"  {now - self.start:6.1f} s  {self.count:>9,} records ({done:5.1f}%)  "
            f"{rate:>11,.0f} rec/s   latency p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
        )


def _inbox_of(worker: BaseProcess, reply: Connection) -> QueueDescriptor:
    """The descriptor of the queue ``worker`` opened for its input (it sends it once bound)."""
    try:
        while not reply.poll(0.5):
            if not worker.is_alive():
                raise RuntimeError(
                    f"{worker.name} exited (code {worker.exitcode}) before it opened its queue"
                )
        inbox: QueueDescriptor = reply.recv()
        return inbox
    finally:
        reply.close()


def _stop(procs: Sequence[BaseProcess], grace: float = 0.0) -> None:
    for proc in procs:
        if proc.pid is None:
            continue  # never started
        proc.join(timeout=grace)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run(
    records: int = 500_000,
    sensors: int = 1000,
    interval: float = 0.5,
    queue_type: str = "shm",
    out: Any = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """Run the demo topology; returns the summary (also printed).

    ``rate`` paces the source (records/s); unpaced, it runs as fast as the pipeline takes
    records, so the queues fill and latency is mostly the wait in them.
    """
    _check_run_arguments(records, interval, rate)
    out = out or sys.stdout
    ctx = mp.get_context("spawn")
    sink = QueueDescriptor(
        queue_id="demo-sink",
        queue_type=queue_type,
        metadata={"upstreams": 2, "maxsize": QUEUE_SIZE},
    )
    pace = (
        f"paced at {rate:,.0f} rec/s"
        if rate
        else f"unpaced: the queues (maxsize {QUEUE_SIZE:,}) fill, so latency is mostly the "
        "wait in them; --rate N paces the source"
    )
    print(
        f"sage-zmq demo: source -> 2 workers (hash by sensor) -> sink, {records:,} records "
        f"over '{queue_type}' queues ({pace})",
        file=out,
        flush=True,
    )
    workers, replies = [], []
    for i in range(2):
        mine, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker, args=(i, queue_type, sink, theirs), name=f"demo-worker-{i}"
        )
        proc.start()
        theirs.close()
        workers.append(proc)
        replies.append(mine)
    try:
        workers_in = [_inbox_of(proc, reply) for proc, reply in zip(workers, replies, strict=True)]
        source = ctx.Process(
            target=_source, args=(workers_in, records, sensors, rate), name="demo-source"
        )
        source.start()
    except BaseException:
        _stop(workers)
        sink.close()
        raise
    report = _Report(records)
    last_count, last_time = 0, time.perf_counter()
    finished = False
    try:
        while True:
            _STOP.in_get = True
            try:
                packet = sink.get(timeout=interval)
            except Exception:  # Empty: nothing this interval; report and keep waiting
                packet = None
            finally:
                _STOP.in_get = False
            if _STOP.requested:
                raise _Interrupted
            now_wall = time.time()
            if packet is not None:
                if isinstance(packet, EndOfStream):
                    break
                reading = packet.payload
                seq = reading["seq"]
                if report.seen[seq]:
                    report.duplicates += 1
                report.seen[seq] = 1
                report.count += 1
                report.per_worker[reading["worker"]] += 1
                if report.count % 64 == 0:
                    latency = now_wall - packet.timestamp
                    report.latencies.append(latency)
                    report.window.append(latency)
            now = time.perf_counter()
            if now - last_time >= interval:
                print(report.line(now, last_count, last_time), file=out, flush=True)
                last_count, last_time = report.count, now
                report.window = []
            if not any(p.is_alive() for p in workers) and packet is None:
                break
        finished = True
    finally:
        # Interrupted (Ctrl-C, SIGTERM): the others are stopped now, not given 30 s each.
        _stop([source, *workers], grace=30 if finished else 0.0)
        if not finished:
            _remove_socket_files(workers_in)  # killed, the workers could not close them
        sink.close(None if finished else 0.0)
    elapsed = time.perf_counter() - report.start
    lat = sorted(report.latencies)
    exit_codes = [p.exitcode for p in (source, *workers)]
    summary: dict[str, Any] = {
        "records": report.count,
        "expected": records,
        "missing": records - sum(report.seen),
        "duplicates": report.duplicates,
        "per_worker": report.per_worker,
        "seconds": elapsed,
        "records_per_second": report.count / elapsed if elapsed else 0.0,
        "latency_p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
        "latency_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None,
        "exit_codes": exit_codes,
    }
    ok = (
        summary["missing"] == 0
        and summary["duplicates"] == 0
        and all(code == 0 for code in exit_codes)
    )
    summary["ok"] = ok
    print(
        f"summary: {report.count:,} of {records:,} records in {elapsed:.2f} s "
        f"({summary['records_per_second']:,.0f} rec/s), worker split "
        f"{report.per_worker[0]:,}/{report.per_worker[1]:,}, "
        f"latency p50 {summary['latency_p50_ms'] or 0:.2f} ms p99 "
        f"{summary['latency_p99_ms'] or 0:.2f} ms, missing {summary['missing']}, "
        f"duplicates {summary['duplicates']} -> {'OK' if ok else 'FAILED'}",
        file=out,
        flush=True,
    )
    return summary


def _check_run_arguments(records: int, interval: float, rate: float | None) -> None:
    # A NaN or negative interval made the report loop fail or spin (get(timeout=-1) raises,
    # and an interval of 0 printed a line per record); a NaN rate paced nothing.
    if isinstance(records, bool) or not isinstance(records, int) or records < 1:
        raise ValueError(f"records must be an integer >= 1, got {records!r}")
    if not _finite(interval) or interval < MIN_INTERVAL:
        raise ValueError(
            f"interval must be a number of seconds >= {MIN_INTERVAL}, got {interval!r}"
        )
    if rate is not None and (not _finite(rate) or rate <= 0):
        raise ValueError(f"rate must be a finite number of records/s > 0, got {rate!r}")


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _records_arg(text: str) -> int:
    return whole_number(text, 1)


def _interval_arg(text: str) -> float:
    value = finite_number(text)
    if value < MIN_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= {MIN_INTERVAL} (one progress line each), got {text}"
        )
    return value


def _rate_arg(text: str) -> float:
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of records/s, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sage-zmq demo",
        description="Run the demo pipeline: source -> 2 parallel workers -> sink, "
        "across processes, printing throughput and latency.",
    )
    parser.add_argument("--records", type=_records_arg, default=500_000, help="records to send")
    parser.add_argument("--quick", action="store_true", help="a short run (50,000 records)")
    parser.add_argument(
        "--queue-type",
        default="shm",
        choices=["shm", "tcp", "sage"],
        help="queue type between the stages",
    )
    parser.add_argument(
        "--interval",
        type=_interval_arg,
        default=0.5,
        help=f"seconds between progress lines (at least {MIN_INTERVAL})",
    )
    parser.add_argument(
        "--rate",
        type=_rate_arg,
        default=None,
        help="records/s the source sends (default: as fast as the pipeline takes them)",
    )
    # Every value is checked as it is parsed (the type= functions): a bad one is a usage
    # error (exit 2) before anything starts.
    args = parser.parse_args(argv)
    records = 50_000 if args.quick else args.records
    with _interrupt_on_sigterm():
        summary = run(
            records=records, interval=args.interval, queue_type=args.queue_type, rate=args.rate
        )
    return 0 if summary["ok"] else 1


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the demo's processes are stopped on the way out."""


class _StopState:
    """A SIGTERM that arrived, and whether the sink is inside ``get`` right now.

    Raised inside ``get``, the exception could cut the read of a frame in two, and the sink's
    close would then report records lost in transit; there the flag is set, and the loop
    raises after ``get`` returns (within ``--interval``).
    """

    requested = False
    in_get = False


_STOP = _StopState()


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    # Python's default for SIGTERM ends the process at once, leaving its workers behind.
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def on_term(signum: int, frame: Any) -> None:
        if _STOP.requested:
            return  # one is enough: let it unwind
        _STOP.requested = True
        if not _STOP.in_get:
            raise _Interrupted

    previous = signal.signal(signal.SIGTERM, on_term)
    _STOP.requested = False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _STOP.requested = False


if __name__ == "__main__":
    sys.exit(main())
