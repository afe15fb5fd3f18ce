"""volref's Python API: the whole refinement, or one stage of it, on an OME-Zarr image, from a
script or a notebook. The command line (``volref run``, ``volref segment``, ...) is a thin layer
over these functions.

>>> import volref
>>> from distributed import Client
>>> client = Client("tls://scheduler:8786", security=...)     # or Client(LocalCluster(...))
>>> result = volref.run("sample.ome.zarr", client=client)      # the client stays open
>>> result.report("measure").results["table"]                  # pandas, one row per mitochondrion

Results go into the image's archive (or ``output``) as OME-Zarr groups; see the README.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from volref.engine.cluster import ClusterSpec
from volref.engine.runner import Observer
from volref.errors import ConfigError
from volref.layout import (
    INITIAL,
    METRICS_TABLE_PATH,
    MITOCHONDRIA,
    REFINED,
    UNCERTAINTY_PATH,
    label_path,
)
from volref.pipeline.run import STAGES, RunResult, RunSettings, gpu_count
from volref.pipeline.run import run as run_stages

__all__ = ["instances", "measure", "refine", "run", "segment"]

#: address schemes that name a running scheduler rather than a cluster file
SCHEDULER_SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://")


def run(image: str | os.PathLike, output: str | os.PathLike | None = None, *,
        client: Any | None = None, cluster: ClusterSpec | str | os.PathLike | None = None,
        workers: int | None = None, stages: Sequence[str] = STAGES,
        settings: RunSettings | None = None, channel: int | None = None,
        timepoint: int | None = None, observer: Observer | None = None,
        on_connect: Callable[[Any], None] | None = None) -> RunResult:
    """Segment, refine, label and measure the mitochondria of ``image``.

    Each stage reads what the previous one wrote and is skipped when it is already done with
    the same inputs and settings; the bytes written do not depend on where the blocks ran.

    Parameters
    ----------
    image
        An OME-Zarr image: a local path or a URL (``s3://``, ``gs://``, ``https://``).
    output
        A separate store for the results; default: groups added to the image's archive.
    client
        An existing ``distributed.Client`` (a notebook's) to run the blocks on. volref never
        closes it. Give ``client`` or ``cluster``/``workers``, not both.
    cluster
        Where to run otherwise: a :class:`~volref.engine.cluster.ClusterSpec`, a scheduler
        address (``tcp://host:8786``), or a cluster file (``cluster/slurm-gpu.yaml``).
        Default: a local cluster sized to the machine (one worker per GPU when it has GPUs).
    workers
        Local worker processes (``0``: blocks one by one in this process, for debugging).
    stages
        Which of ``segment``, ``refine``, ``instances``, ``measure`` to run (pipeline order).
    settings
        What the stages compute: models, tiles, ``tau``, block shape, ``overwrite``, ...
    channel, timepoint
        Which channel and time point of a multi-channel or time-lapse image.
    observer
        Called with a dict per progress event (``{"event": "block", "stage": ..., ...}``).
    on_connect
        Called with the connection (``.client``, ``.description``, ``.dashboard``) once the
        cluster is up.

    Returns
    -------
    RunResult
        Where the results went, the block grid, the cluster used and one report per stage
        (``result.report("measure").results["table"]``: the metrics table).
    """
    if client is not None and (cluster is not None or workers is not None):
        raise ConfigError("give a client, or a cluster / workers, not both")
    return run_stages(image, stages=stages, output=output, settings=settings,
                      cluster=None if client is not None else cluster_spec(cluster, workers),
                      channel=channel, timepoint=timepoint, observer=observer,
                      on_connect=on_connect, client=client)


def cluster_spec(cluster: ClusterSpec | str | os.PathLike | None = None,
                 workers: int | None = None) -> ClusterSpec:
    """The :class:`ClusterSpec` of :func:`run`'s ``cluster`` and ``workers`` arguments."""
    if isinstance(cluster, ClusterSpec):
        if workers is not None:
            raise ConfigError("give workers inside the ClusterSpec")
        return cluster
    gpus = 0 if workers == 0 else gpu_count()
    if cluster is None:
        return ClusterSpec(workers=workers, gpus=gpus)
    if workers is not None:
        raise ConfigError("give a cluster or workers, not both")
    where = os.fspath(cluster)
    if where.startswith(SCHEDULER_SCHEMES):
        return ClusterSpec(scheduler=where, gpus=gpus)
    return ClusterSpec(cluster_file=where, gpus=gpus)


def _stage(name: str):
    def stage(image: str | os.PathLike, output: str | os.PathLike | None = None,
              **kwargs: Any) -> RunResult:
        return run(image, output, stages=(name,), **kwargs)

    stage.__name__ = stage.__qualname__ = name
    stage.__doc__ = f"""Run the ``{name}`` stage alone on ``image``.

    {_STAGE_DOCS[name]}

    Parameters
    ----------
    image, output
        As for :func:`run`.
    **kwargs
        Any keyword argument of :func:`run` but ``stages`` (``client``, ``cluster``,
        ``settings``, ...).

    Returns
    -------
    RunResult
        As for :func:`run`, with this stage's report only.
    """
    return stage


_STAGE_DOCS = {
    "segment": f"The segmenter ensemble's initial labels (``{label_path(INITIAL)}``) and their "
               f"uncertainty (``{UNCERTAINTY_PATH}``).",
    "refine": f"The refiner's rebuilt labels (``{label_path(REFINED)}``); needs ``segment``.",
    "instances": f"One id per mitochondrion across blocks (``{label_path(MITOCHONDRIA)}``); "
                 "needs ``refine``.",
    "measure": "The consistency metrics per mitochondrion, before and after refinement "
               f"(``{METRICS_TABLE_PATH}``); needs ``instances``.",
}

segment = _stage("segment")
refine = _stage("refine")
instances = _stage("instances")
measure = _stage("measure")
