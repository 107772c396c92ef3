"""CURVE authentication and encryption for socket queues, key files, and the pickle policy.

Keys live in files (ZeroMQ certificate format, as ``zmq.auth`` writes them); descriptors and
config name those files, never the keys themselves, so a descriptor can be logged, pickled or
sent as JSON without leaking a secret. The consumer (ROUTER, CURVE server) loads its
``server_secret_key`` file and admits only clients whose public key is in its
``authorized_keys`` directory, checked by one ZAP authenticator thread per process. Producers
(DEALER, CURVE clients) load ``client_secret_key`` and the ``server_public_key``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from sage_zmq import _runtime
from sage_zmq.errors import SecurityError

log = logging.getLogger("sage_zmq.security")

ALLOW_ANY = "*"
"""``authorized_keys`` value that admits any client key (encryption without authentication)."""

_Z85_ALPHABET = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_WARN_INTERVAL = 10.0


@dataclass(frozen=True)
class CurvePaths:
    """Where a queue's CURVE key files are; paths only, never key material."""

    server_public_key: str | None = None
    server_secret_key: str | None = None
    client_public_key: str | None = None
    client_secret_key: str | None = None
    authorized_keys: str | None = None


_PATH_KEYS = tuple(f.name for f in fields(CurvePaths))


# ------------------------------------------------------------------------- key material check
def looks_like_key(value: Any) -> bool:
    """True for raw key bytes, a 40-character Z85 key, or pasted certificate text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return True  # paths are str; any bytes here is at best a key in disguise
    if not isinstance(value, str):
        return False
    if "secret-key" in value or "public-key" in value or "\n" in value:
        return True
    # A path of exactly 40 Z85-safe characters is possible; one that exists is a path.
    return len(value) == 40 and set(value) <= _Z85_ALPHABET and not os.path.exists(value)


def check_no_key_material(metadata: Mapping[str, Any], where: str = "metadata") -> None:
    """Raise :class:`SecurityError` if descriptor metadata carries CURVE key material.

    Checks the ``curve`` section and any top-level key whose name mentions a secret.
    """
    curve = metadata.get("curve")
    if isinstance(curve, Mapping):
        for key, value in curve.items():
            if key != "enabled" and looks_like_key(value):
                raise SecurityError(
                    f"{where}['curve'][{key!r}] holds key material, not a file path: a "
                    "descriptor travels between processes and must never carry a key. Write "
                    "the key to a file (sage-zmq keys generate DIR) and put the file's path here"
                )
    for key, value in metadata.items():
        if isinstance(key, str) and "secret" in key.lower() and looks_like_key(value):
            raise SecurityError(
                f"{where}[{key!r}] holds key material; reference key files by path instead"
            )


# ---------------------------------------------------------------------------- resolution
def curve_paths(
    metadata: Mapping[str, Any], cfg: Any, *, default_on: bool = True
) -> CurvePaths | None:
    """The CURVE files a queue uses, or None when CURVE is off for it.

    ``metadata['curve']`` may be ``True``/``False`` or a mapping of file paths (plus
    ``enabled``) layered over ``cfg.security.curve``. Without it, ``security.curve.enabled``
    decides, but only where ``default_on`` (tcp transports; ipc is guarded by file modes).
    """
    check_no_key_material(metadata)
    base = cfg.security.curve
    raw = metadata.get("curve")
    overrides: Mapping[str, Any] = {}
    if raw is None:
        enabled = bool(base.enabled) and default_on
    elif isinstance(raw, bool):
        enabled = raw
    elif isinstance(raw, Mapping):
        unknown = set(raw) - {"enabled", *_PATH_KEYS}
        if unknown:
            raise SecurityError(
                f"metadata['curve'] has unknown keys {sorted(map(str, unknown))}; allowed: "
                f"enabled, {', '.join(_PATH_KEYS)}"
            )
        enabled = bool(raw.get("enabled", True))
        overrides = raw
    else:
        raise SecurityError(
            f"metadata['curve'] must be true, false or a mapping of key file paths, got {raw!r}"
        )
    if not enabled:
        return None
    values: dict[str, str | None] = {}
    for name in _PATH_KEYS:
        value = overrides.get(name, getattr(base, name))
        if value is not None and not isinstance(value, str | os.PathLike):
            raise SecurityError(
                f"curve.{name} must be a file path (str), got {type(value).__name__}"
            )
        if value is not None and looks_like_key(value):
            raise SecurityError(
                f"security.curve.{name} holds key material; it must name a key file"
            )
        values[name] = None if value is None else os.fspath(value)
    return CurvePaths(**values)


# ------------------------------------------------------------------------------- key files
def _check_private_file(path: str, what: str) -> None:
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise SecurityError(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )


def load_keypair(path: str | None, what: str) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a secret certificate file."""
    if not path:
        raise SecurityError(
            f"CURVE is on but security.curve.{what} is not set: name the secret key file "
            "(create one with: sage-zmq keys generate DIR --name NAME)"
        )
    public, secret = _load(path, what)
    if secret is None:
        raise SecurityError(
            f"security.curve.{what} file {path} holds only a public key; name the "
            "NAME.key_secret file instead"
        )
    _check_private_file(path, f"secret key file ({what})")
    return public, secret


