"""The API: whole-store operations built from io, synth, engine and stages.

- :func:`volref.pipeline.run.run` — segment -> refine -> instances -> measure on a cluster;
  :func:`volref.pipeline.run.run_block` — one block, in this process;
- :func:`write_phantom` — a phantom image with ground truth (never imports torch).
"""

from volref.pipeline.phantom import write_phantom

__all__ = ["write_phantom"]
