"""The API: whole-store operations built from io, synth, engine and stages.

``run`` (segment -> refine -> instances -> measure on a cluster), ``run_block`` (one block, here)
and ``write_phantom``.
"""

from volref.pipeline.phantom import write_phantom
from volref.pipeline.run import RunSettings, run, run_block

__all__ = ["RunSettings", "run", "run_block", "write_phantom"]
