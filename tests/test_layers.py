"""Imports flow one way (DESIGN.md): a test can assert it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "volref"
FORBIDDEN = {
    "io": {"torch", "volref.models", "volref.stages", "volref.engine", "volref.pipeline",
           "volref.cli", "volref.synth"},
    "synth": {"torch", "dask.distributed", "distributed", "volref.io", "volref.models",
              "volref.engine", "volref.pipeline", "volref.cli"},
    "metrics": {"torch", "dask", "distributed"},
    "models": {"dask", "distributed", "zarr", "volref.io", "volref.engine", "volref.pipeline"},
    "stages": {"dask", "distributed", "zarr", "volref.engine", "volref.pipeline"},
    "engine": {"torch", "volref.models", "volref.stages", "volref.pipeline", "volref.cli"},
    "pipeline": {"volref.cli"},
    # single modules below the layers (volref/<name>.py)
    "layout.py": {"torch", "dask", "distributed", "volref.models", "volref.stages",
                  "volref.engine", "volref.pipeline", "volref.cli"},
    "settings.py": {"torch", "dask", "distributed", "zarr", "volref.io", "volref.models",
                    "volref.stages", "volref.engine", "volref.pipeline", "volref.cli"},
    "stages/settings.py": {"torch", "volref.models"},  # the CLI reads defaults without torch
    "stages/changes.py": {"torch", "zarr"},  # counts on numpy arrays; the CLI prints them
    # the method registry: the CLI builds its choices without loading a model
    "methods.py": {"torch", "dask", "distributed", "zarr", "volref.io", "volref.models",
                   "volref.stages", "volref.engine", "volref.pipeline", "volref.cli"},
    "stages/measure.py": {"torch", "pandas", "zarr"},  # array work only: numpy in, numpy out
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    bad = []
    files = [ROOT / layer] if layer.endswith(".py") else sorted((ROOT / layer).rglob("*.py"))
    for f in files:
        for name in imports(f):
            if any(name == x or name.startswith(x + ".") for x in FORBIDDEN[layer]):
                bad.append(f"{f.relative_to(ROOT)}: {name}")
    assert not bad, bad


def test_io_and_synth_run_without_torch():
    code = ("import sys, volref.io, volref.synth, volref.pipeline.phantom, volref.layout, "
            "volref.pipeline.settings, volref.cli.main; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_nothing_loads_through_pickle():
    """Security: checkpoints are safetensors + JSON; no module may unpickle anything."""
    banned = ("import pickle", "from pickle", "torch.load(", "allow_pickle=True", "import dill",
              "joblib.load", "cloudpickle.load")
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        for b in banned:
            assert b not in text, f"{path.relative_to(ROOT)} uses {b}"


def test_the_package_never_imports_scripts_and_tests_never_import_each_other():
    """volref does not depend on benchmarks/experiments; tests share code through helpers.py."""
    bad = [f"{f.relative_to(ROOT.parent)}: {name}" for f in sorted(ROOT.rglob("*.py"))
           for name in imports(f)
           if name.split(".")[0] in ("benchmarks", "experiments", "tests")]
    tests = ROOT.parent / "tests"
    bad += [f"{f.relative_to(ROOT.parent)}: {name}" for f in sorted(tests.glob("*.py"))
            for name in imports(f)
            if name.startswith("tests.") and name not in ("tests.helpers",)]
    assert not bad, bad
