"""The engine's parts on their own: block grid, manifests, cross-block instance merging, the
in-process runner."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from volref.engine.cluster import close_cluster
from volref.engine.grid import BlockGrid, plan_blocks
from volref.engine.manifest import Manifest
from volref.engine.runner import (
    BlocksFailedError,
    BlocksRefusedError,
    BlockTask,
    Executor,
    batch_size,
    run_blocks,
)
from volref.errors import ConfigError, ImageDataError
from volref.pipeline.blocks import Source
from volref.pipeline.instances import group_pairs, group_shape, group_summary, group_task
from volref.stages.instances import STRUCTURE, label_block, resolve

shapes = st.tuples(st.integers(1, 40), st.integers(1, 70), st.integers(1, 70))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, block=st.tuples(st.integers(1, 16), st.integers(1, 32), st.integers(1, 32)))
def test_blocks_cover_every_voxel_exactly_once(shape, block):
    grid = BlockGrid(shape, block)
    count = np.zeros(shape, dtype=np.int32)
    for b in grid:
        assert all(0 <= a < z <= n for a, z, n in zip(b.start, b.stop, shape))
        count[b.slices] += 1
    assert (count == 1).all()
    assert len(grid) == len(list(grid))


def test_plan_blocks_checks_alignment():
    grid = plan_blocks((40, 1000, 1000), (20, 256, 256), 128)
    assert grid.block == (20, 512, 512)
    assert plan_blocks((40, 1000, 1000), (20, 64, 64), 256, (40, 256, 768)).block == (40, 256, 768)
    with pytest.raises(ConfigError, match="multiple of 256"):
        plan_blocks((40, 1000, 1000), (20, 64, 64), 256, (20, 128, 256))
    with pytest.raises(ConfigError, match="z = 10"):
        plan_blocks((40, 1000, 1000), (20, 256, 256), 128, (10, 256, 256))
    # a block covering a whole axis may be any size
    assert plan_blocks((40, 100, 1000), (20, 64, 64), 128, (40, 100, 256)).block[1] == 100


def test_source_reads_past_the_volume(tmp_path):
    data = np.arange(2 * 5 * 6, dtype=np.uint16).reshape(2, 5, 6)
    arr = zarr.create_array(tmp_path / "a.zarr", data=data, chunks=(1, 2, 4))
    src = Source(arr)
    np.testing.assert_array_equal(src.read((0, -3, -2), (2, 8, 9), "mirror"),
                                  np.pad(data, ((0, 0), (3, 3), (2, 3)), mode="symmetric"))
    np.testing.assert_array_equal(src.read((-1, -3, -2), (2, 8, 9), "constant"),
                                  np.pad(data, ((1, 0), (3, 3), (2, 3))))


def test_manifest_resume_refuse_and_torn_records(tmp_path):
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    meta = root.require_group("volref")
    m = Manifest(meta, "segment")
    m.begin({"tau": 0.4}, overwrite=False)
    m.record("0-1_0-1_0-1", {"seconds": 1})
    assert set(m.finished()) == {"0-1_0-1_0-1"}
    # a torn record (killed while writing) is not finished
    (tmp_path / "s.zarr/volref/manifests/segment/blocks/1-2_0-1_0-1.json").write_text('{"blo')
    assert set(m.finished()) == {"0-1_0-1_0-1"}
    m.begin({"tau": 0.4}, overwrite=False)  # same settings: resume
    assert set(m.finished()) == {"0-1_0-1_0-1"}
    with pytest.raises(ConfigError, match="--overwrite"):
        m.begin({"tau": 0.5}, overwrite=False)
    m.begin({"tau": 0.5}, overwrite=True)
    assert m.finished() == {}


def test_a_finished_stage_reads_its_records_from_the_index_but_the_files_decide(tmp_path):
    from volref.io.store import read_file

    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    m = Manifest(root.require_group("volref"), "refine")
    m.begin({"tau": 0.4}, overwrite=False)
    keys = [f"0-1_0-1_{i}-{i + 1}" for i in range(5)]
    for i, key in enumerate(keys):
        m.record(key, {"seconds": i})
    before = m.finished()
    m.mark_done({"blocks": 5})
    blocks = tmp_path / "s.zarr/volref/manifests/refine/blocks"
    index = tmp_path / "s.zarr/volref/manifests/refine/index.json"
    assert json.loads(index.read_text()) == before
    # records come from the index: a file rewritten by hand while it is listed is not read
    (blocks / f"{keys[0]}.json").write_text('{"block": "x", "seconds": 99}')
    assert m.finished() == before
    # a record deleted by hand is not finished: the index that lists it is ignored (not
    # deleted: reading writes nothing), and the next index is read from the files
    (blocks / f"{keys[1]}.json").unlink()
    assert set(m.finished()) == set(keys) - {keys[1]}
    assert m.finished()[keys[0]]["seconds"] == 99 and index.exists()
    m.record(keys[1], {"seconds": 7})
    m.mark_done({"blocks": 5})
    assert json.loads(index.read_text())[keys[1]]["seconds"] == 7
    # forget, undo and a torn index drop it: the files are read again
    m.forget([keys[2]])
    assert not index.exists() and not m.done
    assert set(m.finished()) == set(keys) - {keys[2]}
    m.mark_done({"blocks": 4})
    index.write_text('{"0-1_0-')
    assert set(m.finished()) == set(keys) - {keys[2]}
    assert read_file(m.group, f"{m.prefix}/done.json") is not None


class _MaskSource:
    """A numpy mask as the refined labels a job reads (``!= 0`` is the mitochondrion)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask.astype(np.uint8)

    def read(self, start, stop, mode):
        return self.mask[tuple(slice(a, b) for a, b in zip(start, stop))]


