"""Training's device plumbing on the CPU: ``--device`` and its errors, batches made ahead in the
same order, the same weights with and without prefetching. The same code on CUDA is tested by
``tests/test_gpu.py`` (skipped without a CUDA device)."""

from __future__ import annotations

import functools
import json
import threading

import pytest
import torch

from tests.helpers import TINY_MAE, TINY_UNET, ground_truth_pool
from volref.cli.main import main
from volref.errors import ConfigError
from volref.train.device import describe, resolve_device
from volref.train.prefetch import Prefetch


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert describe(torch.device("cpu")) == "cpu"


def test_auto_is_the_first_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"sees 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_refused(monkeypatch, name):
    _no_cuda(monkeypatch)
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x", "", "mps", "cuda:-1"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(ConfigError, match="is not one of auto, cpu, cuda or cuda:N"):
        resolve_device(name)


# ---------------------------------------------------------------- prefetching


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_gives_every_batch_in_order(depth):
    counter = iter(range(100))
    with Prefetch(lambda: next(counter), 7, depth) as batches:
        assert list(batches) == list(range(7))
    assert next(counter) == 7  # made exactly the 7 asked for, no more


def test_prefetch_raises_a_failure_at_its_batch():
    made = []

    def make():
        made.append(len(made))
        if len(made) == 3:
            raise ValueError("bad batch")
        return made[-1]

    got = []
    with pytest.raises(ValueError, match="bad batch"), Prefetch(make, 5, 2) as batches:
        for b in batches:
            got.append(b)
    assert got == [0, 1] and made == [0, 1, 2]  # nothing made after the failure


def test_leaving_the_loop_early_stops_the_thread():
    before = {t.ident for t in threading.enumerate()}
    with Prefetch(lambda: 1, 1000, 2) as batches:
        for i, _ in enumerate(batches):
            if i == 3:
                break
    assert {t.ident for t in threading.enumerate()} <= before


# ---------------------------------------------------------------- training


def test_refiner_weights_are_the_same_with_and_without_prefetching(small_phantom, tmp_path):
    from volref.train.refiner import RefinerRecipe, train_refiner

    pool = ground_truth_pool(small_phantom)
    recipe = RefinerRecipe(epochs=2, steps_per_epoch=3, batch=4, crop=32, mae=TINY_MAE,
                           blob_fraction=0.5)
    files = {depth: train_refiner(pool, recipe, tmp_path / str(depth), prefetch=depth)
             for depth in (0, 2)}
    a, b = (json.loads(f.with_suffix(".json").read_text()) for f in files.values())
    assert a["card"].pop("train_seconds") > 0 and b["card"].pop("train_seconds") > 0
    assert a == b and a["card"]["device"] == "cpu"
    from safetensors.torch import load_file

    for name in ("refiner.safetensors", "state.safetensors"):
        x, y = (load_file(tmp_path / str(d) / name) for d in (0, 2))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


def test_segmenter_file_is_the_same_with_and_without_prefetching(small_phantom, tmp_path):
    from volref.train.data import load_volume
    from volref.train.segmenter import SegmenterRecipe, train_segmenter

    vol = load_volume(small_phantom)
    recipe = SegmenterRecipe(members=2, epochs=2, steps_per_epoch=3, batch=2, crop=32,
                             unet=TINY_UNET)
    one, two = (train_segmenter([vol], recipe, tmp_path / str(d), prefetch=d) for d in (0, 3))
    assert one.read_bytes() == two.read_bytes()
    for k in range(2):
        state = f"member-{k}/state.safetensors"
        assert (tmp_path / "0" / state).read_bytes() == (tmp_path / "3" / state).read_bytes()


def test_train_segmenter_on_the_cpu_records_it(small_phantom, tmp_path, monkeypatch):
    import volref.train.segmenter

    # the command as a user runs it, with a tiny U-Net
    monkeypatch.setattr(volref.train.segmenter, "SegmenterRecipe", functools.partial(
        volref.train.segmenter.SegmenterRecipe, unet=TINY_UNET, crop=32))
    out = tmp_path / "seg"
    assert main(["-q", "train", "segmenter", "--data", str(small_phantom), "--out", str(out),
                 "--members", "1", "--epochs", "1", "--steps", "2", "--batch", "2",
                 "--device", "cpu", "--bf16"]) == 0
    card = json.loads((out / "segmenter.json").read_text())["card"]
    assert card["device"] == "cpu" and card["recipe"]["bf16"] is True


@pytest.mark.parametrize("kind", ["segmenter", "refiner"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "npu"])
def test_a_device_that_is_not_there_is_one_line_and_exit_2(small_phantom, tmp_path, capsys,
                                                          monkeypatch, kind, device):
    _no_cuda(monkeypatch)
    out = tmp_path / "out"
    code = main(["-q", "train", kind, "--data", str(small_phantom), "--out", str(out),
                 "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--device" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was read or written



def test_the_same_checkpoint_is_the_same_bytes(tmp_path):
    """safetensors writes metadata keys in a hash map's order, which changes between writes:
    ``save_tensors`` sorts them, so a training run's files can be compared byte for byte."""
    from volref.models.checkpoint import load_tensors, save_tensors

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    meta = {"kind": "x", "config": {"é": 1}, "card": {"data": ["a\nb"]}, "info": 2}
    files = set()
    for _ in range(12):
        save_tensors(tmp_path / "m.safetensors", tensors, meta)
        files.add((tmp_path / "m.safetensors").read_bytes())
    assert len(files) == 1
    got, got_meta = load_tensors(tmp_path / "m.safetensors")
    assert got_meta == meta and got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
