"""A fault-injecting TCP proxy for tests: forwards a loopback port to a target, and breaks things.

``FaultProxy(target_port)`` listens on ``127.0.0.1`` (a free port unless given) and forwards each
accepted connection to ``127.0.0.1:target_port``. Faults, by hand or on a schedule:

- :meth:`cut` closes every connection abruptly (RST), as a network failure would;
- :meth:`stall` stops forwarding (both ways) for some seconds (:meth:`resume` ends it early):
  bytes wait in kernel buffers, connections stay up, as on a congested or partitioned path;
- :meth:`refuse` accepts and at once closes new connections while set (a peer that is down);
- ``cut_every=N`` cuts every N seconds; with ``stall_chance=p`` each scheduled cut is preceded,
  with probability ``p`` (seeded, so runs repeat), by a stall of ``stall_for`` seconds.

One thread runs a selector loop; :meth:`start` / :meth:`stop` (or ``with``) own it, and
:meth:`stop` joins it and closes every socket. Loopback only: the target host is fixed.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from sage_zmq.errors import ConfigError

_CHUNK = 256 * 1024
_HOST = "127.0.0.1"


@dataclass
class ProxyStats:
    """What the proxy did so far."""

    connections: int = 0
    cuts: int = 0
    stalls: int = 0
    refused: int = 0
    bytes_forwarded: int = 0


class _Pair:
    __slots__ = ("a", "b", "out_a", "out_b")

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.a = a  # the client side
        self.b = b  # the target side
        self.out_a = bytearray()  # waiting to be written to a
        self.out_b = bytearray()


class FaultProxy:
    """See the module docstring."""

    def __init__(
        self,
        target_port: int,
        *,
        listen_port: int = 0,
        cut_every: float | None = None,
        stall_chance: float = 0.0,
        stall_for: float = 0.2,
        seed: int = 0,
    ) -> None:
        if not isinstance(target_port, int) or not 0 < target_port < 65536:
            raise ConfigError(f"target_port must be a port number, got {target_port!r}")
        if cut_every is not None and not cut_every > 0:
            raise ConfigError(f"cut_every must be > 0 seconds or None, got {cut_every!r}")
        if not 0.0 <= stall_chance <= 1.0:
            raise ConfigError(f"stall_chance must be within [0, 1], got {stall_chance!r}")
        self.target_port = target_port
        self.cut_every = cut_every
        self.stall_chance = stall_chance
        self.stall_for = stall_for
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((_HOST, listen_port))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._pairs: dict[socket.socket, _Pair] = {}
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._stalled_until = 0.0
        self._refusing = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://{_HOST}:{self.port}"

    # ------------------------------------------------------------------ control
    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop forwarding, close every socket and join the thread. Idempotent."""
        thread = self._thread
        if thread is not None:
            self._request("stop")
            thread.join()
            self._thread = None
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._sel.close()

    def cut(self) -> None:
        """Close every open connection abruptly."""
        self._request("cut")

    def resume(self) -> None:
        """End a stall now."""
        with self._lock:
            self._stalled_until = 0.0
        self._request("wake")

    def stall(self, seconds: float) -> None:
        """Forward nothing for ``seconds`` (connections stay open)."""
        with self._lock:
            self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)
            self.stats.stalls += 1
        self._request("wake")

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are accepted and closed at once."""
        self._refusing = on

    def _request(self, what: str) -> None:
        with self._lock:
            self._requests.append(what)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        sel = self._sel
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_cut = None if self.cut_every is None else time.monotonic() + self.cut_every
        stall_planned = False
        try:
            while True:
                now = time.monotonic()
                if next_cut is not None:
                    if not stall_planned and now >= next_cut - self.stall_for:
                        stall_planned = True
                        if self._rng.random() < self.stall_chance:
                            self.stall(self.stall_for)
                    if now >= next_cut:
                        self._cut_all()
                        next_cut = now + self.cut_every  # type: ignore[operator]
                        stall_planned = False
                self._update_interest()
                timeout = 0.05
                if self._stalled_until > now:
                    timeout = min(timeout, self._stalled_until - now)
                for key, mask in sel.select(timeout):
                    tag = key.data
                    if tag == "accept":
                        self._accept()
                    elif tag == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        if self._handle_requests():
                            return
                    else:
                        self._service(key.fileobj, mask)  # type: ignore[arg-type]
        finally:
            self._cut_all(count=False)

    def _handle_requests(self) -> bool:
        with self._lock:
            requests, self._requests = self._requests, []
        for what in requests:
            if what == "stop":
                return True
            if what == "cut":
                self._cut_all()
        return False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            if self._refusing:
                self.stats.refused += 1
                _abort(client)
                continue
            target = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                target.connect((_HOST, self.target_port))
            except OSError:
                target.close()
                self.stats.refused += 1
                _abort(client)
                continue
            for s in (client, target):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, target)
            self._pairs[client] = pair
            self._pairs[target] = pair
            self._sel.register(client, selectors.EVENT_READ, "conn")
            self._sel.register(target, selectors.EVENT_READ, "conn")
            self.stats.connections += 1

    def _update_interest(self) -> None:
        stalled = self._stalled_until > time.monotonic()
        for sock, pair in list(self._pairs.items()):
            out = pair.out_a if sock is pair.a else pair.out_b
            events = 0
            if not stalled:
                events |= selectors.EVENT_READ
                if out:
                    events |= selectors.EVENT_WRITE
            try:
                key: selectors.SelectorKey | None = self._sel.get_key(sock)
            except KeyError:
                key = None
            if events == 0:
                if key is not None:  # stalled: leave the bytes in the kernel buffers
                    self._sel.unregister(sock)
            elif key is None:
                self._sel.register(sock, events, "conn")
            elif key.events != events:
                self._sel.modify(sock, events, "conn")

    def _service(self, sock: socket.socket, mask: int) -> None:
        pair = self._pairs.get(sock)
        if pair is None:
            return
        other_out = pair.out_b if sock is pair.a else pair.out_a
        own_out = pair.out_a if sock is pair.a else pair.out_b
        if mask & selectors.EVENT_READ and len(other_out) < 4 * _CHUNK:
            try:
                data = sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self._drop(pair)
                return
            if data == b"":
                self._drop(pair)
                return
            if data:
                other_out += data
                self.stats.bytes_forwarded += len(data)
                self._flush(pair.b if sock is pair.a else pair.a, other_out, pair)
        if mask & selectors.EVENT_WRITE and own_out:
            self._flush(sock, own_out, pair)

    def _flush(self, sock: socket.socket, out: bytearray, pair: _Pair) -> None:
        if self._stalled_until > time.monotonic():
            return
        try:
            sent = sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pair)
            return
        del out[:sent]

    def _drop(self, pair: _Pair) -> None:
        for sock in (pair.a, pair.b):
            if self._pairs.pop(sock, None) is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                _abort(sock)

    def _cut_all(self, count: bool = True) -> None:
        pairs = {id(p): p for p in self._pairs.values()}
        for pair in pairs.values():
            self._drop(pair)
        if count:
            self.stats.cuts += 1


def _abort(sock: socket.socket) -> None:
    # SO_LINGER 0: close sends RST, like a failed link, not an orderly FIN.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


__all__ = ["FaultProxy", "ProxyStats"]