def _labels_by_blocks(mask: np.ndarray, block, min_voxels: int = 0, group=(1, 1, 1)):
    """Run the whole instance scheme of the stage on a numpy mask: groups of blocks labelled
    and paired inside (``group`` blocks a side), pairs between neighbouring groups, the merge,
    each block relabelled with its table."""
    grid = BlockGrid(mask.shape, block)
    groups = BlockGrid(grid.counts, group)
    job = SimpleNamespace(refined=_MaskSource(mask), volume=mask.shape)
    labelled = {g.index: group_task(job, grid, g) for g in groups}
    summaries, edges = [None] * len(grid), []
    for g in groups:
        found, inside = group_summary(labelled[g.index])
        for number, summary in found.items():
            summaries[number] = summary
        edges += inside
    for low, high, axis in groups.neighbours():
        edges += group_pairs(labelled[low.index], labelled[high.index], grid, high, axis)
    tables, n = resolve(summaries, edges, min_voxels)
    out = np.zeros(mask.shape, dtype=np.uint32)
    for b, table in zip(grid, tables):
        local, _ = label_block(mask[b.slices])
        out[b.slices] = table[local]
    return out, n


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), fill=st.floats(0.2, 0.6),
       block=st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(1, 9)),
       group=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
def test_instances_across_blocks_equal_scipy_on_the_whole_volume(seed, fill, block, group):
    rng = np.random.default_rng(seed)
    mask = rng.random((7, 13, 11)) < fill
    expected, n_expected = ndimage.label(mask, structure=STRUCTURE)
    got, n = _labels_by_blocks(mask, block, group=group)
    assert n == n_expected
    # scipy numbers components by their first voxel in raster order, as volref does
    np.testing.assert_array_equal(got, expected)


def test_groups_of_blocks_hold_a_bounded_volume_and_spread_over_the_workers():
    assert group_shape((10, 10, 10), 2 * 32 * 32, 2) == (4, 4, 4)  # 4 groups a worker: <= 125 blocks
    assert group_shape((40, 50, 50), 2 * 32 * 32, 2) == (16, 16, 32)  # <= 12,500 blocks
    assert group_shape((4, 4, 4), 32 * 512 * 512, 1) == (1, 2, 2)  # 2**25 voxels: 4 blocks
    assert group_shape((1, 3, 3), 100, 8) == (1, 1, 1)  # fewer blocks than workers
    assert group_shape((1, 1, 40), 64, 1) == (1, 1, 8)  # thin grids grow along what they have


