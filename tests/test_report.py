"""``volref report`` on a 2-channel image whose results went to an ``--output`` store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from tests.helpers import INLINE, tiny, write_image
from volref.cli.main import main
from volref.pipeline.run import run


@pytest.fixture(scope="module")
def two_channel(small_phantom, models, tmp_path_factory):
    """Channel 0: a constant (no structure), channel 1: the phantom; results of channel 1."""
    d = tmp_path_factory.mktemp("channels")
    phantom = zarr.open_group(small_phantom, mode="r")["s0"][:20, :128, :256]
    data = np.stack([np.full_like(phantom, 100), phantom])
    image = d / "two.ome.zarr"
    write_image(image, data, "czyx", chunks=(1, 20, 64, 128))
    out = d / "results.zarr"
    run(image, output=out, channel=1, settings=tiny(models), cluster=INLINE)
    return image, out


def test_report_of_one_channel_with_legend_gallery_and_table_link(two_channel, tmp_path,
                                                                 capsys):
    image, out = two_channel
    folder = tmp_path / "report"
    code = main(["-q", "report", str(image), "--output", str(out), "--out", str(folder),
                 "--channel", "1", "--gallery", "3"])
    assert code == 0, capsys.readouterr().err
    page = (folder / "index.html").read_text()
    for png in ("slices.png", "metrics.png", "gallery.png"):
        assert (folder / png).stat().st_size > 10_000
    assert "<a href='metrics.csv'>metrics.csv</a>" in page
    assert "Mitochondria that changed most" in page and "Depth below the first slice" in page
    table = pd.read_csv(folder / "metrics.csv")
    ids = zarr.open_group(out, mode="r")["labels/volref-mitochondria/s0"][:]
    assert len(table) == int(ids.max()) > 0


def test_report_of_a_multichannel_image_needs_the_channel(two_channel, tmp_path, capsys):
    image, out = two_channel
    code = main(["report", str(image), "--output", str(out), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--channel" in err and "Traceback" not in err


def test_report_of_the_output_store_alone(two_channel, tmp_path, capsys):
    """The output store is an image of its own: the report needs no other path."""
    _, out = two_channel
    assert main(["-q", "report", str(out), "--out", str(tmp_path / "r"), "--gallery", "2"]) == 0
    assert (tmp_path / "r" / "gallery.png").exists()


@pytest.mark.parametrize("given", ["models", "image without results"])
def test_a_refused_report_makes_no_folder(given, small_phantom, models, tmp_path, capsys):
    """Found by the fuzzer drawing new cases: the report folder (and its parents) were made before
    the inputs were checked, so a refused report left folders behind."""
    source = models[0] if given == "models" else str(small_phantom)
    out = tmp_path / "no" / "r"
    assert main(["-q", "report", source, "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()
