"""The ``sage-zmq`` command: demo, bench, keys, run, stats, top, trace.

``demo``, ``bench`` and ``keys`` hand their arguments to their own modules (each has its own
``--help``); the others are defined here. Every command returns a process exit code: 0 on
success, 1 when the work failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from sage_zmq.errors import SageZmqError

__all__ = ["build_parser", "main"]

# command -> (module, function, what to install if the module is missing)
_DELEGATES: dict[str, tuple[str, str, str]] = {
    "demo": ("sage_zmq.demo", "main", "the demo ships with sage-zmq; reinstall it"),
    "bench": ("sage_zmq.bench", "main", "the benchmark ships with sage-zmq; reinstall it"),
    "keys": ("sage_zmq.security", "keys_main", "key management ships with sage-zmq security"),
}
_HELP = {
    "demo": "run the demo pipeline: source -> 2 workers -> sink across processes",
    "bench": "run the benchmarks (--quick, --json, --plot FILE.png)",
    "keys": "manage CURVE keys (keys generate DIR)",
}


def _err(message: str) -> int:
    print(f"sage-zmq: error: {message}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sage-zmq",
        description="The sage-zmq communication layer: run pipelines and watch them.",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="log level of sage-zmq's own logging (default: observability.log_level)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a sage-zmq YAML configuration (default: $SAGE_ZMQ_CONFIG, else defaults)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in _HELP.items():
        sub.add_parser(name, help=text, add_help=False)

    run = sub.add_parser("run", help="run a topology described in YAML until it ends")
    run.add_argument("topology", metavar="TOPOLOGY.yaml")
    run.add_argument("--timeout", type=float, default=3600.0, help="give up after S seconds")
    run.add_argument("--trace-log", metavar="FILE", help="append sampled traces to FILE")
    run.add_argument("--stats", metavar="ENDPOINT", help="stats endpoint (tcp://HOST:PORT)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")

    stats = sub.add_parser("stats", help="print the queues of a running topology once")
    stats.add_argument("endpoint", nargs="?", help="stats endpoint (default: the one running)")
    stats.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    stats.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for it")

    top = sub.add_parser("top", help="a live view of a running topology's queues")
    top.add_argument("endpoint", nargs="?", help="stats endpoint (default: the one running)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one view and exit")
    top.add_argument("--count", type=int, default=0, help="exit after N views (0: never)")
    top.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for answers")

    trace = sub.add_parser("trace", help="show the hops of sampled records")
    trace.add_argument(
        "source", nargs="?", help="a trace log file or a stats endpoint (default: running one)"
    )
    trace.add_argument("--id", dest="trace_id", help="only this trace id")
    trace.add_argument("--limit", type=int, default=20, help="the last N traces (0: all)")
    trace.add_argument("--json", action="store_true", help="print traces as JSON lines")
    trace.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for answers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sage-zmq`` and ``python -m sage_zmq``; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Delegated commands take every argument after their name, --help included.
    position = next((i for i, a in enumerate(args_list) if not a.startswith("-")), None)
    if position is not None and args_list[position] in _DELEGATES:
        command = args_list[position]
        head = parser.parse_args(args_list[:position])
        _setup(head)
        return _delegate(command, args_list[position + 1 :])
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _setup(args)
        handler: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
        return handler(args)
    except SageZmqError as exc:
        return _err(str(exc))
    except KeyboardInterrupt:
        return 130


def _setup(args: argparse.Namespace) -> None:
    from sage_zmq.config import set_config
    from sage_zmq.observe.logging import configure_logging

    if args.config:
        set_config(args.config)
    configure_logging(args.log_level)


def _delegate(command: str, rest: list[str]) -> int:
    module_name, attr, advice = _DELEGATES[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name != module_name:
            raise
        return _err(f"'{command}' is not available: module {module_name} is missing ({advice})")
    fn = getattr(module, attr, None)
    if fn is None:
        return _err(f"'{command}' is not available: {module_name} has no {attr}() ({advice})")
    try:
        result = fn(rest)
    except SystemExit as exc:  # argparse inside the command (--help, bad usage)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return int(result or 0)


# ---------------------------------------------------------------------------- commands
def _endpoint(given: str | None) -> str:
    from sage_zmq.observe.stats_server import StatsError, check_endpoint, discover

    if given:
        return check_endpoint(given)
    found = discover()
    if not found:
        raise StatsError(
            "no running topology advertises a stats endpoint here; give ENDPOINT "
            "(sage-zmq run prints it) or start one with: sage-zmq run TOPOLOGY.yaml"
        )
    if len(found) > 1:
        listing = ", ".join(f"{f['name']} (pid {f['pid']}): {f['endpoint']}" for f in found)
        raise StatsError(f"several topologies are running; pick one ENDPOINT: {listing}")
    return str(found[0]["endpoint"])


def _cmd_run(args: argparse.Namespace) -> int:
    from sage_zmq.observe.stats_server import advertise
    from sage_zmq.topology import load_topology, run_topology

    topo = load_topology(args.topology)
    changes: dict[str, Any] = {}
    if args.trace_log:
        changes["trace_log"] = os.path.abspath(args.trace_log)
    elif topo.trace_log:
        changes["trace_log"] = os.path.abspath(topo.trace_log)
    if args.stats:
        changes["stats"] = args.stats
    if changes:
        from dataclasses import replace

        topo = replace(topo, **changes)
    advert: list[str] = []

    def started(endpoint: str | None) -> None:
        if endpoint is not None:
            advert.append(advertise(endpoint, topo.name))
            print(
                f"{topo.name}: running; stats at {endpoint} (sage-zmq top {endpoint})",
                file=sys.stderr,
                flush=True,
            )

    n = sum(op.parallelism for op in topo.operators)
    print(f"{topo.name}: starting {n} processes", file=sys.stderr, flush=True)
    try:
        result = run_topology(topo, timeout=args.timeout, on_started=started)
    finally:
        for path in advert:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if args.json:
        from dataclasses import asdict

        print(
            json.dumps(
                {
                    "topology": result.topology,
                    "elapsed": result.elapsed,
                    "instances": [asdict(i) for i in result.instances],
                }
            )
        )
        return 0
    print(f"{result.topology}: finished in {result.elapsed:.2f} s")
    for op in topo.operators:
        parts = result.by_operator(op.name)
        received = sum(p.received for p in parts)
        emitted = sum(p.emitted for p in parts)
        busy = max((p.elapsed for p in parts), default=0.0)
        rate = (received or emitted) / busy if busy > 0 else 0.0
        print(
            f"  {op.name:<16} x{op.parallelism:<3} in {received:>10}  out {emitted:>10}  "
            f"{rate:>12,.0f} rec/s"
        )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from sage_zmq.cli.views import format_queues
    from sage_zmq.observe.stats_server import query

    endpoint = _endpoint(args.endpoint)
    reply = query(endpoint, "snapshot", timeout=args.timeout)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(format_queues(reply["processes"]))
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from sage_zmq.cli.views import format_queues, rates_between
    from sage_zmq.observe.stats_server import query

    if args.interval <= 0:
        return _err("--interval must be > 0 seconds")
    endpoint = _endpoint(args.endpoint)
    before = query(endpoint, "snapshot", timeout=args.timeout)["processes"]
    shown = 0
    limit = 1 if args.once else args.count
    tty = sys.stdout.isatty()
    while True:
        time.sleep(args.interval)  # the refresh period of a live view
        after = query(endpoint, "snapshot", timeout=args.timeout)["processes"]
        view = format_queues(after, rates_between(before, after))
        if tty and not args.once:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(f"sage-zmq top  {endpoint}  {time.strftime('%H:%M:%S')}\n{view}", flush=True)
        before = after
        shown += 1
        if limit and shown >= limit:
            return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from sage_zmq.cli.views import format_trace, load_trace_file, select_traces
    from sage_zmq.observe.stats_server import StatsError, query

    source = args.source
    if source and not source.startswith(("tcp://", "ipc://")):
        if not os.path.exists(source):
            raise StatsError(
                f"no trace log {source!r} (no trace finished yet?); give a trace log file "
                "or a stats endpoint (tcp://HOST:PORT)"
            )
        try:
            traces: list[Any] = load_trace_file(source)
        except ValueError as exc:
            raise StatsError(str(exc)) from None
    else:
        traces = query(_endpoint(source), "traces", timeout=args.timeout)["traces"]
    chosen = select_traces(traces, args.trace_id, args.limit)
    if not chosen:
        what = f"trace {args.trace_id}" if args.trace_id else "no traces"
        print(
            f"{what} not found: sampling is observability.trace_sample_rate (0 = off)"
            if args.trace_id
            else "no traces yet: set observability.trace_sample_rate above 0"
        )
        return 1 if args.trace_id else 0
    for trace in chosen:
        print(json.dumps(trace) if args.json else format_trace(trace))
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "stats": _cmd_stats,
    "top": _cmd_top,
    "trace": _cmd_trace,
}
