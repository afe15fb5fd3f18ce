"""One module names the outputs (:mod:`volref.layout`); no other module spells them out.

The rule the scan enforces: outside ``volref/layout.py``, no string in the code — string
constants and the literal parts of f-strings, help texts included — holds an output name or a
level path. Docstrings and comments may mention names (they explain, they do not address).
"""

from __future__ import annotations

import ast
from pathlib import Path

import zarr

from volref import layout

ROOT = Path(__file__).resolve().parents[1] / "volref"
NAMES = ("volref-initial", "volref-refined", "volref-mitochondria", "volref/uncertainty",
         "metrics.parquet", "metrics.csv", "manifests", "provenance.json", "ground-truth",
         "volref-uncertainty", "tables/", "table.parquet", "/s0", "/0/")
LEVELS = {"s0", "s1", "0"}  # a whole string that is a level path: levels come from metadata


def docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def strings(path: Path) -> list[tuple[int, str, bool]]:
    """(line, text, used as a subscript) of every non-docstring string in ``path``."""
    tree = ast.parse(path.read_text())
    skip = docstrings(tree)
    subscripts = {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
    return [(n.lineno, n.value, id(n) in subscripts) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_no_output_name_outside_the_layout_module():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "layout.py":
            continue
        for line, text, subscript in strings(path):
            if any(name in text for name in NAMES) or (subscript and text in LEVELS):
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {text!r}")
    assert not found, "\n".join(found)


def test_the_scan_sees_names_in_code_but_not_in_docstrings(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""labels/volref-initial is fine here."""\n'
                     'def f(root, n):\n'
                     '    """and here: volref/metrics.parquet"""\n'
                     '    return root[f"labels/volref-refined/{n}"], root["s0"]  # volref-initial\n')
    assert sorted((t, s) for _, t, s in strings(probe)) == [("labels/volref-refined/", False),
                                                             ("s0", True)]


def test_levels_come_from_the_metadata(tmp_path):
    from volref.io import create_multiscale, pyramid_geometry
    from volref.io.ngff import Axis

    for version in ("0.4", "0.5"):
        root = zarr.open_group(tmp_path / f"v{version}.zarr", mode="w",
                               zarr_format=3 if version == "0.5" else 2)
        group = root.create_group("img")
        axes = tuple(Axis(n, "space", "micrometer") for n in "zyx")
        geometry = pyramid_geometry((4, 64, 64), (1.0, 1.0, 1.0), 2, (4, 32, 32), "uint8",
                                    version, method="nearest")
        create_multiscale(group, geometry, axes, version=version, name="x", method="nearest")
        want = ["s0", "s1"] if version == "0.5" else ["0", "1"]
        assert layout.level_paths(group) == want
        assert layout.finest(root, "img").shape == (4, 64, 64)
        assert layout.existing_levels(root, "absent") is None
