"""Where the blocks run: a local Dask cluster sized to the machine, an existing scheduler, or a
cluster described by a YAML file (``cluster/*.yaml``).

=====================  =====================================================================
choice                 cluster
=====================  =====================================================================
``workers=0``          no cluster: blocks run one by one in this process (debugging)
default, no GPU        ``LocalCluster``: one single-threaded worker process per core
default, GPUs          dask-cuda ``LocalCUDACluster``: one worker per GPU, ``GPU=1`` resource
``scheduler=ADDRESS``  join a running scheduler (``dask scheduler`` / ``dask worker``)
``cluster=FILE``       ``kind: local | local-cuda | slurm | kubernetes`` plus its options
=====================  =====================================================================

Local schedulers and dashboards listen on 127.0.0.1 only, unless a cluster file says otherwise.
Worker processes get ``OMP_NUM_THREADS`` = their thread count, so the model libraries do not
oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volref.errors import ConfigError, VolrefError
from volref.files import read_small_file

log = logging.getLogger(__name__)

KINDS = ("local", "local-cuda", "slurm", "kubernetes")


@dataclass(frozen=True)
class ClusterSpec:
    workers: int | None = None  # None: one per core (per GPU with GPUs); 0: in this process
    scheduler: str | None = None
    cluster_file: str | None = None
    gpus: int = 0  # GPUs on this machine (the caller detects them)
    threads_per_worker: int = 1
    memory_limit: str | None = None

    def __post_init__(self) -> None:
        if self.scheduler and self.cluster_file:
            raise ConfigError("give --scheduler or --cluster, not both")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must be >= 0")


@dataclass
class Connection:
    client: Any | None  # distributed.Client, or None for in-process
    description: str
    dashboard: str | None = None


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def connect(spec: ClusterSpec) -> Iterator[Connection]:
    """Start or join the cluster ``spec`` describes; closes what it started on exit."""
    if spec.scheduler:
        yield from _join(spec.scheduler)
        return
    if spec.cluster_file:
        config = load_cluster_file(spec.cluster_file)
        with _start(config) as conn:
            yield conn
        return
    if spec.workers == 0:
        yield Connection(None, "in this process, one block at a time")
        return
    if spec.gpus > 0:
        config = {"kind": "local-cuda", "workers": spec.workers or spec.gpus}
    else:
        n = spec.workers or max(1, cores() // spec.threads_per_worker)
        config = {"kind": "local", "workers": n, "threads_per_worker": spec.threads_per_worker}
    if spec.memory_limit:
        config["memory_limit"] = spec.memory_limit
    with _start(config) as conn:
        yield conn


def _join(address: str) -> Iterator[Connection]:
    from distributed import Client

    from volref.io.store import redact

    try:
        client = Client(address, timeout="20s")
    except (OSError, ValueError, TypeError, TimeoutError) as exc:
        raise VolrefError(f"cannot reach the Dask scheduler at {redact(address)}: "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        yield Connection(client, f"scheduler {address} ({n} workers)", client.dashboard_link)
    finally:
        client.close()


#: what each kind of cluster file may say, and the types its values must have
_LOCAL_KEYS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "workers": (int, type(None)), "threads_per_worker": (int,),
    "host": (str,), "dashboard_address": (str, type(None)), "memory_limit": (str, int, float)}
_BATCH_KEYS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "options": (dict,), "scale": (int,), "wait": (str, int, float)}


def load_cluster_file(path: str | os.PathLike) -> dict[str, Any]:
    """A cluster file, read and checked: its kind, its keys and their types (a file this cannot
    describe is one line naming what is wrong, not a traceback from the cluster library)."""
    import yaml

    p = Path(path)
    try:
        text = read_small_file(p, "cluster file").decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"cluster file {p} is not text (UTF-8)") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster file {p} is not valid YAML: {exc}") from None
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        raise ConfigError(f"cluster file {p} needs 'kind: {' | '.join(KINDS)}'")
    allowed = _LOCAL_KEYS if config["kind"] in ("local", "local-cuda") else _BATCH_KEYS
    for key, value in config.items():
        if key not in allowed:
            raise ConfigError(f"cluster file {p}: unknown key {key!r} for kind "
                              f"{config['kind']} (known: {', '.join(sorted(allowed))})")
        if isinstance(value, bool) or not isinstance(value, allowed[key]):
            raise ConfigError(f"cluster file {p}: {key} has the wrong type ({value!r})")
    for key, lo, hi in (("workers", 0, 4096), ("threads_per_worker", 1, 1024),
                        ("scale", 0, 100_000)):
        value = config.get(key)
        if isinstance(value, int) and not lo <= value <= hi:
            raise ConfigError(f"cluster file {p}: {key} must be in [{lo}, {hi}], got {value}")
    if isinstance(config.get("options"), dict) and not all(
            isinstance(k, str) for k in config["options"]):
        raise ConfigError(f"cluster file {p}: option names must be text")
    return config


@contextlib.contextmanager
def _start(config: dict[str, Any]) -> Iterator[Connection]:
    config = dict(config)
    kind = config.pop("kind")
    try:
        cluster = _local(kind, config) if kind in ("local", "local-cuda") else _batch(kind, config)
    except (TypeError, ValueError) as exc:  # options the cluster library does not take
        raise ConfigError(f"cannot start the {kind} cluster: {type(exc).__name__}: {exc}") \
            from None
    from distributed import Client

    try:
        client = Client(cluster)
        if kind not in ("local", "local-cuda"):
            n = int(config.get("scale", 1))
            cluster.scale(n)
            client.wait_for_workers(1, timeout=config.get("wait", "600s"))
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        yield Connection(client, f"{kind} cluster ({n} workers)", client.dashboard_link)
    finally:
        with contextlib.suppress(Exception):
            client.close()
        close_cluster(cluster)


def close_cluster(cluster) -> None:
    """Close a cluster volref started. By now its work is written (or has failed): a worker
    process slow to exit — a loaded or niced machine — must neither turn a finished run into an
    error nor hide the error on its way out, so a timeout while stopping is a warning, and the
    local worker processes still alive then are killed."""
    pids = _worker_pids(cluster)
    try:
        cluster.close()
    except TimeoutError:
        killed = 0
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        log.warning("the cluster's workers did not stop in time; killed %d worker process(es) "
                    "still running", killed)


def _worker_pids(cluster) -> list[int]:
    """Process ids of a local cluster's worker processes (none for batch clusters)."""
    pids = []
    for nanny in getattr(cluster, "workers", {}).values():
        pid = getattr(getattr(nanny, "process", None), "pid", None)
        if isinstance(pid, int):
            pids.append(pid)
    return pids


