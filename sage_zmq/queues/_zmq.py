"""The socket links shared by ``shm``, ``tcp`` and ``sage``: DEALER producers, ROUTER consumer.

DEALER/ROUTER because the consumer must answer each producer (credits, receipts, acks) and
never drops silently: the ROUTER sets ``ROUTER_MANDATORY`` so a reply to a vanished producer is
an error we see. High-water marks are lifted (0 = none) because credits, not HWMs, bound what
is in flight: HWMs count frames, not records, and libzmq drops an ipc tail at the HWM.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os as _os
import re
import resource
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from sage_zmq import _runtime
from sage_zmq import observe as _observe
from sage_zmq.errors import DecodeError, DescriptorError
from sage_zmq.queues._spin import SpinPolicy
from sage_zmq.queues.base import Credit
from sage_zmq.wire.codec import PLAIN_DATA_HEADER, Codec
from sage_zmq.wire.frame import HEADER_SIZE, Kind, parse_header

log = logging.getLogger("sage_zmq.queue")

MAX_BATCH_FRAME = 4 * 1024 * 1024
"""A batch whose frame is larger than this is split (a single large record is not)."""

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq enum wrappers cost time on every call
_perf = time.perf_counter
_yield = getattr(_os, "sched_yield", lambda: None)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")  # kept out of ipc file names
# pyzmq's Python-level Socket.send only adds DRAFT options (routing_id, group) to this one.
_send: Callable[..., Any] = zmq.backend.Socket.send
_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+|\*):(\d{1,5}|\*)$")


WRONG_QUEUE = "wrong_queue"
"""ERROR code: the connection's HELLO named another queue; none of its frames is taken."""

IPC_RECONNECT_MAX_MS = 250
"""Longest wait between a producer's connect retries on an ipc endpoint (ray links too)."""


@dataclass(frozen=True)
class SocketOptions:
    """Options applied to every socket of a queue."""

    max_message_size: int = -1
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 2000
    heartbeat_ivl_ms: int = 0
    heartbeat_timeout_ms: int = 0
    linger_ms: int = 1000
    spin_wait: float = 0.0  # performance.spin_wait (consumer side)
    curve: Any = None  # sage_zmq.security.CurveSetup or None


def check_tcp_endpoint(endpoint: str) -> tuple[str, int | None]:
    """Validate ``tcp://host:port``; returns ``(host, port)`` (port None for ``*``)."""
    m = _TCP.match(endpoint)
    if not m:
        raise DescriptorError(
            f"malformed tcp endpoint {endpoint!r}: expected tcp://HOST:PORT, e.g. "
            "tcp://127.0.0.1:5555 (or leave endpoint out to get a free port)"
        )
    host, port = m.group(1), m.group(2)
    parts = host.split(".")
    if len(parts) == 4 and all(p.isdigit() for p in parts) and any(int(p) > 255 for p in parts):
        # Digits and dots only is an IPv4 address, never a host name: fail here, not with
        # "No such device" at bind or a connect that retries forever.
        raise DescriptorError(
            f"tcp endpoint {endpoint!r}: {host} is not an IPv4 address (each of the four "
            "numbers must be 0-255)"
        )
    if port == "*":
        return host, None
    number = int(port)
    if not 0 <= number <= 65535:
        raise DescriptorError(f"tcp endpoint {endpoint!r}: port must be 0-65535")
    return host, number


def derive_ipc_endpoint(queue_id: str) -> str:
    """A fresh ipc endpoint in the private runtime directory, within the ~107-byte limit."""
    token = _os.urandom(4).hex()
    base = _runtime.runtime_dir_path()  # created below, once the paths are known to fit
    stem = _UNSAFE.sub("_", queue_id)[:40]
    path = _os.path.join(base, f"{stem}-{token}.sock")
    if len(path.encode()) > 100:
        digest = hashlib.sha1(queue_id.encode()).hexdigest()[:16]
        path = _os.path.join(base, f"{digest}-{token}.sock")
    if len(path.encode()) > 100:
        raise DescriptorError(
            f"runtime directory {base!r} is too long for ipc socket paths; set "
            "SAGE_ZMQ_RUNTIME_DIR to a short private directory"
        )
    _runtime.runtime_dir()
    return f"ipc://{path}"


