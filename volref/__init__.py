"""volref: refine biologically inconsistent mitochondria segmentations in OME-Zarr volumes.

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

__all__ = ["VolrefError", "__version__"]
