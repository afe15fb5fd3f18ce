"""The one "read past the volume" (:func:`volref.io.region.read_padded`) against ``numpy.pad``."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from volref.io.region import read_padded, reflect

PAD = 40  # wider than any box below reaches past the array


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), i=st.integers(-30, 30))
def test_reflect_matches_numpy_symmetric_padding(n, i):
    padded = np.pad(np.arange(n), PAD, mode="symmetric")
    assert reflect(np.array([i]), n)[0] == padded[i + PAD]


@st.composite
def volumes_and_boxes(draw):
    shape = draw(st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9)))
    start = tuple(draw(st.integers(-12, n + 3)) for n in shape)
    stop = tuple(draw(st.integers(a, a + 14)) for a in start)
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).integers(1, 200, shape).astype(np.uint8), start, stop


def _expected(data, start, stop, mode, fill=0):
    kw = {"mode": "symmetric"} if mode == "mirror" else {"mode": "constant",
                                                         "constant_values": fill}
    padded = np.pad(data, [(0, 0)] * (data.ndim - 3) + [(PAD, PAD)] * 3, **kw)
    return padded[(Ellipsis,) + tuple(slice(a + PAD, b + PAD) for a, b in zip(start, stop))]


@settings(max_examples=80, deadline=None)
@given(case=volumes_and_boxes(), mode=st.sampled_from(["mirror", "constant"]))
def test_read_padded_equals_numpy_pad(case, mode):
    data, start, stop = case
    got = read_padded(data, start, stop, mode, fill=7)
    assert got.dtype == data.dtype
    np.testing.assert_array_equal(got, _expected(data, start, stop, mode, fill=7))


def test_read_padded_on_zarr_with_leading_axes(tmp_path):
    data = np.random.default_rng(0).integers(0, 9, (2, 3, 4, 5, 6)).astype(np.uint16)
    arr = zarr.create_array(tmp_path / "a.zarr", data=data, chunks=(1, 1, 2, 2, 4))
    box = ((-2, 3, -4), (3, 9, 8))
    for mode in ("mirror", "constant"):
        np.testing.assert_array_equal(read_padded(arr, *box, mode, lead=(1, 2)),
                                      _expected(data[1, 2], *box, mode))
        np.testing.assert_array_equal(read_padded(data, *box, mode, lead=(slice(None), 0)),
                                      _expected(data[:, 0], *box, mode))


def test_read_padded_refuses_unknown_modes_and_shapes():
    with pytest.raises(ValueError, match="mode"):
        read_padded(np.zeros((2, 2)), (0, 0), (1, 1), "zero")
    with pytest.raises(ValueError, match="do not fit"):
        read_padded(np.zeros((2, 2)), (0,), (1,))
