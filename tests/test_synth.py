"""Phantoms: determinism across chunkings, biological structure, degradation, settings."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from scipy import ndimage

from tests.helpers import SMALL
from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX
from volref.errors import ConfigError
from volref.synth import SynthConfig, build_scene, make_phantom, render_box
from volref.synth import phantom as phantom_module


def _compute(config):
    p = make_phantom(config)
    with dask.config.set(scheduler="threads"):
        return dask.compute(p.image, p.classes, p.instances, p.degraded)


def test_same_seed_same_voxels_for_any_chunking(monkeypatch):
    a = _compute(SMALL)
    monkeypatch.setattr(phantom_module, "RENDER_VOXELS", 1)  # one render box per chunk
    b = _compute(SynthConfig(**{**SMALL.to_dict(), "chunks": (5, 70, 45)}))
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_render_boxes_are_whole_chunks_grown_to_a_million_voxels():
    """Tiny chunks are rendered many at a time (4 x 32 x 32 in 1-voxel chunks took 3 minutes)."""
    from volref.synth.phantom import render_block

    assert render_block((1, 1, 1), (4, 32, 32)) == (4, 32, 32)
    assert render_block((32, 256, 256), (64, 512, 512)) == (32, 256, 256)  # already 2M voxels
    z, y, x = render_block((3, 20, 30), (64, 512, 512))
    assert (z % 3, y % 20, x % 30) == (0, 0, 0) and 2**20 <= z * y * x < 2**22
    p = make_phantom(SynthConfig(shape=(4, 32, 32), chunks=(2, 16, 16), density=0))
    assert p.image.numblocks == (1, 1, 1)


def test_different_seed_differs():
    a = _compute(SMALL)[0]
    b = _compute(SynthConfig(**{**SMALL.to_dict(), "seed": 8}))[0]
    assert not np.array_equal(a, b)


def test_box_matches_whole_volume_at_odd_offsets():
    scene = build_scene(SMALL)
    whole = render_box(scene, SMALL, (0, 0, 0), SMALL.shape)
    part = render_box(scene, SMALL, (3, 17, 101), (13, 150, 230))
    np.testing.assert_array_equal(whole.image[3:13, 17:150, 101:230], part.image)
    np.testing.assert_array_equal(whole.classes[3:13, 17:150, 101:230], part.classes)


@pytest.fixture(scope="module")
def arrays():
    image, classes, instances, degraded = _compute(SMALL)
    return image, classes, instances, degraded, build_scene(SMALL)


def test_classes_and_instances_agree(arrays):
    _, classes, instances, _, scene = arrays
    assert set(np.unique(classes)) == {BACKGROUND, IMS, CRISTAE, MATRIX}
    np.testing.assert_array_equal(classes > 0, instances > 0)
    ids = np.unique(instances[instances > 0])
    assert ids.min() >= 1 and ids.max() <= scene.n_mitochondria
    assert scene.n_mitochondria >= 3


def test_mitochondria_are_separate_connected_objects(arrays):
    _, _, instances, _, _ = arrays
    components, n = ndimage.label(instances > 0, structure=np.ones((3, 3, 3)))
    ids = np.unique(instances[instances > 0])
    assert n == len(ids)  # no two mitochondria touch, none is split
    for c in range(1, n + 1):
        assert len(np.unique(instances[components == c])) == 1


def test_ims_separates_inner_structure_from_background(arrays):
    _, classes, _, _, _ = arrays
    inner = np.isin(classes, (CRISTAE, MATRIX))
    background = classes == BACKGROUND
    near_bg = ndimage.binary_dilation(background, structure=ndimage.generate_binary_structure(3, 1))
    assert not np.any(inner & near_bg)


def test_cristae_sit_inside_and_touch_the_inner_membrane(arrays):
    _, classes, _, _, _ = arrays
    cristae = classes == CRISTAE
    lamellae, n = ndimage.label(cristae, structure=np.ones((3, 3, 3)))  # thin oblique sheets
    assert n > 5
    # lamellae cut by the volume's faces may have lost their membrane to the crop: skip those
    inside = np.ones(cristae.shape, dtype=bool)
    inside[1:-1, 1:-1, 1:-1] = False
    cut = np.unique(lamellae[inside & cristae])
    whole = np.setdiff1d(np.arange(1, n + 1), cut)
    assert len(whole) >= 3
    ims_near = ndimage.binary_dilation(classes == IMS, iterations=2)
    attached = ndimage.sum_labels(ims_near, lamellae, index=whole) > 0
    size = ndimage.sum_labels(cristae, lamellae, index=whole)
    # joined to the inner membrane, by mass (single voxels at a sheet's edge can alias off)
    assert size[attached].sum() >= 0.99 * size.sum()


def test_stain_contrast_and_bleaching(arrays):
    image, classes, _, degraded, _ = arrays
    # clear: away from the faint rim around each degraded area (blend weight below the label's 0.3)
    clear = ndimage.distance_transform_edt(degraded == 0, sampling=(2.5, 1.0, 1.0)) > 20
    mean = {c: image[(classes == c) & clear].mean() for c in (BACKGROUND, IMS, CRISTAE, MATRIX)}
    assert mean[IMS] < mean[BACKGROUND] < mean[MATRIX] < mean[CRISTAE]
    bg = classes == BACKGROUND
    top = image[:4][bg[:4]].mean()
    bottom = image[-4:][bg[-4:]].mean()
    assert bottom < top  # photobleaching with depth


def test_degraded_regions_lose_contrast(arrays):
    image, classes, _, degraded, _ = arrays
    assert degraded.any()
    deg = degraded == 1

    def contrast(region):
        return image[region & (classes == MATRIX)].mean() - image[region & (classes == BACKGROUND)].mean()

    assert contrast(deg) < 0.5 * contrast(~deg)


def test_blur_is_coarser_in_z_than_in_xy():
    cfg = SynthConfig(shape=(16, 64, 64), seed=1, density=0, photons=1e6, read_noise=0.0)
    assert cfg.psf_sigma_z_vox * cfg.z_anisotropy > cfg.psf_sigma_px


def test_no_degradation_when_fraction_is_zero():
    cfg = SynthConfig(**{**SMALL.to_dict(), "degraded_fraction": 0.0})
    assert len(build_scene(cfg).degraded) == 0
    assert not _compute(cfg)[3].any()


def test_noise_level_lowers_snr():
    def snr(noise):
        cfg = SynthConfig(**{**SMALL.to_dict(), "noise": noise, "density": 0.0})
        signal = _compute(cfg)[0][:, :64, :64].astype(float) - cfg.offset_adu
        return signal.mean() / signal.std()

    assert snr(0.5) > 1.5 * snr(2.0)


@pytest.mark.parametrize("bad", [
    {"shape": (0, 10, 10)}, {"shape": (10, 10)}, {"density": -1.0},
    {"degraded_fraction": 1.5}, {"noise": 0.0}, {"seed": -1}, {"voxel_size_um": (0, 1, 1)},
    # numbers whose photon budget or geometry leaves the floats (found by tests/test_fuzz_cli.py)
    {"noise": 1e-320}, {"noise": 1e300}, {"voxel_size_um": (1e-320, 0.15, 0.15)},
    {"voxel_size_um": (40.0, 0.15, 0.15)}, {"shape": (4, 32, 32), "chunks": (1, 1, 1)},
])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        SynthConfig(**bad)


def test_config_round_trip():
    assert SynthConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError):
        SynthConfig.from_dict({"nonsense": 1})
