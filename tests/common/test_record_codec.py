"""The record codec carries every field of a statistics request / reply, or names the one it cannot."""

import numpy as np
import pytest

from hccfed.common.record_codec import flatten, unflatten


def _assert_same(a, b, path="") -> None:
    assert type(a) is type(b) or (isinstance(a, tuple) and isinstance(b, list)), (path, type(a), type(b))
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b)
    else:
        assert list(a) == b if isinstance(a, tuple) else a == b, path


def test_round_trip_keeps_nested_dicts_none_arrays_and_lists():
    request = {
        "op": "combat_apply", "fold": None, "labelled": True, "columns": [3, 1, 4], "names": ("a", "b"),
        "lam": 0.25, "n_folds": 5, "empty": {}, "shift": None, "edges": np.linspace(-1, 1, 5),
        "count": np.array(7.0), "beta": np.zeros((0, 3)), "mask": np.array([True, False]),
        "fit": {"grand": np.arange(3.0), "beta": np.ones((2, 3), dtype=np.float32), "note": None},
        "site_params": {"hospital_a": {"gamma": np.ones(3), "delta": np.full(3, 2.0)}, "hospital_b": {}},
        "mixed": [1, 2.5], "np_scalar": np.float64(1.5), "np_int": np.int64(3),
    }
    arrays, config = flatten(request)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    assert not any(isinstance(v, (np.ndarray, dict)) or v is None for v in config.values())
    back = unflatten(arrays, config)
    assert back["mixed"] == [1.0, 2.5] and back["np_scalar"] == 1.5 and type(back["np_int"]) is int
    for key in ("mixed", "np_scalar", "np_int"):
        request.pop(key), back.pop(key)
    _assert_same(request, back)


def test_reply_of_moments_by_label_survives():
    reply = {"pos": {"n": np.array(4.0), "sum": np.ones(2)}, "neg": {"n": np.array(6.0), "sum": np.zeros(2)},
             "site_id": "hospital_c"}
    _assert_same(reply, unflatten(*flatten(reply)))


@pytest.mark.parametrize("bad, field", [({"x": {"y": object()}}, "'x/y'"), ({"x": [1, "a"]}, "'x'"),
                                        ({"x": [None]}, r"'x\[0\]'"), ({"a/b": 1}, "'a/b'"),
                                        ({"x": np.array([None])}, "'x'")])
def test_unsupported_field_is_named(bad, field):
    with pytest.raises((TypeError, ValueError), match=field):
        flatten(bad)
