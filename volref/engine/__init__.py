"""The engine: how block tasks are cut, scheduled, recorded and resumed (no models, no torch).

- :mod:`~volref.engine.grid`: the block grid, aligned to output chunks and tile grids;
- :mod:`~volref.engine.manifest`: finished-block records and settings digests per stage;
- :mod:`~volref.engine.outputs`: the chunks each record lists, checked when a stage resumes;
- :mod:`~volref.engine.runner`: submit, retry, route to GPU workers, observe, summarise;
- :mod:`~volref.engine.cluster`: start or join a Dask cluster (local, SLURM, Kubernetes, TLS);
- :mod:`~volref.engine.lock`: one run at a time per output store.
"""

from volref.engine.cluster import ClusterSpec, TLSFiles, connect
from volref.engine.grid import Block, BlockGrid, plan_blocks
from volref.engine.manifest import Manifest
from volref.engine.runner import (
    BlocksFailedError,
    BlocksRefusedError,
    BlockTask,
    Executor,
    run_blocks,
)

__all__ = ["Block", "BlockGrid", "BlockTask", "BlocksFailedError", "BlocksRefusedError",
           "ClusterSpec", "Executor", "Manifest", "TLSFiles", "connect", "plan_blocks", "run_blocks"]
