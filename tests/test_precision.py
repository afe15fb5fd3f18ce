"""Precision ``auto``: bf16 where the hardware computes it natively, fp32 elsewhere, resolved once
per run; model passes give the same bits whatever the process's torch threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volref.engine.runner import Executor
from volref.models import precision as prec
from volref.models.precision import in_precision, native_bf16, resolve
from volref.models.registry import load_segmenter
from volref.pipeline import run as run_module
from volref.pipeline.run import RunSettings, with_precision
from volref.stages.segment import SegmentSettings, segment_probabilities, segment_slices
from volref.stages.settings import RefineSettings


@pytest.mark.parametrize("caps, native", [
    ({"avx512_bf16": True, "amx_bf16": False}, True), ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"avx512_bf16": False, "amx_bf16": False}, False), ({}, False)])
def test_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert native_bf16("cpu") is native
    assert resolve("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve("auto", "cuda") == "bf16"  # a GPU always
    assert resolve("fp32", "cuda") == "fp32" and resolve("bf16", "cpu") == "bf16"  # pinned


def test_a_failing_or_missing_capability_probe_means_fp32(monkeypatch):
    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken)
    assert resolve("auto") == "fp32"
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert resolve("auto") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve("fp16")


def test_in_precision_resolves_auto_for_the_models_device(monkeypatch):
    net = torch.nn.Conv2d(1, 1, 3)
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu": True)
    assert next(in_precision(net, "auto").parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(prec, "native_bf16", lambda device="cpu": False)
    assert in_precision(net, "auto") is net  # fp32 already
    assert next(net.parameters()).dtype == torch.float32  # the caller's model is never cast


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ensemble_passes_give_the_same_bits_on_any_number_of_threads(models, precision):
    """A worker process runs torch on one thread, an inline run on all of them: fp32 matrix
    products on several threads split their sums differently, so every pass runs on one."""
    ensemble = load_segmenter(models[0])
    settings = SegmentSettings(tile=64, halo=16, precision=precision)
    rng = np.random.default_rng(0)
    stack = rng.random((5, 128 + 32, 192 + 32), dtype=np.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            labels, unc = segment_slices(ensemble, stack, settings)
            results.append((labels, unc, segment_probabilities(ensemble, stack, settings)))
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


class _Client:
    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.asked = answers, None

    def run(self, fn, workers=None):
        self.asked = workers
        return {a: v for a, v in self.answers.items() if workers is None or a in workers}


def _executor(answers: dict[str, str], model_workers: list[str]) -> Executor:
    ex = Executor(None)
    ex.client = _Client(answers)  # type: ignore[assignment]
    ex.model_workers = model_workers
    return ex


def test_a_run_resolves_auto_once_for_the_workers_its_models_run_on(monkeypatch):
    monkeypatch.setattr(run_module, "precision_here", lambda: "fp32")
    auto = RunSettings()
    assert (auto.segment.precision, auto.refine.precision) == ("auto", "auto")
    inline = with_precision(auto, Executor(None))  # this machine's answer
    assert (inline.segment.precision, inline.refine.precision) == ("fp32", "fp32")
    same = _executor({"w1": "bf16", "w2": "bf16"}, [])
    assert with_precision(auto, same).refine.precision == "bf16"
    mixed = _executor({"w1": "bf16", "w2": "fp32"}, [])  # never a mix in one run
    assert with_precision(auto, mixed).segment.precision == "fp32"
    routed = _executor({"gpu": "bf16", "cpu": "fp32"}, ["gpu"])  # models run on "gpu" only
    assert with_precision(auto, routed).segment.precision == "bf16"
    assert routed.client.asked == ["gpu"]
    none_up = _executor({}, [])  # an adaptive cluster before its first worker
    assert with_precision(auto, none_up).segment.precision == "fp32"
    pinned = RunSettings(segment=SegmentSettings(precision="bf16"),
                         refine=RefineSettings(precision="bf16"))
    assert with_precision(pinned, mixed) is pinned
