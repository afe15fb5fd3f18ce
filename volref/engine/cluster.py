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
``client=CLIENT``      a ``distributed.Client`` the caller owns (a notebook's); never closed
=====================  =====================================================================

Local schedulers and dashboards listen on 127.0.0.1 only, unless a cluster file says otherwise.
Worker processes get ``OMP_NUM_THREADS`` = their thread count, so the model libraries do not
oversubscribe the cores.

TLS: a cluster file's ``security:`` block (``ca_file``, ``cert``, ``key``; see
``cluster/make-certs.sh``) or :class:`TLSFiles` on a :class:`ClusterSpec` that joins a
``tls://`` scheduler. One certificate signed by the CA serves client, scheduler and workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from volref.classes import counted
from volref.errors import ConfigError, VolrefError
from volref.files import read_small_file

if TYPE_CHECKING:
    from distributed import Security
    from distributed.deploy import Cluster

log = logging.getLogger(__name__)

KINDS = ("local", "local-cuda", "slurm", "kubernetes")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for TLS between client, scheduler and workers.

    Parameters
    ----------
    ca_file
        The certificate authority every party trusts.
    cert, key
        A certificate signed by ``ca_file`` and its private key; used for every role (client,
        scheduler, worker), as ``cluster/make-certs.sh`` makes them.
    """

    ca_file: str
    cert: str
    key: str

    @classmethod
    def from_config(cls, block: Any, base: Path | None = None) -> TLSFiles:
        """From a cluster file's ``security:`` block; ``~`` and ``$VARS`` are expanded and
        relative paths are relative to ``base`` (the cluster file's folder)."""
        if not isinstance(block, dict) or set(block) != {"ca_file", "cert", "key"}:
            raise ConfigError("a cluster file's 'security:' needs exactly ca_file, cert and key")
        paths = {}
        for name, value in block.items():
            path = Path(os.path.expandvars(os.path.expanduser(str(value))))
            paths[name] = str(path if path.is_absolute() or base is None else base / path)
        return cls(**paths)

    def security(self) -> Security:
        """The ``distributed.Security`` of these files (encryption required)."""
        from distributed import Security

        for name in ("ca_file", "cert", "key"):
            if not Path(getattr(self, name)).is_file():
                raise ConfigError(f"TLS {name} {getattr(self, name)} does not exist (make a set "
                                  "with cluster/make-certs.sh)")
        return Security(tls_ca_file=self.ca_file, require_encryption=True,
                        tls_client_cert=self.cert, tls_client_key=self.key,
                        tls_scheduler_cert=self.cert, tls_scheduler_key=self.key,
                        tls_worker_cert=self.cert, tls_worker_key=self.key)


@dataclass(frozen=True)
class ClusterSpec:
    """Where the blocks run (see the module doc).

    Parameters
    ----------
    workers
        Local worker processes: None, one per core (one per GPU with GPUs); 0, none: blocks run
        one by one in this process.
    scheduler
        Address of a running scheduler to join (``tcp://host:8786``, ``tls://host:8786``).
    cluster_file
        A cluster file (``cluster/*.yaml``) to start.
    gpus
        GPUs on this machine (the caller detects them).
    threads_per_worker, memory_limit
        Of each local worker.
    tls
        Certificates for a ``tls://`` scheduler.
    """

    workers: int | None = None
    scheduler: str | None = None
    cluster_file: str | None = None
    gpus: int = 0
    threads_per_worker: int = 1
    memory_limit: str | None = None
    tls: TLSFiles | None = None

    def __post_init__(self) -> None:
        if self.scheduler and self.cluster_file:
            raise ConfigError("give --scheduler or --cluster, not both")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must be >= 0")
        if self.tls is not None and not self.scheduler:
            raise ConfigError("TLS files go with --scheduler tls://...; a cluster file has its "
                              "own 'security:' block")


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
def connect(spec: ClusterSpec, client: Any | None = None) -> Iterator[Connection]:
    """Start or join the cluster ``spec`` describes; closes what it started on exit.

    With ``client`` (a ``distributed.Client`` the caller owns), ``spec`` is ignored and the
    client is used as it is: volref never closes it.
    """
    if client is not None:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        yield Connection(client, f"the given client's scheduler {client.scheduler.address} "
                                 f"({counted(n, 'worker', 'workers')})", client.dashboard_link)
        return
    if spec.scheduler:
        yield from _join(spec.scheduler, spec.tls)
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


def _join(address: str, tls: TLSFiles | None = None) -> Iterator[Connection]:
    import dask
    from distributed import Client

    from volref.io.store import redact

    if tls is None and address.startswith("tls://") and \
            not dask.config.get("distributed.comm.tls.ca-file", None):
        raise ConfigError(f"{redact(address)} needs TLS files (--tls-ca-file, --tls-cert, "
                          "--tls-key, or distributed.comm.tls in the Dask config)")
    security = tls.security() if tls is not None else None  # None: the Dask config's
    try:
        client = Client(address, timeout="20s", security=security)
    except (OSError, ValueError, TypeError, TimeoutError) as exc:
        raise VolrefError(f"cannot reach the Dask scheduler at {redact(address)}: "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        yield Connection(client, f"scheduler {address} ({counted(n, 'worker', 'workers')})", client.dashboard_link)
    finally:
        client.close()


#: what each kind of cluster file may say, and the types its values must have
_LOCAL_KEYS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "workers": (int, type(None)), "threads_per_worker": (int,),
    "host": (str,), "dashboard_address": (str, type(None)), "memory_limit": (str, int, float),
    "security": (dict,)}
_BATCH_KEYS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "options": (dict,), "scale": (int,), "wait": (str, int, float),
    "security": (dict,)}
