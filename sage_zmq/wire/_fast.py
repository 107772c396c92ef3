"""The fast msgpack path: ormsgpack where it gives what msgpack-python would, nothing else.

ormsgpack (Rust) packs a batch of small dict records about 2.5x and unpacks it about 1.8x
faster than msgpack-python (``tests/test_codec_fast.py`` says how to measure it). It differs
from msgpack-python at the edges, so :class:`~sage_zmq.wire.codec.Codec` uses it only where
the result is the same, and does a frame again with msgpack-python whenever it declines:

- packing: no option that changes the bytes; map keys must be str (ormsgpack would refuse
  others, or turn them into strings with ``OPT_NON_STR_KEYS`` set to allow them); subclasses
  (an ``OrderedDict`` packs in its own order), enums, datetimes, dataclasses, UUIDs and
  integers beyond 64 bits reach the codec's ``default`` hook, which passes on
  (:class:`Declined`) anything msgpack-python packs differently;
- unpacking: ormsgpack ignores bytes after the value, where the protocol refuses them, so the
  body is decoded as the first item of a pair whose second item is a private marker (an
  extension value holding a random nonce): anything after the value takes the marker's place.
  It refuses non-str map keys, which msgpack-python decodes; such frames go the slow way.

Equality is tested value by value and byte by byte in ``tests/test_codec_fast.py``. Where
threads may have small stacks (musl, or ``threading.stack_size`` set below 1 MiB), the fast
path is off: ormsgpack recurses in C, and a deeply nested frame would overflow such a stack.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
from collections.abc import Callable
from typing import Any

try:
    import ormsgpack
except ImportError:  # a platform without its wheel: msgpack-python does everything
    ormsgpack = None  # type: ignore[assignment]

MIN_STACK = 1 << 20
"""Thread stack the fast path needs: ormsgpack recurses in C, about 0.6 KiB a level, to
depths msgpack-python reaches without recursing (1022 levels take ~640 KiB; a 128 KiB thread
stack overflowed at 250, a crash a hostile frame could cause)."""

# Threads get 8 MiB stacks from glibc and 16 MiB (macOS), 4 MiB (FreeBSD) or the
# executable's 2 MiB (Windows) from CPython; musl gives 128 KiB.
_ROOMY_STACKS = not sys.platform.startswith("linux") or platform.libc_ver()[0] == "glibc"

AVAILABLE = ormsgpack is not None and _ROOMY_STACKS

MAX_BODY = 1 << 20
"""Larger bodies are decoded by msgpack-python: the marker costs a copy of the body, and
such a body's time goes into copying its bin values anyway."""

PAUSE = 64
"""Frames a codec leaves to msgpack-python after the fast path declined one: a stream of
records it cannot do (int map keys, say) pays for a failed attempt once in this many."""


class Declined(Exception):
    """A value the fast path leaves to msgpack-python."""


if ormsgpack is not None:
    _PACK_OPTIONS = (
        ormsgpack.OPT_PASSTHROUGH_BIG_INT
        | ormsgpack.OPT_PASSTHROUGH_SUBCLASS  # msgpack-python uses their methods (items()...)
        | ormsgpack.OPT_PASSTHROUGH_DATACLASS
        | ormsgpack.OPT_PASSTHROUGH_DATETIME
        | ormsgpack.OPT_PASSTHROUGH_ENUM
        | ormsgpack.OPT_PASSTHROUGH_UUID
    )
    Ext: Any = ormsgpack.Ext
else:  # pragma: no cover - ormsgpack is a dependency; kept for a platform without it
    _PACK_OPTIONS = 0
    Ext = None

_MARK_CODE = 85  # any code: the nonce, not the code, makes the marker ours
_NONCE = os.urandom(8)
_MARK = b"\xd7" + bytes([_MARK_CODE]) + _NONCE  # fixext 8
_MARKED = object()
_PAIR = b"\x92"


def stack_ok() -> bool:
    """Whether threads get stacks big enough for the fast path (see :data:`MIN_STACK`):
    ``threading.stack_size()`` is 0 (the platform's default) unless a program set it."""
    size = threading.stack_size()
    return size == 0 or size >= MIN_STACK


def pack(value: Any, default: Callable[[Any], Any]) -> bytes:
    """``value`` packed as msgpack-python (``use_bin_type=True``) would, or an exception."""
    return ormsgpack.packb(value, default=default, option=_PACK_OPTIONS)


def unpack(data: Any, ext_hook: Callable[[int, bytes], Any]) -> Any:
    """The one msgpack value ``data`` holds (as msgpack-python's ``unpackb`` with ``raw=False``
    and ``strict_map_key=False`` gives it), or an exception; ``ext_hook`` decodes extensions.

    The timestamp extension (-1), which msgpack-python decodes itself, reaches ``ext_hook``.
    """

    def hook(code: int, payload: bytes) -> Any:
        if code == _MARK_CODE and payload == _NONCE:
            return _MARKED
        return ext_hook(code, payload)

    value, mark = ormsgpack.unpackb(_PAIR + data + _MARK, ext_hook=hook)
    if mark is not _MARKED:
        raise Declined("bytes after the value")
    return value
