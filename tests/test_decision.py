"""The ensemble's decision: class offsets before the argmax, read from the model card, checked,
and fitted by ``volref train decision``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import TINY_UNET
from volref.cli.main import main
from volref.models.checkpoint import CheckpointError, load_tensors
from volref.models.ensemble import Ensemble
from volref.models.registry import load_segmenter, model_card, save_segmenter
from volref.models.unet import UNet


def _members(k: int = 2) -> list[UNet]:
    torch.manual_seed(0)
    return [UNet(TINY_UNET).eval() for _ in range(k)]


def test_offsets_move_the_decision_and_nothing_else():
    p = torch.softmax(torch.randn(2, 4, 8, 8), dim=1)
    plain = Ensemble(_members())
    assert torch.equal(plain.decide(p), p.argmax(dim=1).to(torch.uint8))
    zero = Ensemble(_members(), [0.0, 0.0, 0.0, 0.0])
    assert torch.equal(zero.decide(p), plain.decide(p))
    towards_cristae = Ensemble(_members(), [0.0, 0.0, 50.0, 0.0])
    assert (towards_cristae.decide(p) == 2).all()
    x = torch.randn(1, 3, 32, 32)
    lab, unc = towards_cristae.predict(x)
    assert (lab == 2).all() and torch.equal(unc, plain.predict(x)[1])  # same uncertainty
    assert torch.equal(towards_cristae.plain_argmax().decide(p), plain.decide(p))
    with pytest.raises(ValueError, match="4 finite offsets"):
        Ensemble(_members(), [0.0, 1.0, float("nan"), 0.0])


@pytest.mark.parametrize("decision", [{"offsets": [0, 1, 2]}, {"offsets": ["a", 0, 0, 0]},
                                      {"offsets": [0, True, 0, 0]}, {"weights": [0, 0, 0, 0]},
                                      [0, 0, 0, 0]])
def test_a_bad_decision_in_a_card_is_a_checkpoint_error(tmp_path, decision):
    path = save_segmenter(tmp_path / "s.safetensors", _members(), card={"decision": decision})
    with pytest.raises(CheckpointError, match="decision|offsets"):
        load_segmenter(path)


def test_the_card_s_decision_is_used(tmp_path):
    path = save_segmenter(tmp_path / "s.safetensors", _members(),
                          card={"decision": {"offsets": [0, -0.5, 1, 0.25]}})
    ens = load_segmenter(path)
    assert ens.offsets is not None and ens.offsets.tolist() == [0, -0.5, 1, 0.25]
    assert load_segmenter(save_segmenter(tmp_path / "t.safetensors", _members())).offsets is None


def test_train_decision_fits_offsets_and_keeps_the_weights(small_phantom, models, tmp_path,
                                                          capsys):
    out = tmp_path / "dec.safetensors"
    assert main(["-q", "train", "decision", "--data", str(small_phantom), "--segmenter",
                 models[0], "--out", str(out), "--every", "4"]) == 0
    assert "mean Dice" in capsys.readouterr().out
    decision = model_card(out)["decision"]
    fit = decision["fit"]
    assert decision["offsets"][0] == 0 and len(decision["offsets"]) == 4
    assert fit["mean_dice"] >= fit["mean_dice_argmax"]
    assert decision["data"] == [small_phantom.name] and decision["every"] == 4
    before, after = load_tensors(models[0])[0], load_tensors(out)[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert load_segmenter(out).offsets.tolist() == decision["offsets"]
    assert out.with_suffix(".json").is_file()


def test_train_decision_needs_ground_truth(tmp_path, capsys):
    from tests.helpers import write_image

    write_image(tmp_path / "img.ome.zarr", np.zeros((4, 32, 32), np.uint16), "zyx")
    assert main(["-q", "train", "decision", "--data", str(tmp_path / "img.ome.zarr"), "--out",
                 str(tmp_path / "d.safetensors")]) != 0
    err = capsys.readouterr().err.strip()
    assert "ground truth" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d.safetensors").exists()


def test_train_decision_with_no_slice_to_fit_on_is_one_line(small_phantom, models, tmp_path,
                                                           capsys):
    out = tmp_path / "d.safetensors"
    assert main(["-q", "train", "decision", "--data", str(small_phantom), "--segmenter",
                 models[0], "--out", str(out), "--every", "1000"]) != 0
    err = capsys.readouterr().err.strip()
    assert "nothing to fit" in err and len(err.splitlines()) == 1 and not out.exists()


def test_train_decision_never_writes_over_the_ensemble_it_reads(small_phantom, models, tmp_path,
                                                               capsys):
    import shutil

    seg = tmp_path / "seg.safetensors"
    shutil.copy(models[0], seg)
    before = seg.read_bytes()
    assert main(["-q", "train", "decision", "--data", str(small_phantom), "--segmenter", str(seg),
                 "--out", str(tmp_path / "." / "seg.safetensors")]) != 0
    err = capsys.readouterr().err.strip()
    assert "another file" in err and len(err.splitlines()) == 1
    assert seg.read_bytes() == before