def derive_abstract_ipc_endpoint(queue_id: str) -> str:
    """A fresh ipc endpoint in Linux's abstract socket namespace (``ipc://@name``).

    No file: the name vanishes with the socket, also when its process is killed, so nothing is
    left to sweep. Unlike a file in the 0700 runtime directory it has no permissions: any local
    process in the same network namespace may connect, as it may to a tcp port.
    """
    stem = _UNSAFE.sub("_", queue_id)[:40]
    return f"ipc://@sage-zmq-{_os.getuid()}-{stem}-{_os.urandom(6).hex()}"


def check_ipc_endpoint(endpoint: str) -> str:
    if not endpoint.startswith("ipc://") or len(endpoint) <= len("ipc://"):
        raise DescriptorError(
            f"malformed ipc endpoint {endpoint!r}: expected ipc:///path/to/socket "
            "(or leave endpoint out to get a private one)"
        )
    path = endpoint[len("ipc://") :]
    if not path.startswith(("/", "@")):
        raise DescriptorError(
            f"ipc endpoint {endpoint!r} has a relative path: a descriptor travels to processes "
            "that may run in another directory; use an absolute path (ipc:///path/to/socket)"
        )
    if len(path.encode()) > zmq.IPC_PATH_MAX_LEN:
        raise DescriptorError(
            f"ipc path {path!r} is {len(path.encode())} bytes; the limit is "
            f"{zmq.IPC_PATH_MAX_LEN}: use a shorter path or leave endpoint out"
        )
    return path


def _apply_common(sock: zmq.Socket[Any], opts: SocketOptions) -> None:
    sock.setsockopt(zmq.LINGER, opts.linger_ms)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if opts.heartbeat_ivl_ms:
        sock.setsockopt(zmq.HEARTBEAT_IVL, opts.heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, opts.heartbeat_timeout_ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, opts.heartbeat_timeout_ms)


def _allow_ipv6(sock: zmq.Socket[Any], endpoint: str) -> None:
    # libzmq speaks IPv4 only unless told; turned on for IPv6 literals ("tcp://[::1]:5555")
    # alone, so that a name like "localhost" keeps resolving to the IPv4 address it binds.
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


_RCVTIMEO = int(zmq.RCVTIMEO)


def _pid_or_none(pid: Any) -> int | None:
    """A CREDIT's pid if it can be a process id (a peer's garbage must not reach os.kill).
    2**31 - 1 is shm.sweep.MAX_PID, not imported here: the shm package imports numpy."""
    return pid if pid.__class__ is int and 0 < pid < 2**31 else None


def _wait_at_most(link: DealerLink | RouterInlet, timeout: float) -> None:
    """Make the link's next blocking recv give up after ``timeout`` s (set only on change:
    socket options cost microseconds)."""
    ms = max(1, int(timeout * 1000))
    if link._rcvtimeo != ms:
        link.sock.setsockopt(_RCVTIMEO, ms)
        link._rcvtimeo = ms