def _local(kind: str, config: dict[str, Any]):
    workers = int(config.pop("workers", 0) or 0) or None
    threads = int(config.pop("threads_per_worker", 1))
    common = {
        "host": config.pop("host", "127.0.0.1"),
        "dashboard_address": config.pop("dashboard_address", "127.0.0.1:0"),
        "threads_per_worker": threads,
        "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        **config,
    }
    if kind == "local":
        from distributed import LocalCluster

        return LocalCluster(n_workers=workers or max(1, cores() // threads), processes=True,
                            **common)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ConfigError(f"a local-cuda cluster needs dask-cuda: {exc}") from None
    common["env"] = {}  # GPU workers feed the device; leave their CPU threads alone
    return LocalCUDACluster(n_workers=workers, resources={"GPU": 1}, **common)


def _batch(kind: str, config: dict[str, Any]):
    options = dict(config.get("options", {}))
    if kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError("a slurm cluster needs dask-jobqueue (pip install dask-jobqueue)") \
                from None
        return SLURMCluster(**options)
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError("a kubernetes cluster needs dask-kubernetes "
                          "(pip install dask-kubernetes)") from None
    return KubeCluster(**options)


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_memory(client) -> dict[str, int]:
    """Peak resident memory (bytes) of every worker process since it started."""
    if client is None:
        return {"this process": _max_rss()}
    return client.run(_max_rss)
