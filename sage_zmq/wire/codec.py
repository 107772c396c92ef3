"""Record codec: msgpack plus the extension types the protocol defines.

Extension types (see ``transports/PROTOCOL.md``):

====  ===========  ===================================================================
code  what         body (msgpack)
====  ===========  ===================================================================
1     Packet       [payload, input_index, partition_key, partition_strategy, headers, timestamp]
2     ndarray      [dtype, shape, data]: dtype = numpy ``dtype.str`` or a ``descr`` list,
                   shape = list of ints, data = bin in C order
3     EndOfStream  [source]
4     shm ref      shared-memory side buffer (a transport installs the hook)
126   pickle+oob   [pickle bytes, [buffer, ...]]: protocol 5 with out-of-band buffers, each
                   a bin or a shm ref; decoded only where pickle is enabled
127   pickle       pickle protocol 5 bytes; decoded only where pickle is enabled
====  ===========  ===================================================================

Nothing decoded from the wire executes code unless the user enabled pickle for the link.
"""

from __future__ import annotations

import ipaddress
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import lz4.frame
import msgpack

from sage_zmq.errors import DecodeError, EncodeError
from sage_zmq.observe import tracing as _tracing
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.wire import _fast
from sage_zmq.wire.dtypes import dtype_from_wire, dtype_to_wire
from sage_zmq.wire.frame import FLAG_LZ4, FLAG_PICKLE, HEADER_SIZE, Kind, header, parse_header

if TYPE_CHECKING:
    import numpy as np

PLAIN_DATA_HEADER = header(Kind.DATA)
"""The header of a DATA frame without flags (no lz4, no pickle): see ``decode_plain_data``."""

EXT_PACKET = 1
EXT_NDARRAY = 2
EXT_END_OF_STREAM = 3
EXT_SHM_REF = 4
EXT_PICKLE_OOB = 126
EXT_PICKLE = 127