class DealerLink:
    """A producer's socket: DEALER connected to the consumer's ROUTER."""

    def __init__(
        self,
        endpoint: str,
        codec: Codec,
        opts: SocketOptions,
        *,
        compress: bool | str = False,
        queue_id: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.codec = codec
        self.compress = compress
        self.queue_id = queue_id
        self.released: list[int] = []
        self.errors = 0
        self._rcvtimeo = -1  # libzmq's default
        sock = _new_socket(zmq.DEALER, queue_id)
        _apply_common(sock, opts)
        sock.setsockopt(zmq.RECONNECT_IVL, opts.reconnect_ivl_ms)
        ivl_max = opts.reconnect_ivl_max_ms
        if endpoint.startswith("ipc://"):
            # A consumer binds at its first get, often after its producers connected: libzmq
            # retries their connect with a backoff, and the consumer waits for the next one.
            # On ipc a retry is one local syscall, so it stays frequent (puts first on 20 shm
            # queues, then a get from each, took 33 s with retries backing off to 2 s).
            ivl_max = min(ivl_max, IPC_RECONNECT_MAX_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, ivl_max)
        try:
            if opts.curve is not None:
                opts.curve.apply_client(sock)
            _allow_ipv6(sock, endpoint)
            sock.connect(endpoint)
        except BaseException:
            sock.close(linger=0)  # a refused key file or endpoint leaves no socket behind
            raise
        self.sock = sock
        self._producer = ""
        _observe.link_opened("producer", endpoint, queue_id, codec)

    REHELLO_AFTER: float | None = 1.0
    """Seconds a producer waits for credit before it says HELLO again (a replaced consumer
    has never heard of it). Read on the producer's own link: the reliable and ray links,
    which reintroduce the producer themselves, do not have it."""
    _unsent_noted_at = -1e9
    refused: str | None = None
    """Why the consumer refuses everything from this link (it belongs to another queue)."""
    _kept = False  # the reliable layer keeps frames itself: an unsent one is just dropped
    _unsent: deque[bytes] | None = None  # frames no connection took yet, oldest first

    def keep_unsent(self) -> None:
        """Frames with no connection to take them are the caller's to resend, not ours.

        For the reliable layer, which keeps every frame until acknowledged and resends after
        a reconnect.
        """
        self._kept = True

    @property
    def unsent_frames(self) -> int:
        """Frames waiting here because no connection would take them (none: 0)."""
        return len(self._unsent) if self._unsent else 0

    def _send_frame(self, frame: bytes) -> None:
        # Never blocks: with unlimited HWMs a DEALER refuses a frame (EAGAIN) only when it has
        # no connection object at all, e.g. every handshake fails (CURVE refused this
        # producer's key). A blocking send would then hang put, heartbeats and close whatever
        # their timeouts; instead the frame waits here, in order, and the caller's own
        # deadline (credit for put, receipts for close) decides when to give up.
        if self._unsent and not self._send_unsent():
            self._hold(frame)
            return
        try:
            _send(self.sock, frame, _NOBLOCK, len(frame) < 65536)
        except zmq.Again:
            self._hold(frame)

    def _hold(self, frame: bytes) -> None:
        now = time.monotonic()
        if now - self._unsent_noted_at >= 10.0:
            self._unsent_noted_at = now
            from sage_zmq.observe.logging import connection_event

            connection_event(
                "connect_failed",
                queue=self.queue_id,
                peer=self.endpoint,
                detail="no usable connection (is the consumer up? does it accept this "
                "producer's CURVE key?); frames are kept and sent once one is",
            )
        if self._kept:
            return
        if self._unsent is None:
            self._unsent = deque()
        self._unsent.append(frame)

    def _send_unsent(self) -> bool:
        """Send what waits here, in order; True once nothing does."""
        unsent = self._unsent
        while unsent:
            try:
                _send(self.sock, unsent[0], _NOBLOCK, len(unsent[0]) < 65536)
            except zmq.Again:
                return False
            unsent.popleft()
        return True

    def send_hello(self, producer: str, epoch: int, next_seq: int, acked: int) -> None:
        self._producer = producer
        body = {
            "producer": producer,
            "epoch": epoch,
            "queue": self.queue_id,
            "next_seq": next_seq,
            "acked": acked,
        }
        self._send_frame(self.codec.encode_control(Kind.HELLO, body))

    def send_batch(self, producer: str, seq: int, records: list[Any]) -> tuple[int, int, list[str]]:
        frame, sent, errors = self.codec.encode_batch(
            producer, seq, records, compress=self.compress
        )
        if len(sent) > 1 and len(frame) > min(MAX_BATCH_FRAME, self.codec.limits.max_frame_bytes):
            # Many large records: split so one frame never holds e.g. 100 x 1 MB (memory and
            # head-of-line blocking); each part gets its own consecutive sequence numbers.
            half = len(sent) // 2
            n1, b1, e1 = self.send_batch(producer, seq, sent[:half])
            n2, b2, e2 = self.send_batch(producer, seq + n1, sent[half:])
            return n1 + n2, b1 + b2, errors + e1 + e2
        if sent:
            self._send_frame(frame)
        return len(sent), len(frame) if sent else 0, errors

    def send_frame(self, frame: bytes) -> None:
        """Send an already encoded frame (retransmission)."""
        self._send_frame(frame)

    def send_end(self, producer: str, seq: int) -> None:
        self._send_frame(self.codec.encode_control(Kind.END, [producer, seq]))

    def send_close(self, producer: str, seq: int) -> None:
        self._send_frame(self.codec.encode_control(Kind.CLOSE, [producer, seq]))

    def send_heartbeat(self, producer: str) -> None:
        self._send_frame(self.codec.encode_control(Kind.HEARTBEAT, [producer]))

    def poll(self, timeout: float) -> list[Credit]:
        sock = self.sock
        if self._unsent:
            self._send_unsent()
        first: Any = None
        if not sock.get(_EVENTS) & _POLLIN:
            if timeout <= 0:
                return []
            _wait_at_most(self, timeout)
            try:
                first = sock.recv()
            except zmq.Again:
                return []
        credits: list[Credit] = []
        while first is not None or sock.get(_EVENTS) & _POLLIN:
            if first is not None:
                frame, first = first, None
            else:
                frame = sock.recv()
            try:
                msg = self.codec.decode(frame)
            except DecodeError as exc:
                self.errors += 1
                log.warning("queue %s: bad frame from consumer: %s", self.queue_id, exc)
                continue
            if msg.kind is Kind.CREDIT:
                self.refused = None  # a consumer of our queue answers (it took the endpoint)
                f = msg.fields
                credits.append(
                    Credit(
                        f["session"],
                        f["received"],
                        f["acked"],
                        f["limit"],
                        f.get("base"),
                        _pid_or_none(f.get("pid")),
                        f.get("lost", 0),
                        f.get("release_ring"),
                    )
                )
            elif msg.kind is Kind.RELEASE:
                self.released.extend(msg.fields[1])
            elif msg.kind is Kind.ERROR:
                self.errors += 1
                if msg.fields["code"] == WRONG_QUEUE:
                    self.refused = str(msg.fields["message"])
                log.warning(
                    "queue %s: consumer rejected a frame: %s (%s)",
                    self.queue_id,
                    msg.fields["message"],
                    msg.fields["code"],
                )
            else:
                self.errors += 1
                log.warning("queue %s: unexpected %s from consumer", self.queue_id, msg.kind.name)
        return credits

    def close(self) -> None:
        self.sock.close()
        _observe.link_closed("producer", self.endpoint, self.queue_id)


class RouterInlet:
    """The consumer's socket: a ROUTER bound on the queue's endpoint."""

    SAME_HOST = False
    """Whether every producer is on this host (then CREDITs name this process)."""
    CAN_TELL_GONE = True
    """A send to a producer whose connection is gone fails (ROUTER_MANDATORY)."""
    pending_work = False
    """Whether the inlet holds work back for a later read (see ShmInlet)."""

    def __init__(
        self, endpoint: str, codec: Codec, opts: SocketOptions, *, queue_id: str = ""
    ) -> None:
        self.codec = codec
        self.queue_id = queue_id
        self.rejected = 0
        self._last_warning: dict[bytes, float] = {}
        # Connections whose HELLO named another queue -> that queue: every later frame of
        # theirs is refused too (a producer that reached the wrong queue, e.g. a stale
        # endpoint now bound by another one, must not have its records taken here).
        self._foreign: dict[bytes, str] = {}
        self._rcvtimeo = -1  # libzmq's default
        self.spin = SpinPolicy(opts.spin_wait)
        sock = _new_socket(zmq.ROUTER, queue_id)
        _apply_common(sock, opts)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, opts.max_message_size)
        if opts.curve is not None:
            try:
                opts.curve.apply_server(sock)
            except BaseException:
                sock.close(linger=0)  # a refused key setup leaves no socket behind
                raise
        self.sock = sock
        self._ipc_files: list[tuple[str, int, int]] = []
        self._tcp_bound: list[str] = []
        try:
            self.endpoint: str = self.bind_also(endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        _observe.link_opened("consumer", self.endpoint, queue_id, codec)

    def bind_also(self, endpoint: str) -> str:
        """Bind the socket on ``endpoint`` (too); returns the endpoint as bound.

        An ipc socket file is made private (0600) and removed again at :meth:`close`.
        """
        sock = self.sock
        if endpoint.startswith("ipc://"):
            self._refuse_live_ipc(endpoint)
        try:
            # No retry on EADDRINUSE: right after a close, libzmq's old listener can still
            # accept a connection whose frames then die with it; a clear error is safer.
            _allow_ipv6(sock, endpoint)
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise DescriptorError(
                f"cannot bind queue {self.queue_id!r} on {endpoint}: {exc.strerror}; "
                + _bind_hint(exc.errno, endpoint)
            ) from None
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        ipc_path = bound[len("ipc://") :] if bound.startswith("ipc://") else ""
        if ipc_path and not ipc_path.startswith("@"):  # "@": abstract namespace, no file
            try:
                # libzmq creates the socket file with the umask; only this user may connect.
                _os.chmod(ipc_path, 0o600)
                st = _os.stat(ipc_path)
            except OSError as exc:
                with contextlib.suppress(zmq.ZMQError):
                    sock.unbind(bound)
                from sage_zmq.errors import SecurityError

                raise SecurityError(
                    f"cannot make ipc socket file {ipc_path} private (0600): {exc}"
                ) from None
            self._ipc_files.append((ipc_path, st.st_dev, st.st_ino))
        if bound.startswith("tcp://"):
            self._tcp_bound.append(bound)
        return bound

    def _refuse_live_ipc(self, endpoint: str) -> None:
        """Raise if a live consumer listens on ``endpoint``'s socket file.

        libzmq unlinks an existing ipc file and binds anew: a second consumer would silently
        take the endpoint over, and new producers' records would go to it. A file nobody
        listens on (its consumer died) is stale and may be replaced. An abstract name
        (``ipc://@...``) has no file: binding it twice fails with EADDRINUSE by itself.
        """
        path = endpoint[len("ipc://") :]
        if path.startswith("@") or path == "*":
            return
        try:
            st = _os.stat(path)
        except OSError:
            return  # nothing there (or an unusable directory: bind says which)
        if not stat.S_ISSOCK(st.st_mode):
            raise DescriptorError(
                f"cannot bind queue {self.queue_id!r} on {endpoint}: {path} exists and is not "
                "a socket; binding would delete it: choose another path or leave endpoint out"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale: left behind by a consumer that is gone
        except OSError as exc:
            # A timeout or EAGAIN (full backlog) means someone listens; anything else (no
            # permission) means we cannot tell, and replacing the file could steal a queue.
            why = "a consumer is listening there" if _busy(exc) else f"cannot probe it: {exc}"
            raise DescriptorError(
                f"cannot bind queue {self.queue_id!r} on {endpoint}: {why}; a queue has one "
                "consumer"
            ) from None
        finally:
            probe.close()
        raise DescriptorError(
            f"cannot bind queue {self.queue_id!r} on {endpoint}: another consumer is already "
            "listening there (a queue has one consumer): get() from that process, or close it "
            "first"
        )

    def _next_message(self, timeout: float) -> Any:
        """The first part of the next message, waiting up to ``timeout`` seconds.

        A message already here says nothing about waits. Otherwise the read polls first,
        giving the CPU away between polls, while most recent waits were short (see
        queues/_spin.py), then sleeps for what is left of ``timeout``. Raises ``zmq.Again``
        when nothing came.
        """
        sock, spin = self.sock, self.spin
        try:
            return sock.recv(_NOBLOCK)
        except zmq.Again:
            pass
        started = _perf()
        if spin.wants_spin():
            end = started + min(spin.limit, timeout)
            while _perf() < end:
                _yield()
                try:
                    peer = sock.recv(_NOBLOCK)
                except zmq.Again:
                    continue
                spin.note(0.0)
                return peer
            spin.note(None)
            timeout -= _perf() - started
            if timeout <= 0:
                raise zmq.Again()
            _wait_at_most(self, timeout)
            return sock.recv()
        _wait_at_most(self, timeout)
        try:
            peer = sock.recv()
        except zmq.Again:
            spin.note(None)
            raise
        spin.note(_perf() - started)
        return peer

    def recv(self, timeout: float) -> list[tuple[Any, ...]]:
        sock = self.sock
        # Straight to recv (RCVTIMEO when we may wait): a message that is already here costs
        # no ZMQ_EVENTS check, which is a syscall inside libzmq on the idle path.
        try:
            peer = sock.recv(_NOBLOCK) if timeout <= 0 else self._next_message(timeout)
        except zmq.Again:
            return []
        # The parts of one message arrive together. A Frame tells whether more follow for
        # less than a RCVMORE getsockopt, which builds a pyzmq enum on every call.
        part = sock.recv(copy=False)
        if part.more:
            extra = 1
            while sock.recv(copy=False).more:
                extra += 1
            self._reject(peer, f"expected one frame per message, got {1 + extra}")
            return []
        frame = part.bytes
        foreign = self._foreign
        if foreign and peer in foreign and not self._corrects_queue(peer, frame):
            why = (
                f"this connection's HELLO named queue {foreign[peer]!r}; this is {self.queue_id!r}"
            )
            self._reject(peer, why, WRONG_QUEUE)
            return []
        codec = self.codec
        codec.shm_origin = peer  # whom a shm slot in this frame is released to
        try:
            if frame[:HEADER_SIZE] == PLAIN_DATA_HEADER:  # most frames: no Message built
                producer, seq, records = codec.decode_plain_data(frame)
                return [("data", self, peer, producer, seq, records, len(frame))]
            msg = codec.decode(frame)
        except DecodeError as exc:
            self._reject(peer, str(exc))
            return []
        kind, f = msg.kind, msg.fields
        if kind is Kind.DATA:
            return [("data", self, peer, f[0], f[1], f[2], msg.nbytes)]
        if kind is Kind.END:
            return [("end", self, peer, f[0], f[1])]
        if kind is Kind.HELLO:
            if f.get("queue") and self.queue_id and f["queue"] != self.queue_id:
                # A producer of another queue (e.g. a stale endpoint after a restart).
                if len(self._foreign) >= 4096:
                    del self._foreign[next(iter(self._foreign))]
                self._foreign[peer] = str(f["queue"])
                why = f"HELLO names queue {f['queue']!r}; this is {self.queue_id!r}"
                self._reject(peer, why, WRONG_QUEUE)
                return []
            if f.get("acked", 0) > f["next_seq"]:
                self._reject(peer, "HELLO acked must not exceed next_seq")
                return []
            return [("hello", self, peer, f)]
        if kind is Kind.CLOSE:
            return [("close", self, peer, f[0], f[1])]
        if kind is Kind.HEARTBEAT:
            return [("heartbeat", self, peer, f[0])]
        self._reject(peer, f"{kind.name} is not sent to a consumer")
        return []

    def look_at_limits(self, now: float) -> None:
        """Warn if this process is at its file limit (see :func:`warn_if_cannot_accept`)."""
        warn_if_cannot_accept(self.queue_id, self.endpoint, now)

    def reject(self, peer: bytes, why: str) -> None:
        """Count a refused frame, warn once per peer per interval, answer ERROR."""
        self._reject(peer, why)

    def _corrects_queue(self, peer: bytes, frame: bytes) -> bool:
        """Whether ``frame`` is a HELLO naming this queue (the connection is ours after all)."""
        try:
            # Any other frame is refused undecoded: decoding a DATA frame would map its shm
            # references and release them, as if they were ours, to another producer.
            if parse_header(frame)[0] is not Kind.HELLO:
                return False
            msg = self.codec.decode(frame)
        except DecodeError:
            return False
        if msg.kind is Kind.HELLO and msg.fields.get("queue") in (None, self.queue_id):
            del self._foreign[peer]
            return True
        return False

    def _reject(self, peer: bytes, why: str, code: str = "rejected") -> None:
        self.rejected += 1
        now = time.monotonic()
        if now - self._last_warning.get(peer, -1e9) > 10.0:
            self._last_warning[peer] = now
            if len(self._last_warning) > 4096:
                self._last_warning.clear()
            log.warning(
                "queue %s: rejected a frame from peer %s: %s", self.queue_id, peer.hex(), why
            )
        try:
            body = {"code": code, "message": why[:200]}
            self.sock.send_multipart(
                [peer, self.codec.encode_control(Kind.ERROR, body)], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass

    def send_credit(self, peer: Any, credit: Credit) -> bool:
        body = self.credit_body(peer, credit)
        try:
            self.sock.send_multipart(
                [peer, self.codec.encode_control(Kind.CREDIT, body)], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            return False
        return True

    def credit_body(self, peer: Any, credit: Credit) -> dict[str, Any]:
        """The CREDIT map for ``peer`` (PROTOCOL.md §3)."""
        body: dict[str, Any] = {
            "session": credit.session,
            "received": credit.received,
            "acked": credit.acked,
            "limit": credit.limit,
        }
        if credit.base is not None:
            body["base"] = credit.base
        if credit.pid is not None and self.SAME_HOST:
            body["pid"] = credit.pid
        if credit.lost:
            body["lost"] = credit.lost
        return body

    def send_release(self, peer: Any, producer: str, slots: list[int]) -> bool:
        try:
            frame = self.codec.encode_control(Kind.RELEASE, [producer, slots])
            self.sock.send_multipart([peer, frame], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def close(self) -> None:
        self._unbind_tcp()
        self.sock.close(linger=200)  # long enough for the last receipts to leave
        for identity in self._ipc_files:
            unlink_if_same(identity)
        _observe.link_closed("consumer", self.endpoint, self.queue_id)

    UNBIND_WAIT = 1.0
    """Seconds close() waits for libzmq to close its tcp listeners."""

    def _unbind_tcp(self) -> None:
        """Stop listening on tcp before close() returns (connections keep their receipts).

        libzmq closes a listener in its I/O thread, after close() returned: meanwhile a
        producer opened in this process can connect to it and lose its frames with it, and a
        consumer opened again here fails to bind (EADDRINUSE). The listener's CLOSED event
        on a monitor says when it is gone.
        """
        bound, self._tcp_bound = self._tcp_bound, []
        if not bound:
            return
        monitor = None
        with contextlib.suppress(zmq.ZMQError):  # no monitor (file limit): do not wait
            monitor = self.sock.get_monitor_socket(zmq.EVENT_CLOSED)
        for endpoint in bound:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.unbind(endpoint)
        if monitor is None:
            return
        try:
            deadline = time.monotonic() + self.UNBIND_WAIT
            left = len(bound)
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not monitor.poll(int(remaining * 1000) + 1):
                    break
                if recv_monitor_message(monitor)["event"] == zmq.EVENT_CLOSED:
                    left -= 1
        finally:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            monitor.close(linger=0)


FD_HEADROOM = 16
"""File descriptors a new socket must leave free: it, its connections and libzmq's own helpers
need several, and libzmq aborts the whole process (an assertion) when one of those fails."""


def _descriptors_in_use() -> tuple[int, int] | None:
    """``(open, soft limit)`` of this process's file descriptors; None when the limit is far
    (counting would cost more than it tells) or cannot be read (no /proc: not Linux)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft > 1 << 16:
            return None
        return len(_os.listdir("/proc/self/fd")), soft
    except (OSError, ValueError):
        return None


def _check_fd_headroom(queue_id: str) -> None:
    usage = _descriptors_in_use()
    if usage is None:
        return  # libzmq's own EMFILE is all there is
    used, soft = usage
    if used + FD_HEADROOM > soft:
        raise DescriptorError(
            f"cannot open a socket for queue {queue_id!r}: this process has {used} of its "
            f"{soft} file descriptors open (ulimit -n), and a queue's socket with its "
            "connections needs several more. Close the descriptors you no longer use (a tcp "
            "descriptor made without an endpoint holds its socket until close()), or raise "
            "the limit"
        )


FD_LOOK_INTERVAL = 5.0
"""Seconds between two counts of this process's descriptors for :func:`warn_if_cannot_accept`."""
FD_WARN_INTERVAL = 60.0
_fd_look_at = 0.0
_fd_warned_at = -1e9


def warn_if_cannot_accept(queue_id: str, endpoint: str, now: float) -> None:
    """Log it when this process is too near its file limit for a bound socket to accept.

    At the limit libzmq cannot accept a connection; it retries on its own and tells only a
    socket monitor, so a producer connecting then waits and a consumer's ``get`` says
    ``Empty`` with nothing naming why. One count per process every ``FD_LOOK_INTERVAL``
    seconds, one warning a minute.
    """
    global _fd_look_at, _fd_warned_at
    if now < _fd_look_at:
        return
    _fd_look_at = now + FD_LOOK_INTERVAL
    usage = _descriptors_in_use()
    if usage is None or now - _fd_warned_at < FD_WARN_INTERVAL:
        return
    used, soft = usage
    if used + FD_HEADROOM <= soft:
        return
    _fd_warned_at = now
    log.warning(
        "queue %s: this process has %d of its %d file descriptors open (ulimit -n): new "
        "producers connecting to %s may not be accepted and then wait without an error. Close "
        "the descriptors you no longer use, or raise the limit",
        queue_id,
        used,
        soft,
        endpoint,
    )


def _new_socket(kind: int, queue_id: str) -> Any:  # as Context[Any].socket: Any
    _check_fd_headroom(queue_id)
    ctx = _runtime.context()
    try:
        return ctx.socket(kind)
    except zmq.ZMQError as exc:
        if exc.errno != errno.EMFILE:
            raise
        raise DescriptorError(
            f"cannot open a socket for queue {queue_id!r}: this process has as many ZeroMQ "
            f"sockets open as it may ({ctx.get(zmq.MAX_SOCKETS)}, or the file limit). Close "
            "the descriptors you no longer use: a tcp descriptor made without an endpoint "
            "binds its socket when it is created and holds it until close()"
        ) from None


def _busy(exc: OSError) -> bool:
    return isinstance(exc, TimeoutError | BlockingIOError) or exc.errno == errno.EAGAIN


def _bind_hint(code: int | None, endpoint: str) -> str:
    """What a failed bind's errno most likely means for a queue, and what to do."""
    if code == errno.EADDRINUSE:
        return (
            "another consumer, or another program, is already bound there (a queue has one "
            "consumer): pick a free port or leave endpoint out"
        )
    if endpoint.startswith("ipc://"):
        directory = _os.path.dirname(endpoint[len("ipc://") :]) or "."
        if code == errno.ENOENT:
            return (
                f"the directory {directory} does not exist: create it, or leave endpoint out "
                "for a private path"
            )
        if code in (errno.EACCES, errno.EPERM):
            return f"no permission to create a socket in {directory}"
    elif code in (errno.ENODEV, errno.EADDRNOTAVAIL, errno.EINVAL):
        return (
            "that is not an address of this host: the consumer binds a local interface "
            "address (or name); if producers connect through another name, give the bind "
            "address in metadata['bind']"
        )
    elif code in (errno.EACCES, errno.EPERM):
        return "no permission to bind that port (below 1024 needs privileges)"
    return "check the endpoint"


def unlink_if_same(identity: tuple[str, int, int]) -> None:
    """Remove an ipc socket file if it is still the one we bound (never a newer consumer's)."""
    # libzmq 4.3 leaves the socket file behind when the socket closes.
    path, dev, ino = identity
    with contextlib.suppress(OSError):
        st = _os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            _os.unlink(path)


_prebound: dict[str, RouterInlet] = {}


def claim_prebound(endpoint: str) -> RouterInlet | None:
    """The inlet bound early for ``endpoint`` by this process (see ``tcp`` without endpoint)."""
    return _prebound.pop(endpoint, None)


def prebound_queue(endpoint: str) -> str | None:
    """The id of the queue whose consumer inlet this process bound early on ``endpoint``."""
    inlet = _prebound.get(endpoint)
    return None if inlet is None else inlet.queue_id


def prebind(endpoint: str, inlet: RouterInlet) -> None:
    _prebound[endpoint] = inlet


def bound_by_here() -> str:
    """Who bound an endpoint early: this process's pid and a per-process token."""
    from sage_zmq.queues.local import _process_token

    return _process_token()


def _forget_prebound() -> None:
    _prebound.clear()


_os.register_at_fork(after_in_child=_forget_prebound)