_KUBE_KEYS: dict[str, tuple[type, ...]] = {
    **_BATCH_KEYS, "name": (str,), "image": (str,), "env": (dict,), "scheduler": (dict,),
    "worker": (dict,)}


def load_cluster_file(path: str | os.PathLike[str]) -> dict[str, Any]:
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
    allowed = (_LOCAL_KEYS if config["kind"] in ("local", "local-cuda")
               else _KUBE_KEYS if config["kind"] == "kubernetes" else _BATCH_KEYS)
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
    if "security" in config:
        config["security"] = TLSFiles.from_config(config["security"], p.resolve().parent)
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
        yield Connection(client, f"{kind} cluster ({counted(n, 'worker', 'workers')})", client.dashboard_link)
    finally:
        with contextlib.suppress(Exception):
            client.close()
        close_cluster(cluster)


def close_cluster(cluster: Any) -> None:
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


def _worker_pids(cluster: Any) -> list[int]:
    """Process ids of a local cluster's worker processes (none for batch clusters)."""
    pids = []
    for nanny in getattr(cluster, "workers", {}).values():
        pid = getattr(getattr(nanny, "process", None), "pid", None)
        if isinstance(pid, int):
            pids.append(pid)
    return pids


def _local(kind: str, config: dict[str, Any]) -> Cluster:
    options = local_options(kind, config)
    if kind == "local":
        from distributed import LocalCluster

        return LocalCluster(**options)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ConfigError(f"a local-cuda cluster needs dask-cuda: {exc}") from None
    # dask-cuda ships no types; LocalCUDACluster is a distributed LocalCluster
    return cast("Cluster", LocalCUDACluster(**options))


def local_options(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The ``LocalCluster`` (``kind: local``) or ``LocalCUDACluster`` (``local-cuda``)
    arguments of a cluster file's settings."""
    config = {k: v for k, v in config.items() if k != "kind"}
    workers = int(config.pop("workers", 0) or 0) or None
    threads = int(config.pop("threads_per_worker", 1))
    tls = config.pop("security", None)
    options = {
        "host": config.pop("host", "127.0.0.1"),
        "dashboard_address": config.pop("dashboard_address", "127.0.0.1:0"),
        "threads_per_worker": threads,
        "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        **config,
    }
    if tls is not None:
        options.update(security=tls.security(), protocol="tls://")
    if kind == "local":
        return {"n_workers": workers or max(1, cores() // threads), "processes": True,
                **options}
    options["env"] = {}  # GPU workers feed the device; leave their CPU threads alone
    return {"n_workers": workers, "resources": {"GPU": 1}, **options}


def slurm_options(config: dict[str, Any]) -> dict[str, Any]:
    """The ``dask_jobqueue.SLURMCluster`` arguments of a ``kind: slurm`` cluster file: its
    ``options`` plus, with a ``security:`` block, the ``Security`` and ``protocol: tls://``
    (jobqueue hands the worker's certificate paths to each job's worker command)."""
    options = dict(config.get("options") or {})
    tls = config.get("security")
    if tls is not None:
        options.update(security=tls.security(), protocol="tls://")
    elif str(options.get("protocol", "")).startswith("tls"):
        raise ConfigError("protocol tls:// needs the cluster file's 'security:' block (ca_file, "
                          "cert, key)")
    return options


def kubernetes_spec(config: dict[str, Any]) -> dict[str, Any]:
    """The ``DaskCluster`` resource of a ``kind: kubernetes`` cluster file, as
    ``dask_kubernetes.operator.make_cluster_spec`` builds it, except that the scheduler and the
    worker pods get their own ``resources`` (the GPU goes to the workers only) and the workers
    their own ``command``.

    Keys: ``name``, ``image``, ``env``, ``scale`` (worker replicas), ``scheduler:
    {resources}``, ``worker: {command, resources}``.
    """
    from dask_kubernetes.operator import make_cluster_spec

    if config.get("security") is not None:
        raise ConfigError("kubernetes: configure TLS in the image's Dask config "
                          "(distributed.comm.tls), not in the cluster file")
    scheduler = dict(config.get("scheduler") or {})
    worker = dict(config.get("worker") or {})
    spec: dict[str, Any] = make_cluster_spec(name=config.get("name", "volref"),
                             image=config.get("image", "ghcr.io/dask/dask:latest"),
                             n_workers=int(config.get("scale", 1)),
                             env=dict(config.get("env") or {}),
                             worker_command=worker.get("command", "dask-worker"))
    spec["spec"]["scheduler"]["spec"]["containers"][0]["resources"] = scheduler.get("resources")
    spec["spec"]["worker"]["spec"]["containers"][0]["resources"] = worker.get("resources")
    return spec


def _batch(kind: str, config: dict[str, Any]) -> Cluster:
    if kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError("a slurm cluster needs dask-jobqueue (pip install dask-jobqueue)") \
                from None
        return SLURMCluster(**slurm_options(config))
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError("a kubernetes cluster needs dask-kubernetes "
                          "(pip install dask-kubernetes)") from None
    # dask-kubernetes ships no types; KubeCluster is a distributed Cluster
    return cast("Cluster", KubeCluster(custom_cluster_spec=kubernetes_spec(config),
                                      **dict(config.get("options") or {})))


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def peak_memory(client: Any) -> dict[str, int]:
    """Peak resident memory (bytes) of every worker process since it started."""
    if client is None:
        return {"this process": _max_rss()}
    peaks: dict[str, int] = client.run(_max_rss)
    return peaks
