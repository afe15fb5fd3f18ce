"""Every benchmark and experiment script runs its ``--quick`` smoke run (``python -m ...``).

The scripts import volref's API; running them is what stops them rotting. They read one small
segmented phantom made here (``benchmarks.common.quick_store``) and write their JSON into a
temporary folder, never over the committed results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import quick_store
from tests.helpers import tree_digest

ROOT = Path(__file__).resolve().parents[1]
#: modules of the two folders that are not scripts
NOT_SCRIPTS = {"__init__", "common", "models"}
#: script -> what it reads besides its options: "store" (a segmented phantom) or "workdir";
#: "own": its smoke run has its own test below
SCRIPTS = {
    "benchmarks.block_io": "store",
    "benchmarks.compression": "store",
    "benchmarks.domain_shift": "",
    "benchmarks.engine_scale": "workdir",
    "benchmarks.engine_scaling": "workdir",
    "benchmarks.ensemble_throughput": "",
    "benchmarks.gpu_check": "own",
    "benchmarks.instance_merge": "",
    "benchmarks.intensity_scale": "workdir",
    "benchmarks.mae_throughput": "store",
    "benchmarks.refine_methods": "workdir",
    "benchmarks.synth_memory": "workdir",
    "experiments.crf_tuning": "store",
    "experiments.fused_refinement": "store",
    "experiments.fused_topology": "store",
    "experiments.paper_models": "workdir",
    "experiments.prior_calibration": "store",
    "experiments.refine_tuning": "store",
    "experiments.smooth_tuning": "store",
    "experiments.spot_context": "store",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quick_store(tmp_path_factory.mktemp("quick"))


def test_every_script_has_a_smoke_run() -> None:
    found = {f"{folder}.{f.stem}" for folder in ("benchmarks", "experiments")
             for f in (ROOT / folder).glob("*.py") if f.stem not in NOT_SCRIPTS}
    assert found == set(SCRIPTS)


#: smoke runs of experiments whose results are committed (experiments/results, docs/results):
#: slow (-m slow); the benchmarks and the experiment behind the default method stay in the
#: default run
SLOW = {"experiments.crf_tuning", "experiments.paper_models", "experiments.prior_calibration",
        "experiments.refine_tuning", "experiments.smooth_tuning", "experiments.spot_context"}


@pytest.mark.parametrize("script", [
    pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s
    for s in sorted(s for s, kind in SCRIPTS.items() if kind != "own")])
def test_quick_run(script: str, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["--quick", "--json", str(out)]
    if SCRIPTS[script] == "store":
        argv += ["--store", str(store)]
    elif SCRIPTS[script] == "workdir":
        argv += ["--workdir", str(tmp_path / "work")]
    if script == "experiments.paper_models":  # writes models.json and models.md into --out
        argv = ["--quick", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)]
        out = tmp_path / "models.json"
    results = {d: tree_digest(ROOT / d) for d in ("benchmarks/results", "experiments/results",
                                                   "docs/results")}
    before = tree_digest(store)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")])}
    proc = subprocess.run([sys.executable, "-m", script, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())
    assert tree_digest(store) == before  # the scripts read the store, never write it
    assert {d: tree_digest(ROOT / d) for d in results} == results


#: what a GPU machine's PyTorch image lacks (benchmarks.gpu_check's docstring lists the wheels)
BARE = ("dask", "distributed", "zarr", "numcodecs", "ome_zarr", "ome_zarr_models", "dask_image",
        "dask_cuda", "pydantic")


def _gpu_check(out: Path, hide: tuple[str, ...] = (), steps: tuple[str, ...] = ()) -> dict:
    """``python -m benchmarks.gpu_check --quick --device cpu --out OUT [--steps ...]`` with
    ``hide``'s packages made unimportable; its JSON."""
    argv = ["--quick", "--device", "cpu", "--out", str(out)]
    argv += ["--steps", ",".join(steps)] if steps else []
    code = ("import sys\n"
            f"for name in {hide!r}:\n"
            "    sys.modules[name] = None  # import fails, find_spec says missing\n"
            "from benchmarks.gpu_check import main\n"
            f"sys.exit(main({argv!r}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


def _trained(step: dict) -> None:
    assert step["status"] == "passed", step
    assert step["device"] == "cpu" and step["runs_on_cpu"] is True
    assert step["last_epoch_loss"] < step["first_epoch_loss"]


def test_gpu_check_falls_back_to_the_cpu(tmp_path: Path) -> None:
    """The GPU check's CPU fallback, smallest sizes: every step runs, the gpu-marked tests skip
    cleanly without CUDA, and the JSON holds each step's status, seconds and numbers."""
    import torch

    report = _gpu_check(tmp_path / "check")
    steps = report["steps"]
    assert list(steps) == ["environment", "gpu_tests", "ensemble_throughput", "mae_throughput",
                           "train_segmenter", "train_refiner"]
    assert report["passed"] is True and report["sizes"] == "quick"
    assert report["device_name"] == "cpu" and report["torch"] == torch.__version__
    assert all(s["seconds"] >= 0 for s in steps.values())
    assert steps["environment"]["matrix_rate_gflop_per_s"]["fp32"] > 0
    tests = steps["gpu_tests"]
    assert tests["tests"] > 0 and "tests/test_gpu.py" in tests["files"]
    if not torch.cuda.is_available():
        assert tests["status"] == "skipped" and tests["skipped"] == tests["tests"], tests
    assert min(steps["ensemble_throughput"]["voxels_per_s"].values()) > 0
    assert steps["mae_throughput"]["modes"]["batched"]["tiles_per_s"] > 0
    _trained(steps["train_segmenter"])
    _trained(steps["train_refiner"])


def test_gpu_check_runs_where_dask_and_zarr_are_not(tmp_path: Path) -> None:
    """As on a GPU machine's bare PyTorch image: the steps that need Dask or zarr say so and are
    skipped; the others run (the throughput steps import what the refiner's training does, less
    the training loop: one of them is enough here)."""
    report = _gpu_check(tmp_path / "check", hide=BARE, steps=(
        "environment", "gpu_tests", "mae_throughput", "train_segmenter", "train_refiner"))
    steps = report["steps"]
    assert report["passed"] is True and steps["environment"]["machine"]["zarr"] is None
    for name in ("gpu_tests", "train_segmenter"):
        assert steps[name]["status"] == "skipped" and "wheels of" in steps[name]["reason"]
    for name in ("environment", "mae_throughput"):
        assert steps[name]["status"] == "passed", steps[name]
    _trained(steps["train_refiner"])
