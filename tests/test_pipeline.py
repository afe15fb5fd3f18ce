"""The engine end to end on small stores with tiny models: layout, determinism across block shapes
and workers, resume after a kill, a real scheduler with separate worker processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from tests.helpers import (
    INLINE,
    INLINE_JOB,
    assert_same,
    dask_cluster,
    records,
    stop,
    tiny,
    tree_digest,
)
from volref.cli.main import main
from volref.engine.cluster import ClusterSpec
from volref.errors import ConfigError, OutputExistsError, VolrefError
from volref.io import validate_image, validate_label_image
from volref.pipeline.run import RunSettings, run
from volref.stages.changes import count_changes
from volref.stages.refine import RefineSettings


def test_run_writes_the_layout_and_validates(reference, small_phantom):
    out, result, arrays = reference
    assert [r.stage for r in result.reports] == ["segment", "refine", "instances", "measure"]
    root = zarr.open_group(out, mode="r")
    for name in ("volref-initial", "volref-refined", "volref-mitochondria"):
        validate_label_image(root["labels"][name])
    validate_image(root["volref/uncertainty"])
    ids = arrays["labels/volref-mitochondria/s0"]
    assert ids.dtype == np.uint32 and ids.shape == zarr.open_group(small_phantom)["s0"].shape
    n = int(ids.max())
    assert set(np.unique(ids)) == set(range(n + 1))  # compact ids 1..N
    table = pd.read_parquet(out / "volref" / "metrics.parquet")
    assert list(table["label"]) == list(range(1, n + 1))
    assert (table["voxels"].to_numpy() == np.bincount(ids.ravel())[1:]).all()
    assert {"initial_cristae_boundary_ratio", "refined_skeleton_cycles",
            "skeleton_length_um", "centroid_z", "bbox_x1"} <= set(table.columns)
    props = json.loads((out / "labels/volref-mitochondria/zarr.json").read_text())
    props = props["attributes"]["ome"]["image-label"]["properties"]
    assert [p["label-value"] for p in props] == list(range(1, n + 1))
    # only uncertain places may change
    unc = arrays["volref/uncertainty/s0"]
    changed = arrays["labels/volref-initial/s0"] != arrays["labels/volref-refined/s0"]
    assert not np.any(changed & (unc == 0))
    # what refine says it changed, summed over its blocks, is what the two label images say
    counts = count_changes(arrays["labels/volref-initial/s0"], arrays["labels/volref-refined/s0"])
    summary = result.report("refine").results["changes"]
    assert counts["changed"] > 0 and {k: summary[k] for k in counts} == counts
    assert summary["blocks"] == len(result.grid) and summary["uncounted"] == 0
    prov = json.loads((out / "volref" / "provenance.json").read_text())["refine"]
    assert prov["changes"] == summary and prov["method"] == "mae"


def test_same_bytes_for_any_block_shape_and_worker_count(reference, small_phantom, models,
                                                         tmp_path):
    _, _, expected = reference
    a = tmp_path / "blocks.zarr"
    result = run(small_phantom, output=a, settings=tiny(models, block_shape=(8, 64, 128)),
                 cluster=INLINE)
    assert len(result.grid) == 12
    assert_same(a, expected)
    totals = _change_totals(reference[1])
    assert _change_totals(result) == totals
    b = tmp_path / "workers.zarr"
    result = run(small_phantom, output=b, settings=tiny(models, block_shape=(40, 128, 128)),
                 cluster=ClusterSpec(workers=2))
    assert result.cluster.startswith("local cluster (2 workers)")
    assert result.dashboard.startswith("http://127.0.0.1:")  # loopback only
    assert_same(b, expected)
    assert _change_totals(result) == totals
    # each worker's peak after every stage: one reading per worker, never falling, the last
    # equal to the run's peak
    peaks = result.stage_peak_memory
    assert list(peaks) == ["segment", "refine", "instances", "measure"]
    for worker, peak in result.peak_memory.items():
        readings = [peaks[stage][worker] for stage in peaks]
        assert readings == sorted(readings) and 0 < readings[-1] <= peak


def _change_totals(result) -> dict:
    """The run's totals of what refine changed (block-shape free: sums of integer counts)."""
    s = result.report("refine").results["changes"]
    return {k: s[k] for k in ("voxels", "changed", "mitochondrion", "to_background",
                              "changed_share", "removed_share")}


def test_same_bytes_for_another_chunking_of_the_image(reference, small_phantom, models,
                                                      tmp_path):
    src = zarr.open_group(small_phantom, mode="r")
    img = tmp_path / "rechunked.ome.zarr"
    dst = zarr.open_group(img, mode="w")
    dst.attrs.update(dict(src.attrs))
    dst.create_array("s0", data=src["s0"][:], chunks=(4, 64, 64), dimension_names=["z", "y", "x"])
    out = tmp_path / "o.zarr"
    result = run(img, output=out, settings=tiny(models), cluster=INLINE)
    assert zarr.open_group(out, mode="r")["labels/volref-refined/s0"].chunks == (4, 64, 64)
    assert len(result.grid) > 2
    assert_same(out, reference[2])