def load_public_key(path: str | None, what: str) -> bytes:
    """A Z85 public key from a certificate file (public or secret)."""
    if not path:
        raise SecurityError(
            f"CURVE is on but security.curve.{what} is not set: name the server's public key "
            "file (NAME.key)"
        )
    return _load(path, what)[0]


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read CURVE key file {path} ({what}): {exc}") from None
    for key in (public, secret):
        if key is not None and not _valid_z85_key(key):
            raise SecurityError(f"CURVE key file {path} ({what}) holds a malformed key")
    return public, secret


def _valid_z85_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except Exception:
        return False


def load_authorized_keys(location: str) -> frozenset[bytes]:
    """The Z85 public keys in ``location``: a directory of ``*.key`` files, or one file."""
    if os.path.isfile(location):
        return frozenset([_load(location, "authorized_keys")[0]])
    if not os.path.isdir(location):
        raise SecurityError(
            f"security.curve.authorized_keys {location!r} is neither a directory of client "
            "public key files (*.key) nor a key file"
        )
    try:
        keys = zmq.auth.load_certificates(location)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read authorized keys in {location}: {exc}") from None
    if not keys:
        raise SecurityError(
            f"authorized_keys directory {location} holds no client public keys (*.key): "
            "no producer could connect; copy each producer's NAME.key there"
        )
    return frozenset(keys)


def generate_keys(directory: str | os.PathLike[str], name: str = "sage-zmq") -> tuple[str, str]:
    """Write a new CURVE key pair as ``DIR/NAME.key`` and ``DIR/NAME.key_secret``.

    Both files are 0600 in a 0700 directory (created if missing). Existing files are never
    overwritten. Returns ``(public_path, secret_path)``.
    """
    if not name or os.sep in name or name.startswith("."):
        raise SecurityError(f"key name {name!r} must be a plain file name stem, e.g. 'server'")
    directory = os.fspath(directory)
    with contextlib.suppress(FileExistsError):
        os.makedirs(directory, 0o700)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise SecurityError(f"{directory} is not a directory")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SecurityError(
            f"key directory {directory} must be yours with mode 0700 (it is "
            f"{stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}): run chmod 700 {directory} or "
            "choose another directory"
        )
    public, secret = zmq.curve_keypair()
    public_path = os.path.join(directory, f"{name}.key")
    secret_path = os.path.join(directory, f"{name}.key_secret")
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise SecurityError(f"{path} already exists; choose another --name or remove it")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    _write_private(public_path, _certificate(public, None, stamp))
    try:
        _write_private(secret_path, _certificate(public, secret, stamp))
    except BaseException:
        os.unlink(public_path)
        raise
    return public_path, secret_path