MAX_PRODUCER_ID = 128
MAX_EXT_DEPTH = 16


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one frame may make the receiver allocate."""

    max_frame_bytes: int = 2**31 - 1
    max_decompressed_bytes: int = 2**31 - 1
    max_records: int = 1_000_000


class Message(NamedTuple):
    """A decoded frame. ``fields`` depends on ``kind`` (see ``Codec.decode``)."""

    kind: Kind
    fields: Any
    nbytes: int


COMPRESS_AUTO = "auto"

_DECLINED = object()  # what _fast_unpack returns for a body it leaves to msgpack-python


def compression_mode(setting: bool | str, endpoint: str | None) -> bool | str:
    """What a producer link passes to ``encode_batch(compress=...)`` for a config setting.

    ``True``/``False`` force lz4 on/off. ``"auto"`` stays ``"auto"`` (compress while it pays,
    see :class:`Lz4Policy`) only for tcp to a non-loopback host: lz4 (~0.6 GB/s) is slower
    than ipc, inproc and loopback, so there it never pays.
    """
    if isinstance(setting, bool):
        return setting
    if setting != COMPRESS_AUTO:
        raise ValueError(f"compression must be true, false or 'auto', got {setting!r}")
    if not endpoint or not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]").lower()
    if host in ("localhost", "*", "") or host.endswith(".localhost"):
        return False
    try:
        if ipaddress.ip_address(host).is_loopback:
            return False
    except ValueError:
        pass  # a host name: assume remote (no DNS lookups on this path)
    return COMPRESS_AUTO


class Lz4Policy:
    """``compression="auto"``: compress while sampled batches shrink by ``min_saving``.

    When a batch does not shrink enough, the next ``backoff`` batches go uncompressed, then one
    is sampled again; the backoff doubles (up to ``max_backoff``) while data stays
    incompressible, so random payloads pay for lz4 on about one batch in a thousand.
    """

    def __init__(
        self, min_saving: float = 0.2, probe_every: int = 16, max_backoff: int = 1024
    ) -> None:
        self.min_saving = min_saving
        self.probe_every = probe_every
        self.max_backoff = max_backoff
        self.paying = True  # try the first batch
        self._skip = 0
        self._backoff = probe_every
        self.compressed = self.skipped = 0

    def want(self) -> bool:
        if self.paying or self._skip <= 0:
            return True
        self._skip -= 1
        self.skipped += 1
        return False

    def observe(self, raw: int, packed: int) -> None:
        if packed <= raw * (1.0 - self.min_saving):
            self.paying = True
            self.compressed += 1
            self._backoff = self.probe_every
        else:
            self.paying = False
            self._skip = self._backoff
            self._backoff = min(2 * self._backoff, self.max_backoff)


ShmEncoder = Callable[[Any], "msgpack.ExtType | None"]
ShmDecoder = Callable[[bytes], Any]


class Codec:
    """Encodes batches and control messages into frames and decodes frames back.

    One codec per socket: its msgpack ``Packer`` is reused and is not thread-safe.
    """

    trace_queue: str | None = None  # the queue named in trace hops; set when its socket opens
    fast = _fast.AVAILABLE  # ormsgpack first where it gives the same result (wire/_fast.py)

    def __init__(
        self,
        *,
        allow_pickle: bool = False,
        limits: DecodeLimits | None = None,
        zero_copy: bool = True,
        shm_encoder: ShmEncoder | None = None,
        shm_decoder: ShmDecoder | None = None,
    ) -> None:
        self.allow_pickle = allow_pickle
        self._pickled = False  # the frame being encoded holds a pickle extension
        self.limits = limits or DecodeLimits()
        self.zero_copy = zero_copy
        self.shm_encoder = shm_encoder
        self.shm_decoder = shm_decoder
        self._shm_views: dict[bytes, Any] | None = None  # this frame's, while decoding it
        self._pairs_hook: Callable[[list[tuple[Any, Any]]], dict[Any, Any]] | None = None
        # Routing id of the frame being decoded: the consumer's inlet sets it so that the shm
        # decoder knows whom to send a slot's RELEASE.
        self.shm_origin: Any = None
        # EndOfStream values decoded so far: when a DATA frame moves it, the decoder looks for
        # one at the top level, which it refuses (PROTOCOL §9), at no cost to other frames.
        self.end_records = 0
        self.compression_min_bytes = 64
        self.lz4_policy = Lz4Policy()
        self._ext_depth = 0
        self._packer = msgpack.Packer(default=self._default, use_bin_type=True, datetime=False)
        self._fast_decoding = False  # inside a fast pass: nested extensions decode fast too
        self._slow_encodes = 0  # frames left to msgpack-python after the fast path declined
        self._slow_decodes = 0

    # ------------------------------------------------------------------ encode
    def _default(self, obj: Any) -> Any:
        cls = obj.__class__
        if cls is Packet:
            return msgpack.ExtType(EXT_PACKET, self._pack_inner(self._packet_fields(obj)))
        # numpy is imported on demand (~100 ms): where it was never imported, no record can
        # hold an array, and a queue of plain records never pays for it.
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            if isinstance(obj, numpy.ndarray):
                if self.shm_encoder is not None:
                    ref = self.shm_encoder(obj)
                    if ref is not None:
                        return ref
                return self.inline_array(obj)
            if isinstance(obj, numpy.generic):
                return obj.item()
        if cls is EndOfStream:
            return msgpack.ExtType(EXT_END_OF_STREAM, self._pack_inner([obj.source]))
        if cls is int and not self.allow_pickle:  # msgpack has no format for this one
            # A ValueError, not EncodeError: the caller's message then names the record.
            text = str(obj)
            raise ValueError(
                f"it holds the integer {text[:40]}{'...' if len(text) > 40 else ''}, and "
                "msgpack carries integers from -2**63 to 2**64-1 only; send a larger one as a "
                "str (as a partition key, str(n) hashes exactly as n does)"
            )
        if isinstance(obj, memoryview | bytearray):
            return bytes(obj)
        if self.allow_pickle:
            return self._pickle(obj)
        raise EncodeError(
            f"cannot encode a record of type {type(obj).__module__}.{type(obj).__qualname__}: "
            "records must be msgpack types (dict, list, str, bytes, int, float, bool, None), "
            "Packet, EndOfStream or numpy arrays; convert it, or enable pickle "
            "(security.allow_pickle) on an authenticated or local link"
        )

    def _packet_fields(self, packet: Packet) -> list[Any]:
        headers = packet.headers
        if headers is not None and _tracing.HOPS in headers:  # a traced packet: add a hop
            headers = _tracing.on_encode(headers, self.trace_queue)
        return [
            packet.payload,
            packet.input_index,
            packet.partition_key,
            packet.partition_strategy,
            headers,
            packet.timestamp,
        ]

    def _fast_default(self, obj: Any) -> Any:
        """``_default`` for the fast path, for what it packs as msgpack-python does; the
        rest (pickle, shared memory, non-str keys, ...) is declined, with no side effect."""
        cls = obj.__class__
        if cls is msgpack.ExtType:  # a payload staged for the pool (a namedtuple to ormsgpack)
            return _fast.Ext(obj.code, obj.data)
        if cls is Packet:
            return _fast.Ext(EXT_PACKET, _fast.pack(self._packet_fields(obj), self._fast_default))
        if cls is EndOfStream:
            return _fast.Ext(EXT_END_OF_STREAM, _fast.pack([obj.source], self._fast_default))
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            if isinstance(obj, numpy.ndarray) and self.shm_encoder is None:
                return _fast.Ext(EXT_NDARRAY, self._pack_ndarray(obj))
            # item() drops the trailing NULs of np.bytes_/np.str_, which msgpack-python keeps
            if isinstance(obj, numpy.generic) and not isinstance(obj, str | bytes):
                return obj.item()
        raise _fast.Declined(cls.__qualname__)

    def _pickle(self, obj: Any) -> msgpack.ExtType:
        # Protocol 5 hands large buffers (numpy data, PickleBuffer) out of band: they travel
        # as separate bin values, or through the shared-memory pool where the link has one,
        # instead of being copied into the pickle stream.
        buffers: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception as exc:
            raise EncodeError(f"cannot pickle {type(obj).__qualname__}: {exc}") from exc
        self._pickled = True
        if not buffers:
            return msgpack.ExtType(EXT_PICKLE, data)
        parts: list[Any] = []
        for buffer in buffers:
            raw = buffer.raw()  # contiguous bytes view (pickle only hands out such buffers)
            ref = None
            if self.shm_encoder is not None:
                import numpy as np  # a link with a shm encoder has it imported already

                ref = self.shm_encoder(np.frombuffer(raw, dtype=np.uint8))
            parts.append(ref if ref is not None else raw)
        return msgpack.ExtType(EXT_PICKLE_OOB, self._pack_inner([data, parts]))

    def _pack_inner(self, value: Any) -> bytes:
        return msgpack.packb(value, default=self._default, use_bin_type=True, datetime=False)

    def refusal(self, record: Any) -> str | None:
        """Why ``record`` cannot be encoded (as ``encode_batch`` would say), or None.

        For records of unusual types at ``put``: encoding one costs what its batch would pay.
        Nothing is placed in shared memory: the value built here is thrown away, and a slot
        it took would never be sent nor given back.
        """
        encoder, self.shm_encoder = self.shm_encoder, None
        try:
            self._pack_inner(record)
        except Exception as exc:
            return str(exc) if isinstance(exc, EncodeError) else _describe(record, exc)
        finally:
            self.shm_encoder = encoder
        return None

    def inline_array(self, arr: np.ndarray) -> msgpack.ExtType:
        """``arr`` as an ext 2 value carried in the frame itself (a copy of its data)."""
        return msgpack.ExtType(EXT_NDARRAY, self._pack_ndarray(arr))

    def _pack_ndarray(self, arr: np.ndarray) -> bytes:
        if arr.dtype.hasobject:
            raise EncodeError(
                "cannot encode a numpy array of dtype object: it holds Python objects; "
                "use a numeric dtype or enable pickle (security.allow_pickle)"
            )
        import numpy as np  # imported already: arr is an array

        dtype = dtype_to_wire(arr.dtype)
        data = np.ascontiguousarray(arr)
        raw: Any = b""
        if data.size:
            try:
                raw = memoryview(cast(Any, data)).cast("B")
            except ValueError:
                # The buffer protocol refuses datetime64/timedelta64 (alone or as struct
                # fields). Their items are int64 counts of the unit, so the same bytes go
                # through an integer view while the wire dtype keeps the real type.
                flat = data.reshape(-1)
                view = flat.view(np.int64) if arr.dtype.kind in "mM" else flat.view(np.uint8)
                raw = memoryview(cast(Any, view)).cast("B")
        return msgpack.packb([dtype, list(arr.shape), raw], use_bin_type=True)

    def encode_batch(
        self, producer: str, seq: int, records: list[Any], *, compress: bool | str = False
    ) -> tuple[bytes, list[Any], list[str]]:
        """Encode a DATA frame. Returns ``(frame, sent_records, errors)``.

        A record that cannot be encoded is left out (and named in ``errors``); the others are
        still encoded, so one bad record does not cost its batch.
        """
        self._pickled = False
        sent: list[Any] = records
        errors: list[str] = []
        body = self._fast_pack([producer, seq, records])
        if body is None:
            try:
                body = self._packer.pack([producer, seq, records])
            except Exception:
                self._packer.reset()
                body, sent, errors = self._encode_salvaging(producer, seq, records)
        limit = self.limits.max_frame_bytes
        oversize = len(body) + HEADER_SIZE > limit
        if oversize and len(sent) == 1:
            # The receiver would refuse it (and the seqs after it would wait on a gap); a
            # batch of several is split by the link first, so this is one record too big.
            errors.append(
                f"a {type(sent[0]).__name__} record encodes to {len(body) + HEADER_SIZE} bytes, "
                f"more than max_message_size ({limit}); raise performance.max_message_size "
                "(at both ends) or send it in smaller parts"
            )
            return b"", [], errors
        flags = 0
        # A batch over the limit goes uncompressed: the link sees its real size and splits it.
        # Compressed, it would pass as a small frame, and the receiver, which bounds the
        # inflated body by the same limit, would refuse the whole batch.
        if compress and not oversize and len(body) >= self.compression_min_bytes:
            auto = compress == COMPRESS_AUTO
            if not auto or self.lz4_policy.want():
                packed = lz4.frame.compress(body)
                if auto:
                    self.lz4_policy.observe(len(body), len(packed))
                if len(packed) < len(body):
                    body, flags = packed, FLAG_LZ4
        if self._pickled:
            # Only a frame that holds pickle says so: records that need none still reach a
            # consumer that has pickle off (its refusal of the others shows in close()).
            flags |= FLAG_PICKLE
        return header(Kind.DATA, flags) + body, sent, errors

    def _fast_pack(self, value: Any) -> bytes | None:
        """``value`` packed by the fast path, or None: msgpack-python packs it."""
        if not (self.fast and _fast.stack_ok()):
            return None
        if self._slow_encodes:
            self._slow_encodes -= 1
            return None
        try:
            return _fast.pack(value, self._fast_default)
        except Exception:
            self._slow_encodes = _fast.PAUSE
            return None

    def _encode_salvaging(
        self, producer: str, seq: int, records: list[Any]
    ) -> tuple[bytes, list[Any], list[str]]:
        parts: list[bytes] = []
        sent: list[Any] = []
        errors: list[str] = []
        pickled = False  # only records that stay in the frame count (the failed pass may
        for record in records:  # have pickled part of one left out)
            self._pickled = False
            try:
                parts.append(self._pack_inner(record))
                sent.append(record)
                pickled = pickled or self._pickled
            except Exception as exc:
                errors.append(str(exc) if isinstance(exc, EncodeError) else _describe(record, exc))
        self._pickled = pickled
        head = msgpack.Packer(use_bin_type=True)
        body = (
            head.pack_array_header(3)
            + head.pack(producer)
            + head.pack(seq)
            + head.pack_array_header(len(parts))
            + b"".join(parts)
        )
        return body, sent, errors

    def encode_control(self, kind: Kind, body: Any) -> bytes:
        """Encode a control frame (anything but DATA)."""
        return header(kind) + msgpack.packb(body, use_bin_type=True)

    # ------------------------------------------------------------------ decode
    def decode(self, frame: bytes | memoryview) -> Message:
        """Decode and validate one frame; raises :class:`DecodeError` on anything off-spec.

        ``fields`` per kind: DATA ``(producer, seq, records)``; END/CLOSE ``(producer, seq)``;
        HEARTBEAT ``(producer,)``; HELLO/CREDIT/ERROR a dict; RELEASE ``(producer, [slot ids])``.
        """
        nbytes = len(frame)
        if nbytes > self.limits.max_frame_bytes:
            raise DecodeError(f"frame of {nbytes} bytes exceeds the limit")
        kind, flags = parse_header(frame)
        body: Any = memoryview(frame)[HEADER_SIZE:]
        if flags & FLAG_LZ4:
            body = self._decompress(body)
        if flags & FLAG_PICKLE and not self.allow_pickle:
            raise DecodeError("frame is marked as carrying pickle, but pickle is not enabled")
        ends = self.end_records
        value = self._unpack_body(body, kind)
        fields = _VALIDATORS[kind](value, self.limits)
        if kind is Kind.DATA and self.end_records != ends:
            _refuse_end_records(fields[2])
        return Message(kind, fields, nbytes)

    def decode_plain_data(self, frame: bytes) -> tuple[str, int, list[Any]]:
        """``(producer, seq, records)`` of a DATA frame without flags (``frame[:8]`` is
        :data:`PLAIN_DATA_HEADER`): the idle path's frame, decoded without ``Message``."""
        nbytes = len(frame)
        if nbytes > self.limits.max_frame_bytes:
            raise DecodeError(f"frame of {nbytes} bytes exceeds the limit")
        # A small body is cheaper to copy than to wrap in a memoryview; a large one is not.
        body = frame[HEADER_SIZE:] if nbytes <= 65536 else memoryview(frame)[HEADER_SIZE:]
        ends = self.end_records
        fields = _check_data(self._unpack_body(body, Kind.DATA), self.limits)
        if self.end_records != ends:  # the ext hook counts them: no scan of every batch
            _refuse_end_records(fields[2])
        return fields

    def _unpack_body(self, body: bytes | memoryview, kind: Kind) -> Any:
        if self.shm_decoder is not None:
            self._shm_views = {}  # a second pass must reuse the first one's views (see below)
        try:
            value = self._fast_unpack(body)
            if value is not _DECLINED:
                return value
            for pairs_hook in (None, _tuple_keys):
                self._pairs_hook = pairs_hook
                try:
                    return msgpack.unpackb(
                        body,
                        ext_hook=self._ext_hook,
                        raw=False,
                        strict_map_key=False,
                        use_list=True,
                        object_pairs_hook=pairs_hook,
                    )
                except DecodeError:
                    raise
                except Exception as exc:
                    # A map with array keys (a Python dict with tuple keys): msgpack builds
                    # the keys as lists, which no dict takes. Decoded again with them as
                    # tuples, the slow way, but only for such frames.
                    unhashable = isinstance(exc, TypeError) and "unhashable" in str(exc)
                    if pairs_hook is None and unhashable:
                        continue
                    raise DecodeError(f"malformed {kind.name} body: {_reason(exc)}") from None
            raise AssertionError("unreachable: the second pass returns or raises")
        finally:
            self._pairs_hook = None
            self._shm_views = None

    def _decompress(self, body: memoryview) -> bytes:
        limit = self.limits.max_decompressed_bytes
        try:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out = decompressor.decompress(bytes(body), max_length=limit)
        except Exception as exc:
            raise DecodeError(f"bad lz4 body: {exc}") from None
        if not decompressor.eof:
            raise DecodeError(f"lz4 body is truncated or inflates beyond {limit} bytes")
        if decompressor.unused_data:
            raise DecodeError("bytes after the lz4 frame: the body must be exactly one frame")
        return out

    def _fast_unpack(self, body: bytes | memoryview) -> Any:
        """``body`` decoded by the fast path, or ``_DECLINED``: msgpack-python decodes it
        (the same value, or its exact error)."""
        if not (self.fast and len(body) <= _fast.MAX_BODY and _fast.stack_ok()):
            return _DECLINED
        if self._slow_decodes:
            self._slow_decodes -= 1
            return _DECLINED
        self._fast_decoding = True
        try:
            return _fast.unpack(body, self._fast_ext_hook)
        except Exception:
            self._slow_decodes = _fast.PAUSE
            return _DECLINED
        finally:
            self._fast_decoding = False

    def _fast_ext_hook(self, code: int, data: bytes) -> Any:
        if code in (EXT_PICKLE, EXT_PICKLE_OOB):
            # Unpickling may have effects: it runs once, in the msgpack-python pass.
            raise _fast.Declined("pickle")
        return self._ext_hook(code, data)

    def _ext_hook(self, code: int, data: bytes) -> Any:
        try:
            if code == EXT_PACKET:
                fields = self._unpack_inner(data)
                if not isinstance(fields, list) or len(fields) != 6:
                    raise DecodeError("Packet extension must hold 6 fields")
                payload, index, key, strategy, headers, ts = fields
                if (
                    not isinstance(index, int)
                    or not isinstance(ts, int | float)
                    or isinstance(index, bool)
                    or isinstance(ts, bool)
                ):
                    raise DecodeError("Packet input_index/timestamp have wrong types")
                if strategy is not None and not isinstance(strategy, str):
                    raise DecodeError("Packet partition_strategy must be a string or nil")
                if headers is not None and not isinstance(headers, dict):
                    raise DecodeError("Packet headers must be a map or nil")
                if headers is not None and _tracing.HOPS in headers:
                    _tracing.on_decode(headers, self.trace_queue)
                return Packet(payload, index, key, strategy, headers, float(ts))
            if code == EXT_NDARRAY:
                return self._decode_ndarray(data)
            if code == EXT_END_OF_STREAM:
                fields = self._unpack_inner(data)
                if (
                    fields.__class__ is not list
                    or len(fields) != 1
                    or not (fields[0] is None or fields[0].__class__ is str)
                ):
                    raise DecodeError("EndOfStream extension must hold [source: str or nil]")
                self.end_records += 1  # DATA refuses a top-level one (PROTOCOL §9)
                return EndOfStream(fields[0])
            if code == EXT_SHM_REF and self.shm_decoder is not None:
                views = self._shm_views
                if views is None:
                    return self.shm_decoder(data)
                # One view per slot for the whole frame: a second decoding pass (msgpack-python
                # after the fast path, tuple keys) gets the first pass's view, or its error, so
                # the slot is leased, and released, once.
                view = views.get(data)
                if view is None:
                    try:
                        view = self.shm_decoder(data)
                    except Exception as exc:
                        view = exc
                    views[data] = view
                if isinstance(view, Exception):
                    raise view
                return view
            if code == EXT_PICKLE and self.allow_pickle:
                return self._counted(pickle.loads(data))
            if code == EXT_PICKLE_OOB and self.allow_pickle:
                fields = self._unpack_inner(data)
                if (
                    not isinstance(fields, list)
                    or len(fields) != 2
                    or not isinstance(fields[0], bytes)
                    or not isinstance(fields[1], list)
                ):
                    raise DecodeError("pickle-5 extension must hold [pickle, [buffers]]")
                return self._counted(pickle.loads(fields[0], buffers=fields[1]))
        except DecodeError:
            raise
        except Exception as exc:
            if isinstance(exc, TypeError) and self._pairs_hook is None and "unhashable" in str(exc):
                raise  # array map keys inside: _unpack_body decodes the frame again
            raise DecodeError(f"bad extension value (type {code}): {_reason(exc)}") from None
        raise DecodeError(f"unknown or disabled msgpack extension type {code}")

    def _unpack_inner(self, data: bytes) -> Any:
        # Extension values nest by re-entering the C unpacker; bound the depth ourselves so a
        # hostile frame cannot exhaust the C stack (msgpack's own bound is per unpacker).
        depth = self._ext_depth
        if depth >= MAX_EXT_DEPTH:
            raise DecodeError(f"extension values nested deeper than {MAX_EXT_DEPTH}")
        self._ext_depth = depth + 1
        try:
            if self._fast_decoding:
                return _fast.unpack(data, self._fast_ext_hook)
            return msgpack.unpackb(
                data,
                ext_hook=self._ext_hook,
                raw=False,
                strict_map_key=False,
                object_pairs_hook=self._pairs_hook,
            )
        finally:
            self._ext_depth = depth

    def _counted(self, value: Any) -> Any:
        """An unpickled value; an EndOfStream counts as one decoded (a DATA frame must not
        carry one at the top level, pickled or not)."""
        if isinstance(value, EndOfStream):
            self.end_records += 1
        return value

    def _decode_ndarray(self, data: bytes) -> np.ndarray:
        import numpy as np  # the first array received imports it

        fields = msgpack.unpackb(data, raw=False)
        if not isinstance(fields, list) or len(fields) != 3:
            raise DecodeError("ndarray extension must hold [dtype, shape, data]")
        dtype_spec, shape, raw = fields
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise DecodeError("ndarray shape must be a list of non-negative ints")
        if not isinstance(raw, bytes):
            raise DecodeError("ndarray data must be bin")
        dtype = dtype_from_wire(dtype_spec)
        count = 1
        for n in shape:
            count *= n
        if count * dtype.itemsize != len(raw):
            raise DecodeError(
                f"ndarray data is {len(raw)} bytes; shape {shape} of {dtype} needs "
                f"{count * dtype.itemsize}"
            )
        if raw:
            arr = np.frombuffer(raw, dtype=dtype)
        else:
            arr = np.empty(0, dtype=dtype)
            arr.flags.writeable = False  # like every other view of a frame (README)
        arr = arr.reshape(shape)
        return arr if self.zero_copy else arr.copy()