def test_a_mitochondrion_across_four_blocks_keeps_one_id():
    mask = np.zeros((4, 20, 20), dtype=bool)
    mask[1:3, 5:15, 5:15] = True  # crosses the y and x block faces at 10
    mask[0, 0, 0] = True
    got, n = _labels_by_blocks(mask, (4, 10, 10))
    assert n == 2
    assert set(np.unique(got[1:3, 5:15, 5:15])) == {2} and got[0, 0, 0] == 1


def _ok(x):
    return x * 2


def _fail_on(x):
    if x == 3:
        raise ValueError("boom")
    return x


def test_inline_runner_skips_finished_and_summarises_failures():
    ex = Executor(None)
    tasks = [BlockTask(str(i), _ok, (i,)) for i in range(5)]
    events = []
    rep = run_blocks(ex, "s", tasks, {"0": {"x": 1}}, events.append)
    assert rep.skipped == 1 and rep.computed == 4 and rep.results["4"] == 8
    assert events[-1]["event"] == "end" and events[0]["done"] == 1
    with pytest.raises(BlocksFailedError, match="1 block\\(s\\) failed: 3: ValueError: boom"):
        run_blocks(ex, "s", [BlockTask(str(i), _fail_on, (i,)) for i in range(5)])


def _refuse_odd(x):
    if x % 2:
        raise ImageDataError(f"bad voxels in {x}")
    if x == 4:
        raise ValueError("boom")
    return x


