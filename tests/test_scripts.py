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
#: script -> what it reads besides its options: "store" (a segmented phantom) or "workdir"
SCRIPTS = {
    "benchmarks.block_io": "store",
    "benchmarks.compression": "store",
    "benchmarks.domain_shift": "",
    "benchmarks.engine_scaling": "workdir",
    "benchmarks.ensemble_throughput": "",
    "benchmarks.intensity_scale": "workdir",
    "benchmarks.mae_throughput": "store",
    "benchmarks.synth_memory": "workdir",
    "experiments.crf_tuning": "store",
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


@pytest.mark.parametrize("script", sorted(SCRIPTS))
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
