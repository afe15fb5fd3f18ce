"""Validate before work starts: files a user names (checkpoints, cluster files), checkpoint cards
and weights, numbers, remote stores and credentials. Each bad input is one line and exit 2, and
the input's bytes are unchanged."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import TINY_MAE, http_server, tree_digest, write_image
from volref.cli.main import main, one_line
from volref.io.store import redact, scrub
from volref.models.checkpoint import CheckpointError, save_model
from volref.models.mae import MaskedAutoencoder
from volref.models.registry import REFINER_KIND, load_refiner


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("volref: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing", "device"])
def test_a_checkpoint_that_is_not_a_regular_file_is_one_line_never_a_hang(
        kind, tmp_path, capsys, small_phantom):
    path = tmp_path / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = "/dev/zero"
    before = tree_digest(small_phantom)
    code = main(["-q", "segment", str(small_phantom), "--output", str(tmp_path / "o.zarr"),
                 "--workers", "0", "--segmenter", str(path)])
    _one_line(capsys, code, "checkpoint")
    assert tree_digest(small_phantom) == before
    assert not (tmp_path / "o.zarr" / "volref" / "run.lock").exists()  # the lock is released


def _card(tmp_path, name, **config):
    model = MaskedAutoencoder(TINY_MAE)
    path = save_model(tmp_path / f"{name}.safetensors", model, REFINER_KIND, TINY_MAE.to_dict())
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    meta = {"kind": REFINER_KIND, "config": {**TINY_MAE.to_dict(), **config}, "card": {}}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


@pytest.mark.parametrize("config, needle", [
    ({"patch": 0}, "patch"), ({"width": "32"}, "width must be an integer"),
    ({"width": 10**9}, "width must be in"), ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ({"bogus": 1}, "bogus"), ({"heads": True}, "heads"), ({"tile": 30}, "tile"),
    ({"depth": -1}, "depth"),
])
def test_checkpoint_cards_are_type_checked_against_their_architecture(tmp_path, config, needle):
    path = _card(tmp_path, "card", **config)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_refiner(path)
    assert "\n" not in str(info.value)


def test_nan_weights_are_refused_not_everything_background(tmp_path):
    model = MaskedAutoencoder(TINY_MAE)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    path = save_model(tmp_path / "nan.safetensors", model, REFINER_KIND, TINY_MAE.to_dict())
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_refiner(path)


@pytest.mark.parametrize("text, needle", [
    ("kind: local\nworkers: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "needs 'kind"),
    ("kind: local\nbogus: 1\n", "unknown key 'bogus'"), ("kind: local\nworkers: many\n",
                                                         "wrong type"),
    ("kind: local\nworkers: -3\n", "workers must be in"), ("kind: slurm\nscale: 1.5\n",
                                                           "wrong type"),
])
def test_a_broken_cluster_file_is_one_line(text, needle, tmp_path, capsys, small_phantom):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code = main(["-q", "segment", str(small_phantom), "--output", str(tmp_path / "o.zarr"),
                 "--cluster", str(path)])
    _one_line(capsys, code, needle)


def test_a_cluster_file_that_is_a_fifo_and_an_unknown_scheduler(tmp_path, capsys, small_phantom):
    os.mkfifo(tmp_path / "fifo.yaml")
    out = str(tmp_path / "o.zarr")
    code = main(["-q", "segment", str(small_phantom), "--output", out, "--cluster",
                 str(tmp_path / "fifo.yaml")])
    _one_line(capsys, code, "FIFO")
    code = main(["-q", "segment", str(small_phantom), "--output", out, "--scheduler", "foo://x"])
    _one_line(capsys, code, "cannot reach the Dask scheduler at foo://x")


# ---------------------------------------------------------------- numbers and outputs


@pytest.mark.parametrize("option", [["--density", "nan"], ["--noise", "inf"],
                                    ["--voxel-size", "1", "nan", "1"],
                                    ["--degraded-length", "0", "inf"], ["--density", "1e309"],
                                    ["--degraded-fraction", "nan"]])
def test_synth_refuses_nan_and_infinite_options(option, tmp_path, capsys):
    out = tmp_path / "p.ome.zarr"
    code = main(["-q", "synth", str(out), "--shape", "4", "32", "32", *option])
    _one_line(capsys, code)
    assert not out.exists()


def test_snapshot_into_a_missing_folder_is_one_line(small_phantom, tmp_path, capsys):
    code = main(["snapshot", str(small_phantom), str(tmp_path / "no" / "such" / "x.png")])
    _one_line(capsys, code, "does not exist")


def test_consolidated_v2_metadata_is_refused_when_writing_into_the_archive(tmp_path, capsys,
                                                                          models):
    path = tmp_path / "v2.ome.zarr"
    write_image(path, np.full((4, 64, 64), 100, dtype=np.uint16), "zyx", version="0.4")
    zarr.consolidate_metadata(str(path), zarr_format=2)
    before = tree_digest(path)
    code = main(["-q", "segment", str(path), "--workers", "0", "--segmenter", models[0]])
    _one_line(capsys, code, "consolidated metadata", "--output")
    assert tree_digest(path) == before


# ---------------------------------------------------------------- remote stores, credentials


def test_http_stores_unreachable_or_read_only_are_one_line_without_the_password(
        small_phantom, capsys):
    before = tree_digest(small_phantom)
    with http_server(small_phantom.parent) as port:
        url = f"http://user:hunter2@127.0.0.1:{port}/{small_phantom.name}"
        assert main(["info", url]) == 0
        out = capsys.readouterr()
        assert "hunter2" not in out.out + out.err
        line = _one_line(capsys, main(["-q", "segment", url, "--workers", "0"]), "read-only")
        assert "hunter2" not in line
        line = _one_line(capsys, main(["-q", "segment", str(small_phantom), "--output",
                                       url.replace(small_phantom.name, "new.zarr")]),
                         "read-only")
        assert "hunter2" not in line
    # the server is gone: nothing listens on the port
    line = _one_line(capsys, main(["info", url]), "cannot reach")
    assert "hunter2" not in line
    assert tree_digest(small_phantom) == before


@given(secret=st.text(alphabet="abcdefXYZ0123456789@:/%", min_size=3, max_size=12).filter(
    lambda s: not set(s) <= set("@:/%")))
def test_no_message_shows_a_password_or_a_token(secret):
    secret = secret.strip("/@:")
    if len(secret) < 3 or "/" in secret or "@" in secret:
        return
    for url in (f"https://user:{secret}@host/x.zarr", f"s3://KEY:{secret}@bucket/x",
                f"https://host/x.zarr?X-Amz-Signature={secret}",
                f"https://host/x.zarr#token={secret}"):
        assert secret not in redact(url)
        text = f"FsspecStore(<HTTPFileSystem>, '{url}') failed: 'see {url}'\n"
        assert secret not in scrub(text) and secret not in one_line(text)


def test_a_zarr_document_zarr_refuses_is_one_line(tmp_path, capsys):
    """Found by the fuzzer drawing new cases: `info` on a store whose volref/zarr.json lacks its
    node_type was a traceback (zarr's MetadataValidationError, raised where volref reads a node
    it did not open itself)."""
    import json

    store = tmp_path / "m.ome.zarr"
    assert main(["-q", "synth", str(store), "--shape", "4", "64", "64", "--chunks", "4", "64",
                 "64"]) == 0
    capsys.readouterr()
    doc = store / "volref" / "zarr.json"
    meta = json.loads(doc.read_text())
    del meta["node_type"]
    doc.write_text(json.dumps(meta))
    assert main(["-q", "info", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("volref: error: ") and "node_type" in err[0], err
