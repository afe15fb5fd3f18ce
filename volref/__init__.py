"""volref: refine biologically inconsistent mitochondria segmentations in OME-Zarr volumes.

The Python API (imported on first use, so ``import volref`` stays cheap)::

    volref.run(image, output=None, *, client=None, cluster=None, ...)   # all four stages
    volref.segment / refine / instances / measure(image, output=None, ...)   # one stage
    volref.RunSettings, SegmentSettings, RefineSettings, LabelSettings, ClusterSpec, TLSFiles

Layers (imports point downward only; see ``DESIGN`` in the repository docs)::

    cli ─► pipeline ─► engine ─► io
                 └──► stages ─► models
    synth, metrics, io: numpy/scipy/zarr only, never torch
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("volref")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from volref.errors import VolrefError

#: public name -> the module that defines it
_LAZY = {
    "run": "volref.api", "segment": "volref.api", "refine": "volref.api",
    "instances": "volref.api", "measure": "volref.api",
    "RunSettings": "volref.pipeline.run", "RunResult": "volref.pipeline.run",
    "SegmentSettings": "volref.stages.segment", "RefineSettings": "volref.stages.refine",
    "LabelSettings": "volref.stages.settings",
    "ClusterSpec": "volref.engine.cluster", "TLSFiles": "volref.engine.cluster",
}

__all__ = ["VolrefError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'volref' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
