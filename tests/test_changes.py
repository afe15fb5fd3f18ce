"""The "do no harm" signal of refine: per-block change counts, their sums, the warning."""

from __future__ import annotations

import numpy as np
import pytest

from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX
from volref.stages.changes import (
    MIN_BLOCK_MITO,
    REMOVED_WARN,
    change_lines,
    count_changes,
    summarise_changes,
)


def test_counts_by_hand():
    initial = np.array([[BACKGROUND, IMS, MATRIX, CRISTAE, MATRIX]], np.uint8)
    refined = np.array([[IMS, IMS, BACKGROUND, MATRIX, BACKGROUND]], np.uint8)
    assert count_changes(initial, refined) == {"voxels": 5, "changed": 4, "mitochondrion": 4,
                                               "to_background": 2}
    assert count_changes(initial, initial)["changed"] == 0
    with pytest.raises(ValueError, match="shape"):
        count_changes(initial, initial[:, :3])


def _block(mito: int, removed: int, changed: int, voxels: int = 100_000) -> dict:
    return {"changes": {"voxels": voxels, "changed": changed, "mitochondrion": mito,
                        "to_background": removed}}


def test_summary_sums_blocks_and_warns_above_the_threshold():
    rng = np.random.default_rng(0)
    initial = rng.integers(0, 4, (4, 64, 64)).astype(np.uint8)
    refined = initial.copy()
    refined[rng.random(initial.shape) < 0.01] = BACKGROUND
    # the same volume cut into blocks two ways: the same totals
    cuts = [{f"{i}": {"changes": count_changes(initial[i], refined[i])} for i in range(4)},
            {f"{y}": {"changes": count_changes(initial[:, y:y + 16], refined[:, y:y + 16])}
             for y in range(0, 64, 16)}]
    whole = count_changes(initial, refined)
    for blocks in cuts:
        s = summarise_changes(blocks)
        assert {k: s[k] for k in whole} == whole
        assert s["removed_share"] == round(whole["to_background"] / whole["mitochondrion"], 6)
        assert s["warning"] is None and s["blocks"] == 4
    mito = 10 * MIN_BLOCK_MITO
    quiet = {"a": _block(mito, 0, 10), "b": _block(mito, int(REMOVED_WARN * mito), 10)}
    assert summarise_changes(quiet)["warning"] is None  # at the threshold: no warning
    loud = {"a": _block(mito, 0, 10), "b": _block(mito, mito // 2, 10)}  # 25 % in total
    s = summarise_changes(loud)
    assert "25.0%" in s["warning"] and s["blocks_over_threshold"] == 1
    assert [w["block"] for w in s["worst_blocks"]] == ["b", "a"]
    assert any(line.startswith("WARNING:") for line in change_lines(s))
    # one block over, the total under: named; a block of a few voxels is not flagged alone
    one = {**{f"q{i}": _block(mito, 0, 0) for i in range(20)}, "b": _block(mito, mito // 2, 0),
           "speck": _block(MIN_BLOCK_MITO - 1, MIN_BLOCK_MITO - 1, 0)}
    s = summarise_changes(one)
    assert s["removed_share"] < REMOVED_WARN and "block b" in s["warning"]
    assert s["blocks_over_threshold"] == 1
    # blocks recorded before the counts existed
    s = summarise_changes({"old": {"tiles": 3}, "a": _block(mito, 0, 0)})
    assert s["uncounted"] == 1 and s["blocks"] == 1
    assert any("earlier volref" in line for line in change_lines(s))