def test_into_the_archive_adds_groups_only(phantom_copy, models):
    before = tree_digest(phantom_copy)
    run(phantom_copy, settings=tiny(models), cluster=INLINE)
    after = tree_digest(phantom_copy)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {"labels/zarr.json", "volref/zarr.json"}  # listings and provenance only
    assert all(k in after for k in before)
    validate_image(zarr.open_group(phantom_copy, mode="r"))
    prov = json.loads((phantom_copy / "volref" / "provenance.json").read_text())
    assert {"segment", "refine", "instances", "measure"} <= set(prov)


def test_rerun_skips_finished_work_and_refuses_other_settings(reference, small_phantom, models,
                                                             tmp_path):
    out = tmp_path / "o.zarr"
    run(small_phantom, output=out, settings=tiny(models), stages=("segment",), cluster=INLINE)
    before = tree_digest(small_phantom)
    again = run(small_phantom, output=out, settings=tiny(models), cluster=INLINE)
    seg = again.report("segment")
    assert seg.computed == 0 and seg.skipped == seg.total
    assert_same(out, reference[2])
    assert tree_digest(small_phantom) == before
    other = tiny(models)
    other = RunSettings(**{**other.__dict__, "refine": RefineSettings(tile=32, stride=16, tau=0.5)})
    with pytest.raises(ConfigError, match="--overwrite"):
        run(small_phantom, output=out, settings=other, stages=("refine",), cluster=INLINE)
    redo = run(small_phantom, output=out, stages=("refine",), cluster=INLINE,
               settings=RunSettings(**{**other.__dict__, "overwrite": True}))
    assert redo.report("refine").computed == redo.report("refine").total


def test_results_without_a_manifest_are_not_overwritten(phantom_copy, models):
    root = zarr.open_group(phantom_copy, mode="r+")
    root.require_group("labels").create_group("volref-initial")
    with pytest.raises(OutputExistsError):
        run(phantom_copy, settings=tiny(models), stages=("segment",), cluster=INLINE)


def test_stages_need_their_inputs(phantom_copy, models):
    with pytest.raises(VolrefError, match="run volref segment first"):
        run(phantom_copy, settings=tiny(models), stages=("refine",), cluster=INLINE)
    with pytest.raises(VolrefError, match="run volref refine"):
        run(phantom_copy, settings=tiny(models), stages=("instances",), cluster=INLINE)


def test_cli_run_summary_and_one_block(phantom_copy, models, capsys):
    seg, mae = models
    assert main(["-q", "run", str(phantom_copy), "--segmenter", seg, "--refiner", mae,
                 "--workers", "0", "--csv"]) == 0
    out = capsys.readouterr().out
    assert "segment" in out and re.search(r"\d+ mitochondri(on|a); mean per mitochondrion", out)
    assert re.search(r"refinement changed [\d.]+% of \d+ voxels and turned [\d.]+% of \d+ "
                     "initial mitochondrion voxels to background", out)
    assert (phantom_copy / "volref" / "metrics.csv").exists()
    assert main(["-q", "run", str(phantom_copy), "--segmenter", seg, "--refiner", mae,
                 "--block", "0,0,0"]) == 0
    assert '"segment"' in capsys.readouterr().out
    assert main(["-q", "run", str(phantom_copy), "--block", "9,9,9", "--segmenter", seg,
                 "--refiner", mae]) == 2
    assert main(["-q", "segment", str(phantom_copy), "--block-shape", "7", "64", "64",
                 "--segmenter", seg]) == 2
    err = capsys.readouterr().err
    assert "outside the grid" in err and "not a multiple" in err and "Traceback" not in err


