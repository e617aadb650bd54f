"""Nested request / reply dicts as two flat maps: arrays and plain config values.

A federated-statistics request or reply (see :mod:`client.stats_site`) is a
dict of numpy arrays, scalars, strings, lists of scalars, ``None`` and nested
dicts. Flower carries arrays in an ``ArrayRecord`` and scalars, strings and
lists of one scalar type in a ``ConfigRecord``, both flat. :func:`flatten`
splits a nested dict into ``(arrays, config)`` with keys that are the paths
joined by ``/``; :func:`unflatten` rebuilds it. ``None`` values and empty dicts
are listed under reserved config keys. Pure: no Flower import (each app wraps
the two maps in its records).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

SEP = "/"
NONE_KEY = "~none"  # paths whose value is None
EMPTY_KEY = "~empty"  # paths of empty dicts
_SCALARS = (bool, int, float, str, bytes)


def _scalar(value: Any, path: str) -> Any:
    """A config-ready scalar (numpy scalars become Python ones)."""
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, _SCALARS):
        raise TypeError(f"record codec: field {path!r} has unsupported type {type(value).__name__}")
    return value


def _list(values: list | tuple, path: str) -> list:
    items = [_scalar(v, f"{path}[{i}]") for i, v in enumerate(values)]
    kinds = {type(v) for v in items}
    if kinds <= {int, float} and float in kinds:  # a mix of ints and floats travels as floats
        return [float(v) for v in items]
    if len(kinds) > 1:
        raise TypeError(f"record codec: list field {path!r} mixes types {sorted(k.__name__ for k in kinds)}")
    return items


def flatten(obj: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, config)`` of a nested dict; raises naming the field it cannot carry."""
    arrays: dict[str, np.ndarray] = {}
    config: dict[str, Any] = {}
    nones: list[str] = []
    empties: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        if not node and prefix:
            empties.append(prefix[:-1])
        for key, value in node.items():
            if not isinstance(key, str) or SEP in key or key.startswith("~") or not key:
                raise ValueError(f"record codec: key {key!r} under {prefix[:-1] or 'the top level'!r} must be a "
                                 f"non-empty string without {SEP!r} and not starting with '~'")
            path = prefix + key
            if isinstance(value, Mapping):
                walk(value, path + SEP)
            elif value is None:
                nones.append(path)
            elif isinstance(value, np.ndarray):
                if value.dtype == object:
                    raise TypeError(f"record codec: array field {path!r} has dtype object")
                arrays[path] = value if value.flags.c_contiguous else value.copy(order="C")
            elif isinstance(value, (list, tuple)):
                config[path] = _list(value, path)
            else:
                config[path] = _scalar(value, path)

    walk(obj, "")
    if nones:
        config[NONE_KEY] = nones
    if empties:
        config[EMPTY_KEY] = empties
    return arrays, config


def unflatten(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict :func:`flatten` was given (tuples come back as lists)."""
    out: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        *parents, leaf = path.split(SEP)
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"record codec: field {path!r} lies under a value that is not a dict")
        if leaf in node:
            raise ValueError(f"record codec: field {path!r} given twice")
        node[leaf] = value

    for path, value in config.items():
        if path not in (NONE_KEY, EMPTY_KEY):
            put(path, list(value) if isinstance(value, list) else value)
    for path, value in arrays.items():
        put(path, np.asarray(value))
    for path in config.get(NONE_KEY, []):
        put(path, None)
    for path in config.get(EMPTY_KEY, []):
        put(path, {})
    return out