def _reason(exc: BaseException) -> str:
    """``str(exc)`` for an error message, never empty: msgpack's depth error has no text, and
    a peer told just "malformed DATA body: " cannot tell what to fix."""
    text = str(exc)
    if text:
        return text
    name = type(exc).__name__
    if isinstance(exc, msgpack.StackError | RecursionError):
        return f"{name}: nested deeper than the decoder allows"
    return name


def _describe(record: Any, exc: Exception) -> str:
    return (
        f"cannot encode a record of type {type(record).__module__}.{type(record).__qualname__}: "
        f"{exc}"
    )


# -------------------------------------------------------------------- validation
def _producer_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PRODUCER_ID:
        raise DecodeError("producer id must be a string of 1-128 characters")
    return value


_SEQ_END = 2**63


def _seq(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _SEQ_END:
        raise DecodeError("sequence numbers must be integers in [0, 2^63)")
    return value


def _check_data(value: Any, limits: DecodeLimits) -> tuple[str, int, list[Any]]:
    if value.__class__ is not list or len(value) != 3:
        raise DecodeError("DATA body must be [producer, seq, records]")
    producer, seq, records = value
    if records.__class__ is not list:
        raise DecodeError("DATA records must be an array")
    if len(records) > limits.max_records:
        raise DecodeError(f"DATA batch of {len(records)} records exceeds the limit")
    # The checks of _producer_id and _seq, inline: this runs once per frame on the idle path.
    # (msgpack gives exact str/int/list; the class test also keeps bool out of seq.)
    if producer.__class__ is not str or not 0 < len(producer) <= MAX_PRODUCER_ID:
        _producer_id(producer)
    # The seq after the batch must be a seq too: a CREDIT reports it as ``received``.
    if seq.__class__ is not int or not 0 <= seq < _SEQ_END - len(records):
        _seq(seq)
        raise DecodeError("DATA seq + record count must stay below 2^63")
    return producer, seq, records


def _tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map whose keys may be arrays, as a dict with those keys as tuples (as put)."""
    return {(_as_key(k) if k.__class__ is list else k): v for k, v in pairs}


def _as_key(value: Any) -> Any:
    return tuple(_as_key(v) for v in value) if value.__class__ is list else value


def _refuse_end_records(records: list[Any]) -> None:
    # A top-level EndOfStream would come out of get() like the real end of the stream.
    if any(record.__class__ is EndOfStream for record in records):
        raise DecodeError(
            "a DATA record is an EndOfStream: an upstream ends with an END frame, not a "
            "record (PROTOCOL.md section 9); nest it in a container to send it as data"
        )


def _check_seq_msg(value: Any, limits: DecodeLimits) -> tuple[str, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise DecodeError("END/CLOSE body must be [producer, seq]")
    return _producer_id(value[0]), _seq(value[1])


def _check_end(value: Any, limits: DecodeLimits) -> tuple[str, int]:
    producer, seq = _check_seq_msg(value, limits)
    if seq == _SEQ_END - 1:
        raise DecodeError("END seq + 1 must stay below 2^63")
    return producer, seq


def _check_heartbeat(value: Any, limits: DecodeLimits) -> tuple[str]:
    if not isinstance(value, list) or len(value) != 1:
        raise DecodeError("HEARTBEAT body must be [producer]")
    return (_producer_id(value[0]),)


_MAP_SCHEMAS: dict[Kind, dict[str, type | tuple[type, ...]]] = {
    Kind.HELLO: {
        "producer": str,
        "epoch": int,
        "queue": str,
        "next_seq": int,
        "acked": int,
        "window": int,
    },
    Kind.CREDIT: {
        "session": str,
        "received": int,
        "acked": int,
        "limit": int,
        "base": int,
        "pid": int,
        "lost": int,
        "release_ring": str,
    },
    Kind.ERROR: {"code": str, "message": str},
}
_REQUIRED: dict[Kind, tuple[str, ...]] = {
    Kind.HELLO: ("producer", "epoch", "next_seq"),
    Kind.CREDIT: ("session", "received", "acked", "limit"),
    Kind.ERROR: ("code", "message"),
}


def _map_checker(kind: Kind) -> Callable[[Any, DecodeLimits], dict[str, Any]]:
    schema = _MAP_SCHEMAS[kind]
    required = _REQUIRED[kind]

    def check(value: Any, limits: DecodeLimits) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise DecodeError(f"{kind.name} body must be a map")
        for key in required:
            if key not in value:
                raise DecodeError(f"{kind.name} lacks {key!r}")
        out: dict[str, Any] = {}
        for key, item in value.items():
            expected = schema.get(key) if isinstance(key, str) else None
            if expected is None:
                continue  # unknown keys are ignored: room for later minor additions
            if not isinstance(item, expected) or isinstance(item, bool):
                raise DecodeError(f"{kind.name} field {key!r} has the wrong type")
            if expected is int:
                _seq(item)
            out[key] = item
        if "producer" in out:
            _producer_id(out["producer"])
        if kind is Kind.CREDIT and not out["acked"] <= out["received"]:
            raise DecodeError("CREDIT acked must not exceed received")
        return out

    return check


def _check_release(value: Any, limits: DecodeLimits) -> tuple[str, list[int]]:
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], list):
        raise DecodeError("RELEASE body must be [producer, [slot ids]]")
    return _producer_id(value[0]), [_seq(s) for s in value[1]]


_VALIDATORS: dict[Kind, Callable[[Any, DecodeLimits], Any]] = {
    Kind.DATA: _check_data,
    Kind.END: _check_end,
    Kind.CLOSE: _check_seq_msg,
    Kind.HEARTBEAT: _check_heartbeat,
    Kind.HELLO: _map_checker(Kind.HELLO),
    Kind.CREDIT: _map_checker(Kind.CREDIT),
    Kind.ERROR: _map_checker(Kind.ERROR),
    Kind.RELEASE: _check_release,
}
