"""Arrow columns built straight from their buffers, for the store's bulk writes.

``pyarrow.array()`` imports pandas on its first call, to check whether its
input is a pandas object, and importing pandas takes about a quarter of a
second: as long as the rest of a warm-cache run.  The store never passes
pandas objects, so it builds its columns here from numpy buffers, which
gives the same Arrow arrays without that import.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


#: Maximum total size in bytes of a string column with the 32-bit offsets of ``pa.string()``.
MAX_STRING_BYTES = 2**31 - 1


def _bitmap(valid: np.ndarray | None) -> pa.Buffer | None:
    """Return Arrow's validity bitmap for the boolean mask ``valid`` (None when every value is valid)."""
    if valid is None or bool(valid.all()):
        return None
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def numbers(values: np.ndarray | Iterable[Any], dtype: Any, *, nan_to_null: bool = False) -> pa.Array:
    """Return a numeric Arrow column of numpy type ``dtype``.

    ``values`` is a 1-D numpy array, or an iterable of numbers in which None
    becomes NULL.  With ``nan_to_null``, NaN becomes NULL as well.

    :raises ValueError: when the values are not 1-D or do not convert to ``dtype``.
    """
    valid = None
    try:
        if isinstance(values, np.ndarray):
            array = np.ascontiguousarray(values, dtype=dtype)
        else:
            items = list(values)
            valid = np.fromiter((item is not None for item in items), dtype=bool, count=len(items))
            array = np.array([0 if item is None else item for item in items], dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot convert the values to {np.dtype(dtype).name}: {exc}") from exc
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D column of {np.dtype(dtype).name}, got shape {array.shape}")
    if nan_to_null and array.dtype.kind == "f":
        not_nan = ~np.isnan(array)
        valid = not_nan if valid is None else valid & not_nan
    return pa.Array.from_buffers(pa.from_numpy_dtype(array.dtype), len(array), [_bitmap(valid), pa.py_buffer(array)])


def strings(values: Iterable[str | None]) -> pa.Array:
    """Return a UTF-8 string column; None becomes NULL.

    :raises TypeError: when a value is neither text nor None.
    """
    encoded = []
    valid = []
    for value in values:
        if value is None:
            encoded.append(b"")
            valid.append(False)
        elif isinstance(value, str):
            encoded.append(value.encode("utf-8"))
            valid.append(True)
        else:
            raise TypeError(f"expected text or None in a text column, got {type(value).__name__} {value!r}")
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(item) for item in encoded], out=offsets[1:])
    kind, offset_type = pa.string(), np.int32
    if offsets[-1] > MAX_STRING_BYTES:
        kind, offset_type = pa.large_string(), np.int64
    return pa.Array.from_buffers(
        kind,
        len(encoded),
        [
            _bitmap(np.array(valid, dtype=bool)),
            pa.py_buffer(offsets.astype(offset_type)),
            pa.py_buffer(b"".join(encoded)),
        ],
    )


def lists(values: Iterable[Sequence[Any]], child: Callable[[list[Any]], pa.Array]) -> pa.Array:
    """Return a list column whose items ``child`` builds from all the lists' items, in order.

    :raises TypeError: when a value is not a list (None included).
    """
    flat: list[Any] = []
    offsets = [0]
    for value in values:
        if value is None or isinstance(value, (str, bytes)):
            raise TypeError(f"expected a list in a list column, got {type(value).__name__} {value!r}")
        flat.extend(value)
        offsets.append(len(flat))
    return pa.ListArray.from_arrays(numbers(np.array(offsets, dtype=np.int32), np.int32), child(flat))


def table(columns: dict[str, pa.Array]) -> pa.Table:
    """Return an Arrow table of equally long columns, in the given order."""
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))
