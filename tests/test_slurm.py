"""SLURM through dask-jobqueue: ``volref run --cluster cluster/slurm-cpu.yaml`` through real
``sbatch`` jobs on a one-node SLURM (``.ci/setup-slurm.sh``, which CI runs first), and the job
scripts of both shipped SLURM files rendered without submitting."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from tests.helpers import OUTPUTS, cli_tiny
from volref.engine.cluster import close_cluster, load_cluster_file, slurm_options
from volref.errors import ConfigError

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def slurm_missing() -> str | None:
    """Why no SLURM job can run here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (a one-node SLURM: sudo .ci/setup-slurm.sh)"
    info = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True,
                          timeout=30)
    if info.returncode != 0 or not re.search(r"\b(idle|mix|alloc)\b", info.stdout):
        return f"no SLURM node is up (sinfo: {(info.stdout + info.stderr).strip()!r})"
    return None


def render(config: dict, **scheduler_options) -> str:
    """The job script a cluster file's SLURMCluster submits (its scheduler runs on loopback
    while rendering; nothing is submitted)."""
    from dask_jobqueue import SLURMCluster

    options = slurm_options(config)
    options["scheduler_options"] = {**options.get("scheduler_options", {}),
                                    "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
                                    **scheduler_options}
    cluster = SLURMCluster(**options)
    try:
        return cluster.job_script()
    finally:
        close_cluster(cluster)


def worker_command(script: str) -> list[str]:
    """The worker command line of a job script (its last line)."""
    return shlex.split(script.strip().splitlines()[-1])


def test_cpu_job_script_runs_this_python_s_dask_worker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # jobqueue makes the file's log directory here
    script = render(load_cluster_file(CLUSTER / "slurm-cpu.yaml"))
    cmd = worker_command(script)
    assert cmd[:3] == [sys.executable, "-m", "distributed.cli.dask_worker"]
    assert cmd[3].startswith("tcp://127.0.0.1:")
    assert cmd[cmd.index("--nthreads") + 1] == "1"
    assert "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH -e volref-slurm-logs/" in script


def test_gpu_job_script_starts_a_dask_cuda_worker_with_a_gpu_over_tls(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(CLUSTER / "make-certs.sh"), str(certs)], check=True,
                   capture_output=True)
    config = load_cluster_file(CLUSTER / "slurm-gpu.yaml")
    config["security"] = type(config["security"])(str(certs / "ca.pem"),
                                                   str(certs / "volref.pem"),
                                                   str(certs / "volref.key"))
    script = render(config)
    for line in ("#SBATCH -p gpu", "#SBATCH -A my-lab", "#SBATCH --gres=gpu:1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH -t 04:00:00"):
        assert line in script.splitlines(), line
    cmd = worker_command(script)
    assert cmd[:3] == [sys.executable, "-m", "dask_cuda.cli"]
    assert cmd[3].startswith("tls://127.0.0.1:")
    assert " --resources GPU=1" in script and " --protocol tls://" in script
    for flag, name in (("--tls-ca-file", "ca.pem"), ("--tls-cert", "volref.pem"),
                       ("--tls-key", "volref.key")):
        assert cmd[cmd.index(flag) + 1] == str(certs / name)
    # the command runs (without a GPU: its help), and takes every option the script gives it
    helped = subprocess.run([*cmd[:3], "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    given = {a.split("=")[0] for a in cmd[4:] if a.startswith("--")}
    assert given <= set(re.findall(r"(--[a-z][a-z-]+)", helped.stdout)), given


def test_tls_protocol_without_certificates_is_a_clear_error():
    config = load_cluster_file(CLUSTER / "slurm-cpu.yaml")
    config["options"] = {**config["options"], "protocol": "tls://"}
    with pytest.raises(ConfigError, match="security"):
        slurm_options(config)


@pytest.mark.slurm
def test_run_through_real_slurm_jobs_has_the_local_bytes(cluster_phantom, models, cli_reference,
                                                         tmp_path):
    why = slurm_missing()
    if why is not None:
        if os.environ.get("VOLREF_REQUIRE_SLURM"):  # CI: the setup script made it present
            pytest.fail(why)
        pytest.skip(why)
    out = tmp_path / "slurm.zarr"
    volref = Path(sys.executable).parent / "volref"
    proc = subprocess.run([str(volref), "run", str(cluster_phantom), "--output", str(out),
                           "--cluster", str(CLUSTER / "slurm-cpu.yaml"), *cli_tiny(models)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cluster: slurm cluster" in proc.stderr
    root = zarr.open_group(out, mode="r")
    for key in OUTPUTS:
        assert (root[key][:] == cli_reference[key]).all(), key
    # the blocks ran in workers that SLURM jobs started: each job's log (named by its job id)
    # shows the worker address that the manifests record
    logs = {int(m.group(1)): f.read_text()
            for f in (tmp_path / "volref-slurm-logs").glob("*.err")
            if (m := re.search(r"-(\d+)\.err$", f.name))}
    assert logs, list(tmp_path.iterdir())
    started = {a for text in logs.values()
               for a in re.findall(r"Start worker at:\s+(\S+)", text)}
    ran = {json.loads(r.read_text())["worker"] for stage in ("segment", "refine")
           for r in (out / "volref" / "manifests" / stage / "blocks").glob("*.json")}
    assert ran and ran <= started, (ran, started)
