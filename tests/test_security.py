"""CURVE authentication, key files, descriptor hygiene, pickle policy, local resource modes and
control-field validation (issue 8; transports/PROTOCOL.md §2, §7, §10; docs/security.md)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from sage_zmq import Empty, QueueDescriptor, SecurityError, _runtime, security
from sage_zmq.queues._zmq import DealerLink, SocketOptions
from sage_zmq.testing import close_quietly, drain, wait_until
from sage_zmq.wire.codec import Codec
from sage_zmq.wire.frame import Kind, header

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Server, client and intruder key pairs; the client's public key is authorized."""
    kdir = tmp_path / "keys"
    auth = tmp_path / "authorized"
    server_pub, server_sec = security.generate_keys(kdir, "server")
    client_pub, client_sec = security.generate_keys(kdir, "client")
    intruder_pub, intruder_sec = security.generate_keys(tmp_path / "other", "intruder")
    auth.mkdir()
    shutil.copy(client_pub, auth)
    yield {
        "server_public_key": server_pub,
        "server_secret_key": server_sec,
        "client_public_key": client_pub,
        "client_secret_key": client_sec,
        "intruder_secret_key": intruder_sec,
        "intruder_public_key": intruder_pub,
        "authorized_keys": str(auth),
    }
    security.stop_authenticator()  # its ZAP sockets live on the process context


def _client_curve(keys: dict[str, str], server_public: str, client_secret: str) -> Any:
    """A producer's CURVE setup trusting ``keys[server_public]`` as ``keys[client_secret]``."""
    return security.CurveSetup(
        security.CurvePaths(
            server_public_key=keys[server_public], client_secret_key=keys[client_secret]
        )
    )


def _curve_meta(keys: dict[str, str]) -> dict[str, str]:
    names = ("server_public_key", "server_secret_key", "client_secret_key", "authorized_keys")
    return {k: keys[k] for k in names}


@pytest.fixture
def secure_queue(keys: dict[str, str]) -> Iterator[QueueDescriptor]:
    qd = QueueDescriptor(None, "tcp", {"curve": _curve_meta(keys), "maxsize": 1000})
    qd.qsize()  # opens the consumer here, so close() releases the socket bound at creation
    yield qd
    close_quietly(qd)


@contextlib.contextmanager
def _monitored(sock: zmq.Socket[Any]) -> Iterator[zmq.Socket[Any]]:
    mon = sock.get_monitor_socket(
        HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
    )
    try:
        yield mon
    finally:
        sock.disable_monitor()
        mon.close(linger=0)


def _next_handshake_event(mon: zmq.Socket[Any], timeout: float = 5.0) -> int:
    if not mon.poll(int(timeout * 1000)):
        raise AssertionError(f"no handshake event within {timeout} s")
    return int(recv_monitor_message(mon)["event"])


def _valid_frames(producer: str, records: list[Any], queue_id: str = "") -> list[bytes]:
    codec = Codec()
    hello = {"producer": producer, "epoch": 0, "queue": queue_id, "next_seq": 0, "acked": 0}
    return [
        codec.encode_control(Kind.HELLO, hello),
        codec.encode_batch(producer, 0, records)[0],
    ]


def _assert_delivers_nothing(qd: QueueDescriptor) -> None:
    """A permitted producer's marker arrives, and nothing else does."""
    qd.put("marker")
    qd.flush()
    assert qd.get(timeout=5) == "marker"
    with pytest.raises(Empty):
        qd.get(timeout=0.3)
    stats = qd.statistics()
    assert stats.received == 1, stats
    assert stats.rejected == 0, "intruder frames reached the decoder"


