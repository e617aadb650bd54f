"""JSON forms of summary tables and of the round-2 messages, and the formats of the files that carry them.

Pure encoding, no file I/O: `hccfed site-summary` writes what these return
and `hccfed pool-summaries` reads it back (and the other way round for the
round-2 request). Floats go through Python's ``json`` (shortest repr), so
values round-trip exactly: a pooled table holds the very floats each site read.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["SITE_FORMAT", "ROUND2_FORMAT", "encode_arrays", "decode_arrays", "encode_request", "decode_request",
           "encode_placement_sums"]

#: A site summary (`site-summary`): exact tables, or noisy ones under differential privacy.
SITE_FORMAT = "hccfed-site-summary/2"
#: What `pool-summaries` writes for one site for round 2 of the paired DeLong tests.
ROUND2_FORMAT = "hccfed-round2-request/1"
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
    if not isinstance(encoded, dict):
        raise ValueError(f"{where}: the tables must be a JSON object of arrays")
    out = {}
    for name, d in encoded.items():
        try:
            dtype = _DTYPES[d["dtype"]]
            shape = tuple(int(x) for x in d["shape"])
            index = np.asarray(d["index"], dtype=np.int64)
            value = np.asarray(d["value"], dtype=float)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: array '{name}' is malformed ({err})") from None
        if dtype is np.int64 and (value != np.round(value)).any():
            raise ValueError(f"{where}: array '{name}' is declared int64 but holds non-integer values")
        size = int(np.prod(shape))
        if index.shape != value.shape or index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= size)):
            raise ValueError(f"{where}: array '{name}' has inconsistent indices for shape {shape}")
        flat = np.zeros(size, dtype=dtype)
        flat[index] = value.astype(dtype)
        out[name] = flat.reshape(shape)
    return out


def encode_request(request: dict) -> dict:
    """The JSON document of a round-2 request (:func:`common.metrics.federated_delong.placement_request`)."""
    return {"format": ROUND2_FORMAT, "site_id": request["site_id"], "fingerprint": request["fingerprint"],
            "models": {m: {k: np.asarray(v, dtype=float).tolist() for k, v in t.items()}
                       for m, t in request["models"].items()}}


def decode_request(doc: dict, where: str) -> dict:
    """Inverse of :func:`encode_request`; ValueError naming ``where`` and the field when malformed."""
    if not isinstance(doc, dict) or doc.get("format") != ROUND2_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{where}: not a round-2 request of pool-summaries (format {found!r}, expected "
                         f"{ROUND2_FORMAT!r}); give the file pool-summaries wrote for this site under round2/")
    try:
        models = {}
        for m, t in doc["models"].items():
            table = {k: np.asarray(t[k], dtype=float) for k in ("value", "v10", "v01")}
            if len({a.shape for a in table.values()}) != 1 or table["value"].ndim != 1 \
                    or not (np.diff(table["value"]) > 0).all():
                raise ValueError(f"model '{m}': 'value', 'v10', 'v01' must be 1-D of one length, values ascending")
            models[m] = table
        return {"site_id": str(doc["site_id"]), "fingerprint": str(doc["fingerprint"]), "models": models}
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{where}: malformed round-2 request (missing or bad entry {err})") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def encode_placement_sums(sums: dict) -> dict:
    """Plain lists and numbers of a site's round-2 answer, for its JSON summary."""
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in sums.items()}