def test_blocks_that_refuse_their_input_are_one_line_without_an_error_log(caplog):
    """A user's error (a :class:`VolrefError`) from blocks is the run's one line, the first in
    block order, with no ERROR log line; a crash beside it is still logged."""
    ex = Executor(None)
    with caplog.at_level(logging.DEBUG, logger="volref.engine.runner"), \
            pytest.raises(BlocksRefusedError) as info:
        run_blocks(ex, "s", [BlockTask(str(i), _refuse_odd, (i,)) for i in range(6)])
    assert str(info.value) == "s: bad voxels in 1 (and 3 more block(s))"
    assert isinstance(info.value.__cause__, ImageDataError)
    assert isinstance(info.value, BlocksFailedError) and sorted(info.value.failed) == [
        "1", "3", "4", "5"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["s block 4 failed: ValueError('boom')"]


def test_on_a_cluster_a_refusal_is_not_retried_nor_logged_by_the_worker(caplog):
    """On Dask workers a refusal comes back as a value: no retry (it cannot help), no "Compute
    Failed" log line of the worker, the same one line as in this process."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client, \
            caplog.at_level(logging.INFO), pytest.raises(BlocksRefusedError) as info:
        run_blocks(Executor(client), "s", [BlockTask(str(i), _refuse_odd, (i,))
                                           for i in range(6)])
    assert str(info.value) == "s: bad voxels in 1 (and 3 more block(s))"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    worker = [r for r in errors if "failed after 3 tries" in r.getMessage()]  # retried, then
    assert len(worker) == 1 and "boom" in str(worker[0].exc_info[1])  # logged with its traceback
    assert [r.getMessage() for r in errors if r not in worker] == [
        "s block 4 failed: ValueError('boom')"]
    assert not any("bad voxels" in r.getMessage() for r in errors)


def _where(x, fail):
    from distributed import get_worker

    if x == fail:
        raise ValueError("boom")
    return x * 2, get_worker().get_current_task()


def test_on_a_cluster_quick_blocks_share_tasks_and_each_keeps_its_own_result(caplog):
    """Thousands of quick blocks must not cost a task each: after the first tasks measure a
    block's time, blocks go in batches; each block keeps its result, and one that fails is
    reported alone (the others of its batch are kept)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        ex = Executor(client)
        rep = run_blocks(ex, "s", [BlockTask(str(i), _where, (i, -1)) for i in range(400)])
        assert [rep.results[str(i)][0] for i in range(400)] == [2 * i for i in range(400)]
        tasks = {v[1] for v in rep.results.values()}
        assert len(tasks) < 40  # ~ MIN_WINDOW single blocks, then batches
        events: list[dict] = []
        with caplog.at_level(logging.INFO), pytest.raises(BlocksFailedError) as info:
            run_blocks(ex, "s", [BlockTask(str(i), _where, (i, 150)) for i in range(400)],
                       observer=events.append)
    assert sorted(info.value.failed) == ["150"]
    blocks = [e for e in events if e["event"] == "block"]
    assert len(blocks) == 400 and sum(not e["ok"] for e in blocks) == 1
    assert events[-1]["computed"] == 399 and events[-1]["failed"] == 1


def test_batches_are_sized_from_a_blocks_measured_time():
    assert batch_size(None, 1000, 4) == 1  # nothing measured yet
    assert batch_size(2.0, 1000, 4) == 1  # slow blocks: one a task
    assert batch_size(0.01, 1000, 4) == 100  # about a second of work
    assert batch_size(1e-5, 10**6, 4) == 256  # capped
    assert batch_size(1e-5, 40, 4) == 10  # the window stays busy to the end
    assert batch_size(1e-5, 2, 4) == 1


def test_a_cluster_slow_to_stop_is_a_warning_and_its_workers_are_killed(caplog):
    # seen on a loaded machine: every block written, then LocalCluster.close() timed out
    # waiting for a niced worker to exit and the finished command ended in a traceback
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    class SlowToStop:
        workers = {"w0": SimpleNamespace(process=SimpleNamespace(pid=worker.pid))}

        def close(self):
            raise TimeoutError

    try:
        close_cluster(SlowToStop())
        assert worker.wait(timeout=10) == -9
    finally:
        worker.kill()
    assert "killed 1 worker process(es)" in caplog.text


def test_specks_are_dropped_by_their_merged_size():
    mask = np.zeros((4, 20, 20), dtype=bool)
    mask[0:4, 2:18, 9:11] = True  # 128 voxels, cut into 4 pieces of 32 by the blocks
    mask[2, 0, 0] = mask[3, 19, 19] = True  # specks
    got, n = _labels_by_blocks(mask, (2, 10, 10), min_voxels=50)
    assert n == 1 and set(np.unique(got)) == {0, 1}
    assert (got[mask] == 1).sum() == 128


def test_allocator_pins_glibc_thresholds_and_tasks_release_memory(monkeypatch):
    import platform

    from volref.engine import allocator, runner

    pinned = allocator.steady_allocator()
    if platform.libc_ver()[0] == "glibc":
        assert pinned == {"mmap_threshold": 32 << 20, "trim_threshold": 64 << 20}
        assert allocator.release_free_memory() in (True, False)  # malloc_trim ran
    released = []
    monkeypatch.setattr(runner, "release_free_memory", lambda: released.append(1) or True)
    assert runner.run_task(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):  # released after a failing task too
        runner.run_task(lambda: 1 / 0)
    assert released == [1, 1]


def test_kernel_caches_capped_keep_memory_flat_over_many_shapes(tmp_path):
    """The MAE gives its matrix products a new shape almost every tile; with the caps, memory
    nearly stops growing once the caches are full (here after 100 shapes; uncapped it grows ~0.6 MiB
    a shape, up to 1024 of them; measured 3-19 MiB against 18-190 MiB over 300 shapes)."""
    import subprocess
    import sys

    from volref.engine.allocator import KERNEL_CACHES

    script = tmp_path / "shapes.py"
    script.write_text(
        "import os, sys, torch\n"
        "from volref.engine.allocator import bounded_kernel_caches\n"
        "print(bounded_kernel_caches(), file=sys.stderr)\n"
        "torch.set_num_threads(1)\n"
        "lin = torch.nn.Linear(128, 384).to(torch.bfloat16)\n"
        "page = os.sysconf('SC_PAGE_SIZE')\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
        "with torch.no_grad():\n"
        "    for m in range(1, 101):  # fill the caps\n"
        "        lin(torch.zeros(1, m, 128, dtype=torch.bfloat16))\n"
        "    before = rss()\n"
        "    for m in range(101, 401):\n"
        "        lin(torch.zeros(1, m, 128, dtype=torch.bfloat16))\n"
        "print(rss() - before)\n")
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHES}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         check=True)
    assert "'64'" in out.stderr
    grown = int(out.stdout.split()[-1]) / 2**20
    # the promise: memory stays nearly flat with the caps (how much the default grows depends on
    # the machine's oneDNN: 190 MiB here, 18 MiB on the CI machine; a loaded machine adds noise)
    assert grown < 64, grown