# ----------------------------------------------------------------------------- CURVE
def test_permitted_client_delivers_everything(secure_queue: QueueDescriptor) -> None:
    records = [{"i": i, "payload": "x" * (i % 50)} for i in range(2000)]
    got: list[Any] = []
    for start in range(0, len(records), 500):  # maxsize is 1000: put and get in turns
        for r in records[start : start + 500]:
            secure_queue.put(r, timeout=5)
        secure_queue.flush()
        got += drain(secure_queue, 500)
    assert got == records
    with pytest.raises(Empty):
        secure_queue.get(timeout=0.05)


def test_client_without_keys_delivers_nothing(secure_queue: QueueDescriptor) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.linger = 0
        with _monitored(sock) as mon:
            sock.connect(secure_queue.endpoint)
            for frame in _valid_frames("plain", ["sneaked"] * 10, secure_queue.queue_id):
                sock.send(frame)
            assert _next_handshake_event(mon) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        _assert_delivers_nothing(secure_queue)
    finally:
        sock.close(linger=0)
        ctx.term()


def test_client_with_unknown_key_delivers_nothing(
    secure_queue: QueueDescriptor, keys: dict[str, str]
) -> None:
    refused = security.refused_clients()
    intruder = _client_curve(keys, "server_public_key", "intruder_secret_key")
    link = DealerLink(
        str(secure_queue.endpoint), Codec(), SocketOptions(curve=intruder), queue_id="x"
    )
    try:
        with _monitored(link.sock) as mon:
            link.sock.disconnect(str(secure_queue.endpoint))  # reconnect under the monitor
            link.sock.connect(str(secure_queue.endpoint))
            link.send_hello("intruder", 0, 0, 0)
            link.send_batch("intruder", 0, ["sneaked"] * 10)
            assert _next_handshake_event(mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        _assert_delivers_nothing(secure_queue)
        assert security.refused_clients() > refused
    finally:
        link.close()


def test_a_refused_producer_keeps_to_its_timeouts(
    secure_queue: QueueDescriptor, keys: dict[str, str]
) -> None:
    # No connection takes its frames (the handshake is refused): a send must not block, or
    # put and close would hang for as long as it did, whatever their own timeouts.
    import time

    from sage_zmq import DeliveryError, Full
    from sage_zmq.queues._producer import Producer

    intruder = _client_curve(keys, "server_public_key", "intruder_secret_key")
    link = DealerLink(str(secure_queue.endpoint), Codec(), SocketOptions(curve=intruder))
    producer = Producer(
        link,
        queue_id="x",
        queue_type="tcp",
        window=5,
        batch_size=1,
        flush_interval=0.01,
        timeout=60,
    )
    started = time.monotonic()
    for i in range(5):
        producer.put(i, timeout=0.3)  # within the window: accepted at once
    with pytest.raises(Full):
        producer.put(5, timeout=0.3)
    with pytest.raises(DeliveryError, match="CURVE key") as info:
        producer.close(timeout=0.3)
    assert info.value.undelivered == 5
    assert time.monotonic() - started < 10  # it took 60 s (the queue's timeout) per send
    _assert_delivers_nothing(secure_queue)


def test_client_with_wrong_server_key_delivers_nothing(
    secure_queue: QueueDescriptor, keys: dict[str, str]
) -> None:
    # The right client key, but it trusts another server: the handshake cannot complete.
    wrong = _client_curve(keys, "intruder_public_key", "client_secret_key")
    link = DealerLink(str(secure_queue.endpoint), Codec(), SocketOptions(curve=wrong))
    try:
        with _monitored(link.sock) as mon:
            link.sock.disconnect(str(secure_queue.endpoint))
            link.sock.connect(str(secure_queue.endpoint))
            link.send_batch("confused", 0, ["misrouted"])
            assert _next_handshake_event(mon) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        _assert_delivers_nothing(secure_queue)
    finally:
        link.close()


def test_curve_needs_an_allow_list(keys: dict[str, str]) -> None:
    meta = _curve_meta(keys)
    del meta["authorized_keys"]
    with pytest.raises(SecurityError, match="authorized_keys"):
        QueueDescriptor(None, "tcp", {"curve": meta})


def test_empty_allow_list_is_an_error(keys: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "nobody"
    empty.mkdir()
    meta = {**_curve_meta(keys), "authorized_keys": str(empty)}
    with pytest.raises(SecurityError, match="no client public keys"):
        QueueDescriptor(None, "tcp", {"curve": meta})


def test_world_readable_secret_key_is_refused(keys: dict[str, str]) -> None:
    os.chmod(keys["server_secret_key"], 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        QueueDescriptor(None, "tcp", {"curve": _curve_meta(keys)})


def test_config_enables_curve_for_tcp_only(keys: dict[str, str]) -> None:
    from sage_zmq.config import load_config

    cfg = load_config({"security": {"curve": {"enabled": True, **_curve_meta(keys)}}})
    tcp = security.curve_paths({}, cfg, default_on=True)
    assert tcp is not None and tcp.server_secret_key == keys["server_secret_key"]
    assert security.curve_paths({}, cfg, default_on=False) is None  # ipc: file modes guard it
    assert security.curve_paths({"curve": False}, cfg) is None
    override = security.curve_paths({"curve": {"authorized_keys": "*"}}, cfg)
    assert override is not None and override.authorized_keys == "*"
    with pytest.raises(SecurityError, match="unknown keys"):
        security.curve_paths({"curve": {"server_key": "x"}}, cfg)


# ------------------------------------------------------------------- key material & files
def test_descriptor_carries_paths_never_keys(
    secure_queue: QueueDescriptor, keys: dict[str, str]
) -> None:
    names = ("server_secret_key", "client_secret_key")
    secrets = [zmq.auth.load_certificate(keys[k])[1] for k in names]
    assert all(s for s in secrets)
    carried = [
        secure_queue.to_json().encode(),
        json.dumps(secure_queue.to_dict()).encode(),
        pickle.dumps(secure_queue),
        repr(secure_queue).encode(),
    ]
    for blob in carried:
        for secret in secrets:
            assert secret not in blob
    assert secure_queue.metadata["curve"]["server_secret_key"] == keys["server_secret_key"]


@pytest.mark.parametrize(
    "material",
    [
        "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",  # a Z85 key
        bytes(range(32)),  # raw key bytes
        '    secret-key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"\n',  # pasted certificate
    ],
)
def test_key_material_in_metadata_is_rejected(material: Any, keys: dict[str, str]) -> None:
    meta = {**_curve_meta(keys), "client_secret_key": material}
    with pytest.raises(SecurityError, match="key material"):
        QueueDescriptor(None, "tcp", {"curve": meta})
    with pytest.raises(SecurityError, match="key material"):
        security.check_no_key_material({"curve": {"server_secret_key": material}})
    with pytest.raises(SecurityError, match="key material"):
        security.check_no_key_material({"my_secret": material})


def test_a_40_character_path_that_exists_is_a_path() -> None:
    path = "/tmp/" + os.urandom(18).hex()[:35]  # 40 characters, all of them Z85-safe
    assert len(path) == 40
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        assert not security.looks_like_key(path)
    finally:
        os.unlink(path)
    assert security.looks_like_key(path)  # the same string naming no file reads as a key


def test_generated_keys_are_private_even_with_an_open_umask(tmp_path: Path) -> None:
    with _umask(0):
        public, secret = security.generate_keys(tmp_path / "k", "node1")
    assert _mode(tmp_path / "k") == 0o700
    assert _mode(public) == 0o600 and _mode(secret) == 0o600
    pub_key, sec_key = zmq.auth.load_certificate(secret)
    assert sec_key is not None and zmq.auth.load_certificate(public) == (pub_key, None)
    assert zmq.curve_public(sec_key) == pub_key


def test_generate_keys_refuses_overwrite_and_shared_dirs(tmp_path: Path) -> None:
    security.generate_keys(tmp_path / "k", "a")
    before = (tmp_path / "k" / "a.key_secret").read_bytes()
    with pytest.raises(SecurityError, match="already exists"):
        security.generate_keys(tmp_path / "k", "a")
    assert (tmp_path / "k" / "a.key_secret").read_bytes() == before
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(SecurityError, match="0700"):
        security.generate_keys(shared, "a")
    with pytest.raises(SecurityError, match="file name"):
        security.generate_keys(tmp_path / "k", "../escape")


def test_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert security.keys_main(["generate", str(tmp_path / "k"), "--name", "srv"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "k" / "srv.key_secret") in out
    assert _mode(tmp_path / "k" / "srv.key_secret") == 0o600
    assert security.keys_main(["generate", str(tmp_path / "k"), "--name", "srv"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert security.keys_main(["rotate"]) == 2
    assert security.keys_main(["generate", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "sage-zmq.key").exists()


# ----------------------------------------------------------------------------- pickle
def test_pickle_is_refused_on_plain_tcp() -> None:
    with pytest.raises(SecurityError, match="without CURVE"):
        QueueDescriptor(None, "tcp", {"allow_pickle": True})
    explicit = QueueDescriptor(None, "tcp", {"allow_pickle": True, "endpoint": "tcp://127.0.0.1:1"})
    with pytest.raises(SecurityError, match="without CURVE"):
        explicit.put({1, 2})
    close_quietly(explicit)


def test_pickle_works_with_curve(keys: dict[str, str]) -> None:
    qd = QueueDescriptor(None, "tcp", {"curve": _curve_meta(keys), "allow_pickle": True})
    try:
        qd.put({1, 2, 3})
        assert qd.get(timeout=5) == {1, 2, 3}
    finally:
        close_quietly(qd)


def test_pickle_is_refused_where_the_allow_list_admits_any_key(keys: dict[str, str]) -> None:
    """'*' encrypts but admits any key pair: a stranger's pickle would run in the consumer."""
    meta = {"curve": {**_curve_meta(keys), "authorized_keys": "*"}, "allow_pickle": True}
    with pytest.raises(SecurityError, match="'\\*'"):
        QueueDescriptor(None, "tcp", meta)
    plain = QueueDescriptor(None, "tcp", {"curve": {**_curve_meta(keys), "authorized_keys": "*"}})
    try:  # without pickle, '*' stays a valid (encrypted) set-up
        plain.put([1])
        assert plain.get(timeout=5) == [1]
    finally:
        close_quietly(plain)


def test_pickle_works_on_ipc() -> None:
    qd = QueueDescriptor(None, "shm", {"allow_pickle": True})
    try:
        qd.put(frozenset({4}))
        assert qd.get(timeout=5) == frozenset({4})
    finally:
        close_quietly(qd)


# ------------------------------------------------------------------- local resources
def test_ipc_socket_file_is_0600_in_a_0700_dir() -> None:
    with _umask(0):
        qd = QueueDescriptor(None, "shm")
        try:
            with contextlib.suppress(Empty):
                qd.get_nowait()  # opens the consumer: binds the ipc socket
            path = str(qd.endpoint)[len("ipc://") :]
            assert _mode(path) == 0o600
            assert _mode(os.path.dirname(path)) == 0o700
            assert os.path.dirname(path) == _runtime.runtime_dir()
        finally:
            close_quietly(qd)


def test_explicit_ipc_path_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    with _umask(0):
        qd = QueueDescriptor(None, "shm", {"endpoint": f"ipc://{path}"})
        try:
            with contextlib.suppress(Empty):
                qd.get_nowait()  # opens the consumer: binds the ipc socket
            assert _mode(path) == 0o600
        finally:
            close_quietly(qd)


def test_runtime_dir_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "rt"
    shared.mkdir()
    os.chmod(shared, 0o755)
    monkeypatch.setenv("SAGE_ZMQ_RUNTIME_DIR", str(shared))
    with pytest.raises(SecurityError, match="0700"):
        _runtime.runtime_dir()


def test_shm_segments_are_0600() -> None:
    from sage_zmq.shm.pool import SHM_DIR, SharedMemoryPool

    with _umask(0), SharedMemoryPool(1 << 20, sweep=False, prefault=False) as pool:
        slot = pool.alloc(4096)
        assert _mode(os.path.join(SHM_DIR, slot.segment)) == 0o600
        pool.release(slot.id)


def test_default_bind_is_loopback_and_wildcards_need_asking() -> None:
    qd = QueueDescriptor(None, "tcp")
    try:
        qd.qsize()
        assert str(qd.endpoint).startswith("tcp://127.0.0.1:")
    finally:
        close_quietly(qd)
    with pytest.raises(SecurityError.__mro__[1], match="not connectable"):
        QueueDescriptor(None, "tcp", {"endpoint": "tcp://*:0"})
    # Listening on every interface takes an explicit bind address.
    qd = QueueDescriptor(None, "tcp", {"endpoint": "tcp://127.0.0.1:0", "bind": "tcp://0.0.0.0:0"})
    try:
        qd.put(1)
        assert qd.get(timeout=5) == 1
    finally:
        close_quietly(qd)


# ------------------------------------------------------------------ control fields
class RawPeer:
    """A raw DEALER speaking frames by hand to a plain tcp queue."""

    def __init__(self, qd: QueueDescriptor) -> None:
        self.qd = qd
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(str(qd.endpoint))
        self.codec = Codec()

    def send(self, kind: Kind, body: Any) -> None:
        if kind is Kind.DATA:
            self.sock.send(self.codec.encode_batch(*body)[0])
        else:
            self.sock.send(self.codec.encode_control(kind, body))

    def replies(self, n: int, kind: Kind) -> list[Any]:
        """The next ``n`` replies of ``kind``, pumping the consumer while waiting."""
        got: list[Any] = []

        def arrived() -> bool:
            with contextlib.suppress(Empty):
                self.qd.get(timeout=0.01)  # pumps the consumer; the tests send no records here
            while self.sock.poll(0):
                msg = self.codec.decode(self.sock.recv())
                if msg.kind is kind:
                    got.append(msg.fields)
            return len(got) >= n

        wait_until(arrived, what=f"{n} {kind.name} replies")
        return got

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def plain_queue() -> Iterator[QueueDescriptor]:
    qd = QueueDescriptor(None, "tcp", {"maxsize": 100, "upstreams": 2})
    yield qd
    close_quietly(qd)


@pytest.fixture
def raw(plain_queue: QueueDescriptor) -> Iterator[RawPeer]:
    peer = RawPeer(plain_queue)
    yield peer
    peer.close()


def test_consumer_to_producer_frames_from_a_producer_are_rejected(
    plain_queue: QueueDescriptor, raw: RawPeer
) -> None:
    raw.send(Kind.CREDIT, {"session": "s", "received": 0, "acked": 0, "limit": 10**9})
    raw.send(Kind.RELEASE, ["p", [1, 2]])
    raw.send(Kind.ERROR, {"code": "x", "message": "y"})
    errors = raw.replies(3, Kind.ERROR)
    assert all("not sent to a consumer" in e["message"] for e in errors)
    assert plain_queue.statistics().rejected == 3


def test_a_message_of_several_frames_is_rejected_and_the_stream_goes_on(
    plain_queue: QueueDescriptor, raw: RawPeer
) -> None:
    codec = raw.codec
    raw.sock.send_multipart([codec.encode_batch("p", 0, [1])[0], b"extra", b"more"])
    errors = raw.replies(1, Kind.ERROR)
    assert "expected one frame per message, got 3" in errors[0]["message"]
    raw.send(Kind.DATA, ("p", 0, ["after"]))
    assert plain_queue.get(timeout=5) == "after"  # framing held: the next message is whole
    assert plain_queue.statistics().rejected == 1


def test_hello_for_another_queue_is_rejected(plain_queue: QueueDescriptor, raw: RawPeer) -> None:
    raw.send(Kind.HELLO, {"producer": "p", "epoch": 0, "queue": "other", "next_seq": 0})
    raw.send(Kind.HELLO, {"producer": "p", "epoch": 0, "next_seq": 1, "acked": 5})
    errors = raw.replies(2, Kind.ERROR)
    assert "names queue 'other'" in errors[0]["message"]
    assert "acked" in errors[1]["message"]
    assert plain_queue.statistics().producers == 0


def test_a_peer_cannot_steer_another_producer(plain_queue: QueueDescriptor, raw: RawPeer) -> None:
    plain_queue.put("first")
    assert plain_queue.get(timeout=5) == "first"  # the real producer owns its id now
    victim = plain_queue._handle()._producer.producer_id
    raw.send(Kind.DATA, (victim, 2**62, ["forged"]))  # would make later records "duplicates"
    raw.send(Kind.HELLO, {"producer": victim, "epoch": 9, "next_seq": 2**62, "acked": 2**62})
    raw.send(Kind.HEARTBEAT, [victim])  # would steal its credits
    raw.send(Kind.END, [victim, 1])  # would end its stream
    raw.send(Kind.CLOSE, [victim, 1])
    errors = raw.replies(5, Kind.ERROR)
    assert all("belongs to another connection" in e["message"] for e in errors)
    for i in range(50):
        plain_queue.put(i)
    plain_queue.flush()
    assert drain(plain_queue, 50) == list(range(50))
    stats = plain_queue.statistics()
    assert stats.rejected == 5 and stats.upstreams_ended == 0 and stats.duplicates == 0


def test_a_producer_id_moves_to_a_new_connection_once_the_old_is_gone(
    plain_queue: QueueDescriptor, raw: RawPeer
) -> None:
    raw.send(Kind.HELLO, {"producer": "p", "epoch": 0, "next_seq": 0})
    raw.send(Kind.DATA, ("p", 0, ["a"]))
    assert plain_queue.get(timeout=5) == "a"
    raw.close()
    raw.__init__(plain_queue)  # type: ignore[misc]  # a reconnect: new routing id
    seq = 1

    def accepted() -> bool:
        nonlocal seq
        raw.send(Kind.DATA, ("p", seq, [f"b{seq}"]))
        seq += 1
        with contextlib.suppress(Empty):
            return str(plain_queue.get(timeout=0.05)).startswith("b")
        return False

    wait_until(accepted, what="the new connection to take over producer id 'p'")


def test_a_retransmitted_end_counts_once(plain_queue: QueueDescriptor, raw: RawPeer) -> None:
    raw.send(Kind.DATA, ("p", 0, ["a"]))
    raw.send(Kind.END, ["p", 1])
    raw.send(Kind.END, ["p", 1])  # the same END again must not end the second upstream
    assert plain_queue.get(timeout=5) == "a"
    wait_until(lambda: _drained_ends(plain_queue) >= 1, what="the END")
    with pytest.raises(Empty):
        plain_queue.get(timeout=0.2)  # upstreams=2: one END seen, not two


def _drained_ends(qd: QueueDescriptor) -> int:
    with contextlib.suppress(Empty):
        qd.get(timeout=0.01)
    return qd.statistics().upstreams_ended


def test_an_empty_batch_moves_nothing(plain_queue: QueueDescriptor, raw: RawPeer) -> None:
    raw.send(Kind.DATA, ("p", 0, ["a"]))
    raw.send(Kind.DATA, ("p", 100, []))  # once crashed get() (records[0] of an empty batch)
    raw.send(Kind.DATA, ("p", 1, ["b"]))
    assert [plain_queue.get(timeout=5), plain_queue.get(timeout=5)] == ["a", "b"]
    assert plain_queue.statistics().extra["gaps"] == 0  # type: ignore[index]


def test_a_connection_may_not_mint_unlimited_producer_ids(
    plain_queue: QueueDescriptor, raw: RawPeer
) -> None:
    from sage_zmq.queues._consumer import MAX_PRODUCERS_PER_PEER

    for i in range(MAX_PRODUCERS_PER_PEER + 4):
        raw.send(Kind.HELLO, {"producer": f"p{i}", "epoch": 0, "next_seq": 0})
    errors = raw.replies(4, Kind.ERROR)
    assert all("at most" in e["message"] for e in errors)
    assert plain_queue.statistics().producers == MAX_PRODUCERS_PER_PEER


def test_oversized_frame_is_dropped_and_the_queue_keeps_running() -> None:
    qd = QueueDescriptor(None, "tcp", {"max_message_size": 4096})
    peer = RawPeer(qd)
    try:
        with _monitored(peer.sock) as mon:
            peer.sock.send(header(Kind.DATA) + msgpack.packb(["p", 0, [b"x" * 10_000]]))
            event = _next_handshake_event(mon)
            while event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                event = _next_handshake_event(mon)
            assert event == zmq.EVENT_DISCONNECTED  # libzmq drops a peer over MAXMSGSIZE
        qd.put("still here")
        assert qd.get(timeout=5) == "still here"
    finally:
        peer.close()
        close_quietly(qd)


_REFUSED_PRODUCER = """
import sys, time
from sage_zmq import QueueDescriptor
qd = QueueDescriptor.from_json(sys.argv[1])
qd.put({"i": 0}, timeout=2)
started = time.monotonic()
try:
    qd.close(timeout=1)
    print("closed")
except Exception as exc:
    print(type(exc).__name__, round(time.monotonic() - started, 1))
"""


@pytest.mark.parametrize("qtype, meta", [("sage", {"transport": "tcp"}), ("tcp", {"ack": True})])
def test_a_refused_reliable_producer_closes_within_its_timeout(
    keys: dict[str, str], qtype: str, meta: dict[str, Any]
) -> None:
    """CURVE refuses the producer's key, so it never has a connection: its sends (heartbeats,
    CLOSE) must not block, and close() reports the records as undelivered on time."""
    import subprocess
    import sys

    qd = QueueDescriptor(None, qtype, {**meta, "curve": _curve_meta(keys), "maxsize": 100})
    try:
        with pytest.raises(Empty):
            qd.get(timeout=0.05)  # the consumer is up
        as_intruder = qd.to_dict()
        as_intruder["metadata"]["curve"] = {
            "server_public_key": keys["server_public_key"],
            "client_secret_key": keys["intruder_secret_key"],
        }
        proc = subprocess.run(
            [sys.executable, "-c", _REFUSED_PRODUCER, json.dumps(as_intruder)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        what, seconds = proc.stdout.split()
        assert what == "DeliveryError", proc.stderr[-2000:]
        assert float(seconds) < 5
    finally:
        close_quietly(qd)


def test_an_end_that_failed_to_open_does_not_poison_its_endpoint(keys: dict[str, str]) -> None:
    """The second descriptor for an endpoint opens with its own settings, not the failed
    first one's (the ends of one endpoint are shared in a process once open)."""
    consumer = QueueDescriptor(None, "tcp", {"maxsize": 100})
    endpoint = consumer.endpoint
    wrong = {**_curve_meta(keys), "client_public_key": keys["intruder_public_key"]}
    qid = consumer.queue_id  # the same queue: a consumer refuses producers of another one
    first = QueueDescriptor(qid, "tcp", {"endpoint": endpoint, "curve": wrong})
    second = QueueDescriptor(qid, "tcp", {"endpoint": endpoint, "curve": False})
    try:
        with pytest.raises(SecurityError, match="does not belong"):
            first.put(1)
        second.put("fine")
        assert consumer.get(timeout=5) == "fine"
    finally:
        close_quietly(first, second, consumer)
