"""The shipped cluster files and the ways into a cluster: TLS between real scheduler and worker
processes on loopback, the Kubernetes pods of ``cluster/kubernetes.yaml`` (no Kubernetes
needed), the local files, and the Python API on a ``distributed.Client`` the caller owns."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers import OUTPUTS, cli_tiny
from volref.engine.cluster import (
    ClusterSpec,
    TLSFiles,
    connect,
    kubernetes_spec,
    load_cluster_file,
    local_options,
)
from volref.errors import ConfigError

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"

#: every file of cluster/ and the test that loads it (a new file needs a test here)
CHECKED = {
    "README.md": "test_the_readme_lists_every_cluster_file",
    "kubernetes.yaml": "test_kubernetes_pods_gpu_on_workers_only",
    "local.yaml": "test_local_file_starts_loopback_workers",
    "local-cuda.yaml": "test_local_cuda_file_gives_dask_cuda_known_options",
    "make-certs.sh": "test_run_on_a_tls_scheduler_with_tls_workers",
    "slurm-cpu.yaml": "tests/test_slurm.py",
    "slurm-gpu.yaml": "tests/test_slurm.py",
}


def test_every_cluster_file_is_checked():
    assert sorted(p.name for p in CLUSTER.iterdir()) == sorted(CHECKED)
    here = Path(__file__).read_text()
    for name, test in CHECKED.items():
        if test.startswith("tests/"):
            assert f'"{name}"' in (Path(__file__).parents[1] / test).read_text(), name
        else:
            assert f"def {test}(" in here, test


def test_the_readme_lists_every_cluster_file():
    readme = (CLUSTER / "README.md").read_text()
    for name in CHECKED:
        if name != "README.md":
            assert f"`{name}`" in readme, name


def test_kubernetes_pods_gpu_on_workers_only():
    from dask_kubernetes.operator import KubeCluster

    config = load_cluster_file(CLUSTER / "kubernetes.yaml")
    spec = kubernetes_spec(config)
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"] == "volref"
    (scheduler,) = spec["spec"]["scheduler"]["spec"]["containers"]
    (worker,) = spec["spec"]["worker"]["spec"]["containers"]
    assert spec["spec"]["worker"]["replicas"] == config["scale"] == 4
    for pod in (scheduler, worker):
        assert pod["image"] == "ghcr.io/my-lab/volref:0.1.0"
        assert {"name": "OMP_NUM_THREADS", "value": "8"} in pod["env"]
    assert scheduler["args"][0] == "dask-scheduler"
    assert "nvidia.com/gpu" not in json.dumps(scheduler["resources"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert worker["args"][:3] == ["dask-cuda-worker", "--resources", "GPU=1"]
    # the worker command is dask-cuda's console script (in the image as it is here)
    assert entry_points(group="console_scripts", name="dask-cuda-worker")
    # and KubeCluster takes the spec and the file's other options
    inspect.signature(KubeCluster).bind(custom_cluster_spec=spec, **config["options"])
    with pytest.raises(ConfigError, match="image's Dask config"):
        kubernetes_spec({**config, "security": TLSFiles("a", "b", "c")})


def test_local_file_starts_loopback_workers():
    config = load_cluster_file(CLUSTER / "local.yaml")
    options = local_options("local", {**config, "dashboard_address": "127.0.0.1:0"})
    assert options["n_workers"] == 2 and options["threads_per_worker"] == 1
    assert options["env"]["OMP_NUM_THREADS"] == "1"
    from distributed import LocalCluster

    cluster = LocalCluster(**options)  # the file's, on a free dashboard port
    try:
        workers = cluster.scheduler_info["workers"]
        assert len(workers) == 2
        assert all(a.startswith("tcp://127.0.0.1:") for a in workers)
        assert {w["memory_limit"] for w in workers.values()} == {8 * 2**30}
    finally:
        cluster.close()


def test_local_cuda_file_gives_dask_cuda_known_options():
    from dask_cuda import LocalCUDACluster
    from distributed import LocalCluster, Nanny

    options = local_options("local-cuda", load_cluster_file(CLUSTER / "local-cuda.yaml"))
    assert options["resources"] == {"GPU": 1} and options["n_workers"] is None
    known = set(inspect.signature(LocalCUDACluster).parameters)
    for cls in (LocalCluster, Nanny):  # it passes the rest on, down to each worker's nanny
        known |= set(inspect.signature(cls).parameters)
    assert set(options) <= known, set(options) - known


# ------------------------------------------------------------------------------ TLS on loopback

def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([str(Path(sys.executable).parent / "dask"), *args], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_run_on_a_tls_scheduler_with_tls_workers(cluster_phantom, models, cli_reference,
                                                 tmp_path):
    from distributed import Client

    certs = tmp_path / "certs"
    subprocess.run(["sh", str(CLUSTER / "make-certs.sh"), str(certs)], check=True,
                   capture_output=True)
    tls = TLSFiles(str(certs / "ca.pem"), str(certs / "volref.pem"), str(certs / "volref.key"))
    flags = ["--tls-ca-file", tls.ca_file, "--tls-cert", tls.cert, "--tls-key", tls.key]
    sched_file = tmp_path / "scheduler.json"
    procs = [_start(["scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--scheduler-file", str(sched_file), *flags],
                    tmp_path / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:")
        for name, extra in (("gpu", ["--resources", "GPU=1"]), ("cpu", [])):
            procs.append(_start(["worker", address, "--nthreads", "1", "--no-dashboard",
                                 "--name", name, "--host", "127.0.0.1", *flags, *extra],
                                tmp_path / f"{name}.log"))
        with Client(address, security=tls.security(), timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
            gpu = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                       if "GPU" in (w.get("resources") or {}))
        assert gpu.startswith("tls://")
        volref = str(Path(sys.executable).parent / "volref")
        base = [volref, "run", str(cluster_phantom), "--scheduler", address]
        # without the certificates: a one-line error (exit 2 on the command line), not a hang
        with pytest.raises(ConfigError, match="needs TLS files"), \
                connect(ClusterSpec(scheduler=address)):
            pass
        out = tmp_path / "tls.zarr"
        proc = subprocess.run([*base, "--output", str(out), *flags, *cli_tiny(models)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"scheduler {address} (2 workers)" in proc.stderr
    finally:
        _stop(procs)
    root = zarr.open_group(out, mode="r")
    for key in OUTPUTS:
        np.testing.assert_array_equal(root[key][:], cli_reference[key], err_msg=key)
    for stage in ("segment", "refine"):  # model tasks on the GPU-resource worker, over TLS
        recs = (out / "volref" / "manifests" / stage / "blocks").glob("*.json")
        assert {json.loads(r.read_text())["worker"] for r in recs} == {gpu}, stage


# ------------------------------------------------------------------------------ the Python API

def test_api_runs_on_a_client_it_is_given_and_leaves_it_open(cluster_phantom, models,
                                                             cli_reference, tmp_path):
    from distributed import Client, LocalCluster

    import volref

    seg, mae = models
    settings = volref.RunSettings(segmenter=seg, refiner=mae,
                                  refine=volref.RefineSettings(tau=0.3, stride=16))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        out = tmp_path / "api.zarr"
        result = volref.run(cluster_phantom, out, client=client, settings=settings)
        assert result.cluster.startswith("the given client's scheduler")
        assert [r.stage for r in result.reports] == ["segment", "refine", "instances", "measure"]
        assert client.status == "running"  # not closed: it is the caller's
        again = volref.measure(cluster_phantom, out, client=client, settings=settings)
        assert [r.stage for r in again.reports] == ["measure"] and again.reports[0].skipped
        with pytest.raises(ConfigError, match="not both"):
            volref.run(cluster_phantom, out, client=client, workers=0)
    # the command line is a layer over the API: the same bytes as `volref run`
    root = zarr.open_group(out, mode="r")
    for key in OUTPUTS:
        np.testing.assert_array_equal(root[key][:], cli_reference[key], err_msg=key)


def test_api_cluster_argument():
    from volref.api import cluster_spec

    assert cluster_spec("tls://h:8786").scheduler == "tls://h:8786"
    assert cluster_spec(CLUSTER / "local.yaml").cluster_file == str(CLUSTER / "local.yaml")
    assert cluster_spec(workers=0) == ClusterSpec(workers=0)
    with pytest.raises(ConfigError, match="not both"):
        cluster_spec("tcp://h:8786", workers=2)


def test_import_volref_stays_cheap():
    code = ("import sys, volref; "
            "sys.exit(sum(m in sys.modules for m in ('torch', 'distributed', 'zarr')))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
