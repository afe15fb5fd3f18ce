"""segment and refine on whole stores with tiny models: layout, validation, inputs untouched."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import torch
import zarr

from tests.conftest import tree_digest
from tests.test_models import TINY_MAE, TINY_UNET
from volref.cli.main import main
from volref.errors import OutputExistsError, VolrefError
from volref.io import validate_image, validate_label_image
from volref.models.checkpoint import save_model
from volref.models.mae import MaskedAutoencoder
from volref.models.registry import REFINER_KIND, save_segmenter
from volref.models.unet import UNet
from volref.pipeline.refine import refine
from volref.pipeline.segment import segment
from volref.stages.refine import RefineSettings
from volref.stages.segment import SegmentSettings

SEG = SegmentSettings(tile=64, halo=16)
REF = RefineSettings(tile=32, stride=16, tau=0.3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    seg = save_segmenter(d / "seg.safetensors", [UNet(TINY_UNET).eval() for _ in range(3)])
    mae = save_model(d / "mae.safetensors", MaskedAutoencoder(TINY_MAE).eval(), REFINER_KIND,
                     TINY_MAE.to_dict())
    return seg, mae


def run(work):
    with dask.config.set(scheduler="threads"):
        dask.compute(work)


def test_segment_and_refine_into_the_archive(phantom_copy, models):
    seg, mae = models
    before = tree_digest(phantom_copy)
    run(segment(phantom_copy, model=seg, settings=SEG))
    run(refine(phantom_copy, model=mae, settings=REF))
    after = tree_digest(phantom_copy)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {"labels/zarr.json", "volref/zarr.json"}  # listings and provenance only
    root = zarr.open_group(phantom_copy, mode="r")
    validate_image(root)
    initial = root["labels/volref-initial/s0"][:]
    refined = root["labels/volref-refined/s0"][:]
    unc = root["volref/uncertainty/s0"][:]
    assert initial.shape == refined.shape == unc.shape == root["s0"].shape
    assert set(np.unique(initial)) <= {0, 1, 2, 3}
    # only uncertain places may change
    changed_px = initial != refined
    assert not np.any(changed_px & (unc == 0))
    prov = (phantom_copy / "volref" / "provenance.json").read_text()
    assert "model_sha256" in prov and "segment" in prov and "refine" in prov


def test_results_do_not_depend_on_z_blocking(phantom_copy, models, tmp_path):
    seg, mae = models
    out_a, out_b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    run(segment(phantom_copy, model=seg, settings=SEG, output=out_a))
    run(refine(phantom_copy, model=mae, settings=REF, output=out_a))
    # same image stored with other z-chunks
    src = zarr.open_group(phantom_copy, mode="r")
    rechunked = tmp_path / "rechunked.ome.zarr"
    dst = zarr.open_group(rechunked, mode="w")
    dst.attrs.update(dict(src.attrs))
    dst.create_array("s0", data=src["s0"][:], chunks=(7, 64, 64),
                     dimension_names=["z", "y", "x"])
    run(segment(rechunked, model=seg, settings=SEG, output=out_b))
    run(refine(rechunked, model=mae, settings=REF, output=out_b))
    a, b = zarr.open_group(out_a, mode="r"), zarr.open_group(out_b, mode="r")
    for path in ("labels/volref-initial/s0", "volref/uncertainty/s0", "labels/volref-refined/s0"):
        np.testing.assert_array_equal(a[path][:], b[path][:])
    validate_label_image(a["labels/volref-refined"])


def test_output_store_leaves_input_untouched(small_phantom, models, tmp_path):
    seg, mae = models
    before = tree_digest(small_phantom)
    out = tmp_path / "out.zarr"
    run(segment(small_phantom, model=seg, settings=SEG, output=out))
    run(refine(small_phantom, model=mae, settings=REF, output=out))
    assert tree_digest(small_phantom) == before
    with pytest.raises(OutputExistsError):
        segment(small_phantom, model=seg, settings=SEG, output=out)
    run(segment(small_phantom, model=seg, settings=SEG, output=out, overwrite=True))


def test_refine_needs_segment_first(phantom_copy, models):
    with pytest.raises(VolrefError, match="run volref segment first"):
        refine(phantom_copy, model=models[1], settings=REF)


def test_cli_segment_refine(phantom_copy, models, capsys):
    seg, mae = models
    assert main(["-q", "segment", str(phantom_copy), "--model", str(seg)]) == 0
    assert main(["-q", "refine", str(phantom_copy), "--model", str(mae)]) == 0
    assert main(["-q", "segment", str(phantom_copy), "--model", str(seg)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    code = main(["-q", "segment", str(phantom_copy), "--model", str(phantom_copy / "zarr.json"),
                 "--overwrite"])
    assert code == 2
