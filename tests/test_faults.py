"""Faults and bad data: a worker SIGKILLed mid-run, torn chunks, a full disk, NaN/Inf voxels,
corrupt chunks, tiny images, bad inputs to `volref run`; every time nothing of the input changes
and a re-run finishes with the bytes of an undisturbed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers import (
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
from volref.pipeline.run import RunSettings, run

SCRIPT = """
import sys
from volref.engine.cluster import ClusterSpec
from volref.pipeline.run import RunSettings, run
from volref.stages.refine import RefineSettings
from volref.stages.segment import SegmentSettings
if __name__ == "__main__":
    run(sys.argv[1], output=sys.argv[2], cluster=ClusterSpec(scheduler=sys.argv[5]),
        settings=RunSettings(segmenter=sys.argv[3], refiner=sys.argv[4],
                             segment=SegmentSettings(tile=64, halo=16),
                             refine=RefineSettings(tile=32, stride=16, tau=0.3),
                             block_shape=(8, 64, 128)))
"""


def test_worker_killed_mid_run_output_identical(reference, small_phantom, models,
                                                tmp_path):
    procs: list[subprocess.Popen] = []
    try:
        address = dask_cluster(tmp_path, {"w1": ["--no-nanny"], "w2": ["--no-nanny"]}, procs)
        workers = procs[1:]
        script = tmp_path / "job.py"
        script.write_text(textwrap.dedent(SCRIPT))
        out = tmp_path / "faulty.zarr"
        with (tmp_path / "run.log").open("w") as log:
            job = subprocess.Popen([sys.executable, str(script), str(small_phantom), str(out),
                                    *models, address], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while records(out, "segment") < 3:  # some blocks done, most still to come
            assert job.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(workers[1].pid, signal.SIGKILL)
        assert job.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()
        assert records(out, "segment") == 12 and records(out, "refine") == 12
        assert_same(out, reference[2])
    finally:
        stop(procs)


# ---------------------------------------------------------------- bad data in the image


def _image(tmp_path, data: np.ndarray, chunks=(4, 32, 32)) -> Path:
    """A minimal NGFF 0.5 image holding ``data``."""
    from volref.io import create_multiscale, pyramid_geometry
    from volref.io.ngff import Axis

    path = tmp_path / "img.ome.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3)
    axes = [Axis("z", "space", "micrometer"), Axis("y", "space", "micrometer"),
            Axis("x", "space", "micrometer")]
    levels = pyramid_geometry(data.shape, (0.4, 0.15, 0.15), 1, chunks, data.dtype, "0.5")
    arrays = create_multiscale(root, levels, axes, version="0.5", name="img", method="mean")
    arrays[0][:] = data
    return path


def test_nan_and_inf_intensities_are_refused(tmp_path, models, capsys):
    data = np.random.default_rng(0).random((8, 64, 64)).astype(np.float32)
    data[5, 40, 40] = np.nan
    data[6, 1, 1] = np.inf
    img = _image(tmp_path, data)
    before = tree_digest(img)
    code = main(["-q", "run", str(img), "--workers", "0", "--segmenter", models[0],
                 "--refiner", models[1], "--output", str(tmp_path / "o.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or Inf" in err and "Traceback" not in err
    assert tree_digest(img) == before


def test_a_corrupt_chunk_is_named(tmp_path, models, capsys):
    data = (np.random.default_rng(0).random((8, 64, 64)) * 1000).astype(np.uint16)
    img = _image(tmp_path, data)
    chunk = img / "s0" / "c" / "1" / "1" / "0"
    chunk.write_bytes(b"\x00garbage" * 10)
    code = main(["-q", "segment", str(img), "--workers", "0", "--segmenter", models[0],
                 "--output", str(tmp_path / "o.zarr"), "--block-shape", "4", "256", "256"])
    err = capsys.readouterr().err
    assert code == 2 and "corrupt" in err and "chunk(s) 1.1.0" in err, err
    assert "Traceback" not in err


def test_an_image_smaller_than_a_tile_runs(tmp_path, models):
    data = (np.random.default_rng(1).random((3, 20, 30)) * 1000).astype(np.uint16)
    img = _image(tmp_path, data, chunks=(3, 20, 30))
    out = tmp_path / "o.zarr"
    result = run(img, output=out, cluster=ClusterSpec(workers=0),
                 settings=RunSettings(segmenter=models[0], refiner=models[1]))
    assert len(result.grid) == 1
    root = zarr.open_group(out, mode="r")
    assert root["labels/volref-refined/s0"].shape == (3, 20, 30)


def test_a_half_written_chunk_without_its_record_is_rewritten(reference, small_phantom,
                                                              models, tmp_path):
    """What a kill during a chunk write leaves: a torn chunk and no record (records come last)."""
    out = tmp_path / "torn.zarr"
    settings = tiny(models, block_shape=(8, 64, 128))
    run(small_phantom, output=out, settings=settings, cluster=ClusterSpec(workers=0))
    manifest = out / "volref" / "manifests" / "refine"
    (manifest / "blocks" / "8-16_64-128_128-256.json").unlink()
    (manifest / "done.json").unlink()
    chunk = out / "labels" / "volref-refined" / "s0" / "c" / "1" / "1" / "1"
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])  # torn
    again = run(small_phantom, output=out, settings=settings, cluster=ClusterSpec(workers=0))
    rep = again.report("refine")
    assert (rep.computed, rep.skipped) == (1, 11)
    assert_same(out, reference[2])


def test_disk_full_is_reported_and_resumable(reference, small_phantom, models,
                                             tmp_path, monkeypatch, capsys):
    """Writes of refined chunks fail with ENOSPC after a few succeed (a store wrapper), then
    space comes back and the same command finishes with identical output."""
    import errno

    from zarr.storage import LocalStore

    from volref.engine.runner import BlocksFailedError

    real_set = LocalStore.set
    written = {"n": 0}

    async def full_after_three(self, key, value, *args, **kwargs):
        if "volref-refined/s0/c" in key:
            written["n"] += 1
            if written["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value, *args, **kwargs)

    out = tmp_path / "full.zarr"
    settings = tiny(models, block_shape=(8, 64, 128))
    monkeypatch.setattr(LocalStore, "set", full_after_three)
    with pytest.raises(BlocksFailedError, match="No space left on device") as info:
        run(small_phantom, output=out, settings=settings, cluster=ClusterSpec(workers=0))
    assert 0 < len(info.value.failed) < 12
    done = records(out, "refine")
    monkeypatch.setattr(LocalStore, "set", real_set)
    again = run(small_phantom, output=out, settings=settings, cluster=ClusterSpec(workers=0))
    rep = again.report("refine")
    assert (rep.computed, rep.skipped) == (12 - done, done)
    assert_same(out, reference[2])


def test_measure_resumes_from_itsrecords(reference, small_phantom, models, tmp_path):
    import pandas as pd

    out = tmp_path / "m.zarr"
    settings = tiny(models, block_shape=(8, 64, 128))
    run(small_phantom, output=out, settings=settings, cluster=ClusterSpec(workers=0))
    table = pd.read_parquet(out / "volref" / "metrics.parquet")
    manifest = out / "volref" / "manifests" / "measure"
    (manifest / "done.json").unlink()
    removed = sorted((manifest / "blocks").glob("stats-*.json"))[:5]
    removed += sorted((manifest / "blocks").glob("mito-*.json"))[:1]
    for f in removed:
        f.unlink()
    again = run(small_phantom, output=out, settings=settings, cluster=ClusterSpec(workers=0))
    assert again.report("measure").computed == len(removed)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "volref" / "metrics.parquet"), table)


@pytest.mark.parametrize("case", ["plain zarr array", "2-D image", "5-D with channels",
                                  "bool image", "directory without zarr"])
def test_run_refuses_bad_inputs_and_leaves_them_untouched(bad_inputs, case, capsys):
    path = bad_inputs[case]
    before = tree_digest(path)
    code = main(["-q", "run", str(path), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("volref: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert tree_digest(path) == before


def test_killed_at_every_stage_resumes_to_identical_output(reference, small_phantom, models,
                                                           tmp_path):
    """SIGKILL the run process inside each stage — after a block's chunks are written but
    before its record, or just after the record — then finish with an undisturbed run."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(INLINE_JOB))
    out = tmp_path / "killed.zarr"
    before = tree_digest(small_phantom)
    kills = [("segment", 3, "before", 2), ("refine", 4, "after", 4),
             ("instances", 2, "before", 1), ("measure", 3, "before", 2)]
    for stage, n, when, recorded in kills:
        env = {**os.environ, "VOLREF_FAULT_KILL": f"{stage}:{n}:{when}"}
        proc = subprocess.run([sys.executable, str(script), str(small_phantom), str(out), *models],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert records(out, stage) == recorded, stage
        assert (out / "volref" / "run.lock").exists()  # left behind by the kill: stale
    result = run(small_phantom, output=out, cluster=ClusterSpec(workers=0),
                 settings=tiny(models, block_shape=(8, 64, 128)))
    seg, ref, ins, mea = (result.report(s) for s in ("segment", "refine", "instances", "measure"))
    assert (seg.computed, seg.skipped) == (0, 12)  # finished by the later runs
    assert (ref.computed, ref.skipped) == (0, 12)
    assert (ins.computed, ins.skipped) == (0, 12)
    assert (mea.computed, mea.skipped) == (mea.total - 2, 2)  # only unfinished blocks
    assert_same(out, reference[2])
    assert tree_digest(small_phantom) == before


def test_run_refuses_a_read_only_archive_and_a_group_without_multiscales(phantom_copy,
                                                                         tmp_path, capsys):
    before = tree_digest(phantom_copy)
    for p in [phantom_copy, *phantom_copy.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        assert main(["-q", "run", str(phantom_copy), "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert "read-only" in err and "Traceback" not in err
    finally:
        for p in [phantom_copy, *phantom_copy.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    assert tree_digest(phantom_copy) == before
    group = tmp_path / "group.zarr"
    zarr.open_group(group, mode="w").create_array("s0", shape=(4, 8, 8), dtype="uint8")
    assert main(["-q", "run", str(group), "--workers", "0"]) == 2
    assert "no OME-Zarr 'multiscales' metadata" in capsys.readouterr().err


def test_a_missing_chunk_reads_as_the_fill_value(tmp_path, models):
    data = (np.random.default_rng(2).random((8, 64, 64)) * 1000 + 1).astype(np.uint16)
    img = _image(tmp_path, data)
    (img / "s0" / "c" / "1" / "0" / "1").unlink()  # zarr: an all-fill chunk is not stored
    out = tmp_path / "o.zarr"
    run(img, output=out, cluster=ClusterSpec(workers=0),
        settings=RunSettings(segmenter=models[0], refiner=models[1]))
    assert zarr.open_group(out, mode="r")["labels/volref-refined/s0"].shape == (8, 64, 64)
    assert (zarr.open_group(img, mode="r")["s0"][4:8, 0:32, 32:64] == 0).all()
