"""JSON form of summary arrays: sparse (shape, dtype, flat indices and values of non-zero cells).

Pure encoding, no file I/O: the site writes what :func:`encode_arrays`
returns and the server reads it back with :func:`decode_arrays`. Floats go
through Python's ``json`` (shortest repr), so values round-trip exactly.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["encode_arrays", "decode_arrays"]

_DTYPES = {"int64": np.int64, "float64": np.float64}


def encode_arrays(arrays: dict[str, NDArray]) -> dict[str, dict]:
    """{name: {"shape", "dtype" ("int64" or "float64"), "index", "value"}} of the non-zero cells."""
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        kind = "int64" if np.issubdtype(a.dtype, np.integer) else "float64"
        flat = a.astype(_DTYPES[kind]).ravel()
        nz = np.flatnonzero(flat)
        out[name] = {"shape": list(a.shape), "dtype": kind, "index": nz.tolist(), "value": flat[nz].tolist()}
    return out


def decode_arrays(encoded: dict[str, dict], where: str = "summary") -> dict[str, NDArray]:
    """Inverse of :func:`encode_arrays`; ValueError naming ``where`` and the array when malformed."""
    out = {}
    for name, d in encoded.items():
        try:
            dtype = _DTYPES[d["dtype"]]
            shape = tuple(int(x) for x in d["shape"])
            index = np.asarray(d["index"], dtype=np.int64)
            value = np.asarray(d["value"], dtype=dtype)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: array '{name}' is malformed ({err})") from None
        size = int(np.prod(shape))
        if index.shape != value.shape or index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= size)):
            raise ValueError(f"{where}: array '{name}' has inconsistent indices for shape {shape}")
        flat = np.zeros(size, dtype=dtype)
        flat[index] = value
        out[name] = flat.reshape(shape)
    return out
