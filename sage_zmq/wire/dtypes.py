"""NumPy dtypes as the wire carries them (extension types 2 and 4, PROTOCOL.md §7).

A plain dtype travels as ``dtype.str``; a structured one as NumPy's ``descr`` list, in which
entries named ``""`` are padding (what ``align=True`` and explicit offsets leave between and
after fields). ``np.dtype(descr)`` would turn that padding into real fields named ``f1``, ...,
so the receiver rebuilds the layout from offsets instead and the padding stays padding.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import TYPE_CHECKING, Any

from sage_zmq.errors import DecodeError, InvalidArgument, InvalidArgumentType

if TYPE_CHECKING:
    import numpy as np

__all__ = ["alloc_layout", "dtype_from_wire", "dtype_to_wire"]

# A nested structured type is a descr list inside a descr list; real ones nest a few levels.
_MAX_DEPTH = 32


def dtype_to_wire(dt: np.dtype[Any]) -> Any:
    """``dtype.str``, or the ``descr`` list for a structured type."""
    return dt.str if dt.fields is None else dt.descr


def dtype_from_wire(spec: Any, what: str = "ndarray") -> np.dtype[Any]:
    """The dtype ``spec`` names, or a :class:`DecodeError` saying why it cannot be one.

    ``what`` names the carrier in the error (``"ndarray"``, ``"shm ref"``). Object dtypes are
    refused: nothing decoded from the network may build Python objects from raw bytes.
    """
    import numpy as np  # only processes that receive arrays pay for it

    if not isinstance(spec, str | list):
        raise DecodeError(f"{what} dtype must be a string or a field list, got {spec!r:.100}")
    try:
        dt = np.dtype(spec) if isinstance(spec, str) else _structured(spec, 0)
    except (TypeError, ValueError, KeyError) as exc:
        raise DecodeError(f"{what} carries an invalid dtype {spec!r:.100}: {exc}") from None
    if dt.hasobject:
        raise DecodeError(f"{what} dtype {dt} holds Python objects, which are never sent")
    return dt


def _structured(descr: list[Any], depth: int) -> np.dtype[Any]:
    import numpy as np

    if depth > _MAX_DEPTH:
        raise ValueError(f"structured types nest deeper than {_MAX_DEPTH} levels")
    names: list[str] = []
    titles: list[str | None] = []
    formats: list[np.dtype[Any]] = []
    offsets: list[int] = []
    position = 0
    for entry in descr:
        # msgpack gives lists where numpy's descr has tuples: [name, type(, shape)].
        if not isinstance(entry, list | tuple) or len(entry) not in (2, 3):
            raise ValueError(f"a field must be [name, type] or [name, type, shape]: {entry!r:.100}")
        name, kind = entry[0], entry[1]
        field = _structured(kind, depth + 1) if isinstance(kind, list) else np.dtype(kind)
        if len(entry) == 3:
            shape = entry[2]
            field = np.dtype((field, tuple(shape) if isinstance(shape, list) else shape))
        if name == "":  # padding: it takes room, it is not a field
            position += field.itemsize
            continue
        title: str | None = None
        if isinstance(name, list | tuple) and len(name) == 2:  # (title, name)
            title, name = name
        if not isinstance(name, str) or not (title is None or isinstance(title, str)):
            raise ValueError(f"a field name must be a string or [title, name]: {entry[0]!r:.100}")
        names.append(name)
        titles.append(title)
        formats.append(field)
        offsets.append(position)
        position += field.itemsize
    layout: dict[str, Any] = {
        "names": names,
        "formats": formats,
        "offsets": offsets,
        "itemsize": position,
    }
    if any(t is not None for t in titles):
        layout["titles"] = titles
    return np.dtype(layout)  # type: ignore[call-overload]  # the stubs miss the dict form


def alloc_layout(shape: Any, dtype: Any) -> tuple[tuple[int, ...], Any]:
    """``alloc``'s ``shape`` as a tuple of ints >= 0 and its ``dtype``, or a clear error (the
    same on every queue type, whoever allocates)."""
    import numpy as np

    layout = _plain_shape(shape)
    if layout is None:
        layout = _checked_shape(shape)
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentType(f"alloc(dtype=...) is not a numpy dtype: {exc}") from None
    if dt.hasobject:
        raise InvalidArgument(
            f"alloc(dtype=...) cannot be {dt}: it holds Python objects, which are not bytes a "
            "buffer can carry; put such records as they are instead"
        )
    if dt.subdtype is not None:  # ("f8", (3,)): numpy appends the item's shape to the array's
        dt, item_shape = dt.subdtype
        layout += item_shape
    if math.prod(layout) * dt.itemsize > sys.maxsize:
        raise InvalidArgument(
            f"alloc of shape {layout} and dtype {dt} needs more bytes than this process can address"
        )
    return layout, dt


def _plain_shape(shape: Any) -> tuple[int, ...] | None:
    """``shape`` if it is an int or a tuple of ints >= 0, found by identity checks only (those
    against the numbers ABCs in _checked_shape cost more than the rest of an alloc's checks
    together); None for any other shape, a bad one included, which _checked_shape judges."""
    layout = (shape,) if shape.__class__ is int else shape
    if layout.__class__ is not tuple:
        return None
    for d in layout:
        if d.__class__ is not int or d < 0:
            return None
    return layout


def _checked_shape(shape: Any) -> tuple[int, ...]:
    """``alloc``'s ``shape`` as a tuple of ints >= 0, or the error saying what is wrong."""
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        dims = None
    if dims is None or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims
    ):
        raise InvalidArgumentType(
            f"alloc(shape=...) must be an int or a sequence of ints, got {shape!r}"
        )
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"alloc(shape=...) must not have negative dimensions, got {shape!r}")
    return tuple(int(d) for d in dims)
