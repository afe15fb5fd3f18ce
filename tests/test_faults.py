"""Faults on a real cluster: a worker process SIGKILLed in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.test_pipeline import (  # noqa: F401 (fixtures)
    _dask,
    _records,
    assert_same,
    models,
    reference,
    stop,
)

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
                             block_shape=(20, 64, 128)))
"""


def test_worker_killed_mid_run_output_identical(reference, small_phantom, models,  # noqa: F811
                                                tmp_path):
    sched_file = tmp_path / "scheduler.json"
    procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                   "--scheduler-file", str(sched_file), log=tmp_path / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        workers = [_dask("worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                         "--no-dashboard", "--no-nanny", "--host", "127.0.0.1", "--name", name,
                         log=tmp_path / f"{name}.log") for name in ("w1", "w2")]
        procs += workers
        address = json.loads(sched_file.read_text())["address"]
        script = tmp_path / "job.py"
        script.write_text(textwrap.dedent(SCRIPT))
        out = tmp_path / "faulty.zarr"
        with (tmp_path / "run.log").open("w") as log:
            job = subprocess.Popen([sys.executable, str(script), str(small_phantom), str(out),
                                    *models, address], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while _records(out, "segment") < 3:  # some blocks done, most still to come
            assert job.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(workers[1].pid, signal.SIGKILL)
        assert job.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()
        assert _records(out, "segment") == 12 and _records(out, "refine") == 12
        assert_same(out, reference[2])
    finally:
        stop(procs)
