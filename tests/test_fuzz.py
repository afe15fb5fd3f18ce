"""Property tests: random metadata never crashes the reader outside a clear error; the tile grids
cover every voxel exactly as specified; locations never leak credentials."""

from __future__ import annotations

import numpy as np
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.storage import MemoryStore

from volref.errors import VolrefError
from volref.io.image import select_volume
from volref.io.ngff import read_multiscale
from volref.io.store import redact
from volref.stages.refine import RefineSettings, tile_origins

names = st.sampled_from(["z", "y", "x", "c", "t", "q", "", "Z", 3, None])
types = st.sampled_from(["space", "channel", "time", None, "bogus", 7])
units = st.sampled_from(["micrometer", "nanometer", None, "parsec", ""])
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 5),
                    st.text(max_size=2))


@st.composite
def metadata(draw):
    ndim = draw(st.integers(1, 6))
    axes = [draw(st.one_of(
        st.fixed_dictionaries({"name": names, "type": types}, optional={"unit": units}),
        st.just("z"), st.just({}))) for _ in range(ndim)]
    n_levels = draw(st.integers(0, 3))
    datasets = []
    for k in range(n_levels):
        scale = draw(st.lists(numbers, min_size=0, max_size=ndim + 1))
        transforms = draw(st.one_of(
            st.just([{"type": "scale", "scale": scale}]),
            st.just([{"type": "translation", "translation": scale}]),
            st.just([]), st.just("scale"),
            st.just([{"type": "scale", "scale": scale},
                     {"type": "translation", "translation": scale}])))
        datasets.append(draw(st.one_of(
            st.just({"path": f"s{k}", "coordinateTransformations": transforms}),
            st.just({"coordinateTransformations": transforms}),
            st.just({"path": "../../etc", "coordinateTransformations": transforms}))))
    entry = {"axes": axes, "datasets": datasets}
    if draw(st.booleans()):
        entry["name"] = draw(st.text(max_size=5))
    shapes = [tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=6)))
              for _ in range(n_levels)]
    version = draw(st.sampled_from(["0.5", "0.4", "0.3", "1.0"]))
    return version, entry, shapes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metadata(), channel=st.one_of(st.none(), st.integers(-1, 3)))
def test_random_metadata_reads_or_raises_a_volref_error(meta, channel):
    version, entry, shapes = meta
    root = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    for k, shape in enumerate(shapes):
        root.create_array(f"s{k}", shape=shape, dtype="uint8", chunks=shape)
    root.attrs["ome"] = {"version": version, "multiscales": [entry]}
    try:
        ms = read_multiscale(root, where="fuzz")
        vol = select_volume(root, ms, "fuzz", channel=channel)
    except VolrefError:
        return
    assert len(vol.shape) == 3 and all(n >= 1 for n in vol.shape)
    assert all(np.isfinite(s) and s > 0 for s in vol.scale)


@settings(max_examples=80, deadline=None)
@given(tile=st.sampled_from([16, 32, 64, 128]), div=st.sampled_from([1, 2, 4]),
       start=st.integers(0, 20), length=st.integers(1, 300))
def test_refine_tiles_cover_every_pixel_tile_over_stride_squared_times(tile, div, start, length):
    stride = tile // div
    settings_ = RefineSettings(tile=tile, stride=stride, smooth=0)
    core = start * stride  # blocks start on the tile grid
    origins = list(tile_origins(core, length, settings_))
    cover = np.zeros(core + length + 2 * tile, dtype=np.int32)
    for o in origins:
        assert o % stride == 0
        cover[o + tile:o + 2 * tile] += 1  # shifted by one tile to keep indices positive
    inside = cover[core + tile:core + tile + length]
    assert (inside == tile // stride).all()  # per axis; (tile/stride)**2 in 2-D
    # and no tile is run that misses the core
    assert all(o + tile > core and o < core + length for o in origins)


@given(secret=st.text(alphabet="abcdefXYZ0123456789", min_size=3, max_size=12))
def test_locations_never_show_credentials(secret):
    for url in (f"s3://AKIA{secret}:{secret}@bucket/x.zarr",
                f"https://user:{secret}@host/x.zarr",
                f"https://host/x.zarr?X-Amz-Signature={secret}&token={secret}"):
        assert secret not in redact(url)