def _certificate(public: bytes, secret: bytes | None, stamp: str) -> str:
    # The format zmq.auth.load_certificate reads (ZPL, as czmq and pyzmq write it).
    kind = "SECRET" if secret else "public"
    lines = [
        f"#   ****  Generated on {stamp} by sage-zmq  ****",
        f"#   ZeroMQ CURVE **{kind}** Certificate",
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions."
        if secret
        else "#   Exchange securely, or use a secure mechanism to verify the contents",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_private(path: str, text: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; state it outright
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def keys_main(argv: Sequence[str]) -> int:
    """``sage-zmq keys generate DIR [--name N]``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="sage-zmq keys", description="Manage CURVE key files for sage-zmq queues."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a new key pair NAME.key / NAME.key_secret")
    gen.add_argument("directory", help="directory for the key files (created 0700)")
    gen.add_argument("--name", default="sage-zmq", help="file name stem (default: sage-zmq)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed the usage error
        return int(exc.code or 0)
    try:
        public_path, secret_path = generate_keys(args.directory, args.name)
    except (SecurityError, OSError) as exc:
        print(f"sage-zmq: error: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public_path}")
    print(f"secret key: {secret_path}  (keep private; never put its content in a descriptor)")
    print(
        "Give the consumer (server) its NAME.key_secret as security.curve.server_secret_key and "
        "its NAME.key to producers as server_public_key; copy each producer's NAME.key into "
        "the consumer's authorized_keys directory."
    )
    return 0


# ------------------------------------------------------------------------- authenticator
class _AllowList:
    """The ZAP credentials provider for one ``authorized_keys`` location."""

    def __init__(self, location: str, keys: frozenset[bytes] | None) -> None:
        self.location = location
        self.keys = keys  # None: any key
        self.refused = 0
        self._warned: dict[bytes, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        if self.keys is None or key in self.keys:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) > _WARN_INTERVAL:
            if len(self._warned) > 1024:
                self._warned.clear()
            self._warned[key] = now
            log.warning(
                "refused a CURVE client with key %s: not in authorized_keys %s",
                key.decode(errors="replace"),
                self.location,
            )
        return False


_auth_lock = threading.Lock()
_auth: ThreadAuthenticator | None = None
_auth_ctx: zmq.Context[Any] | None = None
_allow: dict[str, _AllowList] = {}


def _domain(location: str) -> str:
    import hashlib

    return "sage-zmq-" + hashlib.sha1(location.encode()).hexdigest()[:16]


def authorize(location: str) -> str:
    """Register the allow-list at ``location`` (re-read now) with this process's authenticator.

    Starts the authenticator on first use. Returns the ZAP domain that server sockets using
    this allow-list must set.
    """
    if location == ALLOW_ANY:
        keys = None
        key = ALLOW_ANY
    else:
        key = os.path.realpath(location)
        keys = load_authorized_keys(key)
    domain = _domain(key)
    allow = _AllowList(key, keys)
    global _auth, _auth_ctx
    ctx = _runtime.context()
    with _auth_lock:
        if _auth is None or _auth_ctx is not ctx or not _auth.is_alive():
            _stop_locked()
            auth = _start_authenticator(ctx)
            _auth, _auth_ctx = auth, ctx
            for d, provider in _allow.items():
                auth.configure_curve_callback(d, credentials_provider=provider)
        _allow[domain] = allow
        _auth.configure_curve_callback(domain, credentials_provider=allow)
    return domain


def _start_authenticator(ctx: zmq.Context[Any]) -> ThreadAuthenticator:
    # The ZAP endpoint is one fixed inproc name per context, and closing a socket releases
    # its name asynchronously: right after a stop, binding it again can briefly fail.
    delay = 0.001
    deadline = time.monotonic() + 2.0
    while True:
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("sage_zmq.security.zap"))
        try:
            auth.start()
            return auth
        except zmq.ZMQError as exc:
            auth.stop()
            if exc.errno != zmq.EADDRINUSE:
                raise SecurityError(f"cannot start the CURVE authenticator: {exc}") from None
            if time.monotonic() > deadline:
                raise SecurityError(
                    "cannot start the CURVE authenticator: another ZAP handler is bound to "
                    "inproc://zeromq.zap.01 on this process's context"
                ) from None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def refused_clients() -> int:
    """CURVE handshakes this process's authenticator refused (unknown client keys)."""
    return sum(a.refused for a in list(_allow.values()))


def stop_authenticator() -> None:
    """Stop this process's ZAP authenticator (``sage_zmq.shutdown`` calls it)."""
    with _auth_lock:
        _stop_locked()
        _allow.clear()


def _stop_locked() -> None:
    global _auth, _auth_ctx
    auth, _auth, _auth_ctx = _auth, None, None
    if auth is not None:
        try:
            auth.stop()
        except zmq.ZMQError as exc:  # the context may already be gone
            log.debug("stopping the authenticator: %s", exc)


def _forget_after_fork() -> None:
    # The parent's thread and sockets do not exist here; disarm __del__ so it touches nothing.
    global _auth, _auth_ctx, _auth_lock
    auth = _auth
    if auth is not None:
        auth.pipe = None  # type: ignore[assignment]
        auth.zap_socket = None  # type: ignore[assignment]
        auth.thread = None  # type: ignore[assignment]
    _auth, _auth_ctx = None, None
    _auth_lock = threading.Lock()
    _allow.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


# ------------------------------------------------------------------------------ sockets
class CurveSetup:
    """What ``SocketOptions.curve`` holds: applies CURVE to a queue's sockets.

    Keys are read when a socket is set up, in the process that opens it, so a descriptor
    carries only paths and each host resolves them against its own files.
    """

    def __init__(self, paths: CurvePaths) -> None:
        self.paths = paths

    def apply_server(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (the consumer's ROUTER, before bind) a CURVE server with an allow-list."""
        p = self.paths
        public, secret = load_keypair(p.server_secret_key, "server_secret_key")
        if p.authorized_keys is None:
            raise SecurityError(
                "CURVE is on but security.curve.authorized_keys is not set: name a directory "
                "of producers' public key files (*.key), or '*' to admit any client key "
                "(encryption without authentication)"
            )
        # The authenticator must be running before bind: without a ZAP handler, libzmq
        # admits every CURVE client.
        domain = authorize(p.authorized_keys)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)

    def apply_client(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (a producer's DEALER, before connect) a CURVE client."""
        p = self.paths
        public, secret = load_keypair(p.client_secret_key, "client_secret_key")
        server = load_public_key(p.server_public_key, "server_public_key")
        if p.client_public_key is not None:
            declared = load_public_key(p.client_public_key, "client_public_key")
            if declared != public:
                raise SecurityError(
                    f"client_public_key {p.client_public_key} does not belong to "
                    f"client_secret_key {p.client_secret_key}"
                )
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)

    def __repr__(self) -> str:  # paths only: safe to log
        return f"CurveSetup({self.paths!r})"


# ------------------------------------------------------------------------------- pickle
def is_local_endpoint(endpoint: Any, queue_type: str) -> bool:
    """True for ipc/inproc endpoints (host-local, guarded by file modes)."""
    if isinstance(endpoint, str):
        return endpoint.startswith(("ipc://", "inproc://"))
    return queue_type == "shm"  # no endpoint yet: shm derives a private ipc path


def check_pickle_policy(
    allow_pickle: bool, *, curve: CurvePaths | None, local: bool, where: str
) -> None:
    """Refuse pickle on a link that is neither authenticated (CURVE) nor host-local."""
    if not allow_pickle or local:
        return
    if curve is not None and curve.authorized_keys == ALLOW_ANY:
        # Encrypted, but any key pair gets in: a stranger's pickle would run here.
        raise SecurityError(
            f"pickle is enabled (security.allow_pickle) for {where}, whose CURVE allow-list "
            "is '*' (any client key is admitted: encrypted, not authenticated), so a "
            "stranger's pickle would run in this process. Name the permitted client keys in "
            "curve.authorized_keys (a file or directory of public keys), or turn pickle off"
        )
    if curve is None:
        raise SecurityError(
            f"pickle is enabled (security.allow_pickle) for {where} without CURVE: "
            "unpickling bytes from an unauthenticated network peer runs its code. Enable "
            "CURVE (security.curve.enabled or metadata['curve']), use an ipc (shm) queue, or "
            "turn pickle off"
        )