def test_ground_truth_mitochondria_keep_one_id_across_blocks(small_phantom, tmp_path):
    """The instance stage on a store whose refined labels are the phantom's ground truth."""
    from volref.classes import CLASS_COLORS, CLASS_PROPERTIES
    from volref.engine.manifest import Manifest
    from volref.io import LabelInfo, create_label_image, label_levels, open_image
    from volref.pipeline.store import open_target

    src = zarr.open_group(small_phantom, mode="r")
    truth = src["labels/ground-truth-instances/s0"][:]
    vol = open_image(small_phantom)
    root = open_target(small_phantom, vol.multiscale, tmp_path / "gt.zarr").root
    _, arrays = create_label_image(root, "volref-refined", label_levels(vol.multiscale, "uint8"),
                                   vol.multiscale.axes, version=vol.multiscale.version,
                                   info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES))
    arrays[0][:] = src["labels/ground-truth/s0"][:]
    done = Manifest(root.require_group("volref"), "refine")  # as if refine had finished
    done.begin({"ground truth": True}, overwrite=False)
    done.mark_done({})
    result = run(small_phantom, output=tmp_path / "gt.zarr", stages=("instances",),
                 cluster=INLINE, settings=RunSettings(block_shape=(8, 64, 128), min_voxels=0))
    assert len(result.grid) == 12
    ids = zarr.open_group(tmp_path / "gt.zarr", mode="r")["labels/volref-mitochondria/s0"][:]
    n_truth = len(np.unique(truth)) - 1
    assert result.report("instances").results["mitochondria"] == n_truth == ids.max()
    crossing = 0
    for t in np.unique(truth)[1:]:
        found = np.unique(ids[truth == t])
        assert len(found) == 1 and found[0] > 0  # one id per mitochondrion
        zz, yy, xx = np.nonzero(truth == t)
        blocks = {(z // 20, y // 64, x // 128) for z, y, x in zip(zz, yy, xx)}
        crossing += len(blocks) > 1
    assert crossing >= 3
    assert set(np.unique(ids[truth == 0])) == {0}


# ---------------------------------------------------------------- kill and resume

def _kill_when(cmd: list[str], out: Path, stage: str, n: int) -> int:
    log = out.parent / f"{stage}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while records(out, stage) < n:
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {log.read_text()}")
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return records(out, stage)


def test_killed_run_resumes_to_identical_output(reference, small_phantom, models, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(INLINE_JOB))
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, str(script), str(small_phantom), str(out), *models]
    seg_done = _kill_when(cmd, out, "segment", 3)  # during segment
    assert 3 <= seg_done < 12
    ref_done = _kill_when(cmd, out, "refine", 4)  # resumed, then killed during refine
    assert 4 <= ref_done < 12
    before = tree_digest(small_phantom)
    result = run(small_phantom, output=out, cluster=INLINE,
                 settings=tiny(models, block_shape=(8, 64, 128)))
    seg, ref = result.report("segment"), result.report("refine")
    assert (seg.computed, seg.skipped) == (0, 12)
    assert (ref.computed, ref.skipped) == (12 - ref_done, ref_done)  # only unfinished blocks
    assert_same(out, reference[2])
    assert tree_digest(small_phantom) == before


# ---------------------------------------------------------------- a real scheduler


def test_separate_scheduler_and_workers_with_gpu_routing(reference, small_phantom, models,
                                                         tmp_path):
    from distributed import Client

    procs: list[subprocess.Popen] = []
    try:
        address = dask_cluster(tmp_path, {"gpu": ["--resources", "GPU=1"], "cpu": []}, procs)
        with Client(address, timeout="30s") as client:
            gpu_worker = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                              if "GPU" in (w.get("resources") or {}))
        out = tmp_path / "dist.zarr"
        result = run(small_phantom, output=out, cluster=ClusterSpec(scheduler=address),
                     settings=tiny(models, block_shape=(8, 64, 128)))
        assert "2 workers" in result.cluster
        assert_same(out, reference[2])
        for stage in ("segment", "refine"):  # model tasks ran on the GPU-resource worker only
            recs = (out / "volref" / "manifests" / stage / "blocks").glob("*.json")
            workers = {json.loads(r.read_text())["worker"] for r in recs}
            assert workers == {gpu_worker}, stage
    finally:
        stop(procs)


def test_a_second_run_on_the_same_output_is_refused_and_stale_locks_recover(small_phantom,
                                                                             models, tmp_path):
    from volref.engine.lock import StoreLockedError

    out = tmp_path / "locked.zarr"
    run(small_phantom, output=out, settings=tiny(models), stages=("segment",), cluster=INLINE)
    lock = out / "volref" / "run.lock"
    assert not lock.exists()  # released after the run
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "started": 0}))
    with pytest.raises(StoreLockedError, match="another volref run"):
        run(small_phantom, output=out, settings=tiny(models), stages=("segment",), cluster=INLINE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": 0}))
    run(small_phantom, output=out, settings=tiny(models), stages=("segment",), cluster=INLINE)
    assert not lock.exists()


@pytest.mark.slow
def test_shipped_models_find_every_mitochondrion_of_a_clean_phantom(tmp_path):
    """~10 min on 2 cores: the whole pipeline with the shipped weights on a clean phantom."""
    import dask

    from volref.pipeline import write_phantom
    from volref.synth import SynthConfig

    img = tmp_path / "clean.ome.zarr"
    config = SynthConfig(shape=(20, 512, 512), seed=11, chunks=(10, 256, 256), density=2.0,
                         degraded_fraction=0.0)
    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(config, img))
    result = run(img, cluster=ClusterSpec(workers=2),
                 settings=RunSettings(block_shape=(10, 256, 256)))
    assert len(result.grid) == 8
    root = zarr.open_group(img, mode="r")
    truth = root["labels/ground-truth-instances/s0"][:]
    ids = root["labels/volref-mitochondria/s0"][:]
    assert ids.max() == truth.max()
    for t in np.unique(truth)[1:]:
        found = set(np.unique(ids[truth == t]).tolist()) - {0}
        assert len(found) == 1


def test_cli_with_worker_processes_keeps_dask_chatter_quiet(phantom_copy, models):
    """distributed sets its log levels from the Dask config at import, in the client and in
    every worker it spawns: without -vv a run prints volref's lines, not Dask's INFO log."""
    seg, _ = models
    cmd = [sys.executable, "-m", "volref.cli.main", "-q", "segment", str(phantom_copy),
           "--segmenter", seg, "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "segment" in proc.stdout
    assert "INFO" not in proc.stderr and "distributed." not in proc.stderr, proc.stderr[:2000]
