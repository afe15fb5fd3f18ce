"""The refinement methods, as data: the one list that ``volref refine --method``, the engine
(:mod:`volref.pipeline.refine`), ``volref evaluate`` (Table 2 and its figures), ``volref train
refiner --method`` and the shipped model files (:mod:`volref.models.registry`) iterate.

Free of PyTorch, Dask and zarr, so the command line builds its choices from it without loading a
model. Each :class:`Method` says what the method reads besides the labels and their uncertainty
(which every method reads), which model it runs, whether ``volref train refiner`` trains it, and
which block function runs it: ``block`` names one of

* ``"tiles"`` — a tile refiner (:func:`volref.stages.refine.refine_region`: the MAE and the
  learned baselines) over the global tile grid;
* ``"fused"`` — the MAE over the global tile grid, each pixel it rebuilds given its class by a
  fusion of its and the ensemble's probabilities (:mod:`volref.models.fusion`); the ensemble
  re-runs on the tiles that hold a rebuilt pixel;
* ``"crf"`` — the dense CRF on the ensemble's probabilities and the image
  (:func:`volref.stages.crf.crf_region`), which re-runs the ensemble over the block.

Adding a method = one :class:`Method` below plus, for a new ``block``, its block function in
:data:`volref.pipeline.refine.BLOCKS` and its tile function in
:data:`volref.evaluate.methods.TILES`. What a block function gets (``RefineJob``): the labels and
uncertainty sources, the method's model, the normalised image's source when ``needs`` holds
``image``, and, when it holds ``probabilities``, the ensemble that made the labels (checked to
be that one; ``job.ensemble``) with the segment stage's settings (``job.segment``) — a method
that recomputes the probabilities from the image, as ``crf`` does, needs ``image`` too. The
engine writes the labels it returns and counts what they change.

Order: the command line lists the methods in registry order; tables and figures list them
reversed (the paper's baselines first, the default last, beside the paper's MAE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from volref.errors import ConfigError

#: what a method may read besides the labels and their uncertainty
INPUTS = ("image", "probabilities")
#: which pixels a method may change: only those of removed patches, or every pixel of a tile that
#: holds a removed patch
REPLACES = ("removed", "tile")
#: the models a method can run: the masked autoencoder, the MAE with an image encoder (MAE+X),
#: the CNN denoising autoencoder, or the segmentation ensemble (whose probabilities it refines)
MODELS = ("mae", "mae-x", "cnn-ae", "ensemble")
BLOCKS = ("tiles", "fused", "crf")


@dataclass(frozen=True)
class Method:
    """One refinement method.

    ``weights``: the shipped model file (in ``volref/models/weights``) or None (``crf``: it runs
    the segmentation ensemble). ``needs``: inputs besides labels and uncertainty (``image``: the
    normalised image; ``probabilities``: the ensemble's mean class probabilities). ``trainable``:
    ``volref train refiner --method NAME`` trains its ``model`` (the trainer kind) and writes
    ``weights``. ``paper``: its row of the paper's Table 2 (the five metrics' means, in
    :data:`volref.metrics.METRICS` order), None where the paper has none.
    """

    name: str
    label: str  # how tables and help texts name it
    summary: str  # one line
    model: str
    block: str = "tiles"
    weights: str | None = None
    needs: frozenset[str] = field(default_factory=frozenset)
    trainable: bool = False
    replaces: str = "removed"
    paper: tuple[float, float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if not set(self.needs) <= set(INPUTS):
            raise ValueError(f"{self.name}: inputs are among {INPUTS}, got {sorted(self.needs)}")
        if self.replaces not in REPLACES or self.model not in MODELS or self.block not in BLOCKS:
            raise ValueError(f"{self.name}: replaces, model or block unknown")
        if self.trainable and (self.weights is None or self.model == "ensemble"):
            raise ValueError(f"{self.name}: a trainable method trains a tile refiner into a file")

    @property
    def image(self) -> bool:
        """Whether it reads the normalised image."""
        return "image" in self.needs

    @property
    def probabilities(self) -> bool:
        """Whether it reads the ensemble's class probabilities (it re-runs the ensemble)."""
        return "probabilities" in self.needs


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("fused", "fused", "the MAE's and the ensemble's probabilities combined where the MAE "
           "rebuilds (a logistic fusion fitted on validation phantoms, volref train fusion; "
           "the outline from the ensemble's probabilities smoothed 2 px, an IMS rim; "
           "re-runs the ensemble)", model="mae", block="fused", weights="refiner.safetensors",
           needs=frozenset({"image", "probabilities"})),
    Method("mae", "MAE", "the paper's masked autoencoder, a shape prior on labels that "
           "rebuilds uncertain patches near mitochondria", model="mae", weights="refiner.safetensors",
           trainable=True, paper=(5.05, 0.18, 11.41, 8.71, 0.36)),
    Method("mae-x", "MAE+X", "the MAE with an image encoder (a paper baseline)", model="mae-x",
           weights="mae-x.safetensors", needs=frozenset({"image"}), trainable=True,
           paper=(8.64, 1.02, 13.13, 15.31, 0.65)),
    Method("cnn-ae", "CNN-AE", "a convolutional denoising autoencoder that repaints whole "
           "tiles (a paper baseline)", model="cnn-ae", weights="cnn-ae.safetensors",
           trainable=True, replaces="tile", paper=(5.51, 0.08, 11.39, 2.98, 0.76)),
    Method("crf", "dense CRF", "a dense CRF on the ensemble's probabilities and the image, "
           "per tile with a removed patch (a paper baseline; re-runs the ensemble)",
           model="ensemble", block="crf", needs=frozenset({"image", "probabilities"}),
           replaces="tile", paper=(6.14, 0.81, 12.95, 13.46, 8.46)),
)}

#: ``volref refine`` and ``volref run`` without ``--method``, where the models in use allow it
#: (else the paper's ``mae``, with a warning: :func:`volref.pipeline.refine.default_method`)
DEFAULT_METHOD = "fused"
#: the paper's Table 2 rows that are no method: the initial labels and the control tiles
PAPER_INITIAL = (10.90, 2.93, 14.21, 17.50, 0.00)
PAPER_CONTROL = (3.55, 0.26, 12.14, 10.09, 0.00)


def names() -> tuple[str, ...]:
    """Every method, in registry order (the command line's choices)."""
    return tuple(REGISTRY)


def table_order() -> tuple[str, ...]:
    """Every method as tables and figures list them: reversed registry order, so the default
    and the paper's MAE come last."""
    return tuple(reversed(REGISTRY))


def trainable() -> tuple[str, ...]:
    """The methods ``volref train refiner --method`` trains."""
    return tuple(n for n, m in REGISTRY.items() if m.trainable)


def method(name: str) -> Method:
    """The method called ``name``; :class:`~volref.errors.ConfigError` for an unknown one."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown refinement method {name!r} (choose from "
                          f"{', '.join(REGISTRY)})") from None


def help_text() -> str:
    """One line per method for ``--help`` and the README: ``name: summary``."""
    return "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values())


def markdown_table() -> str:
    """The registry as the README lists it (``tests/test_methods.py`` checks the README holds
    exactly this)."""
    rows = ["| method | what it is | reads besides labels + uncertainty | model file | "
            "`volref train refiner` | changes |", "|---|---|---|---|---|---|"]
    for m in REGISTRY.values():
        reads = ", ".join(sorted(m.needs)) or "—"
        weights = f"`{m.weights}`" if m.weights else "the ensemble's"
        changes = "whole tiles that hold a removed patch" if m.replaces == "tile" else \
            "removed patches only"
        name = f"`{m.name}` (default)" if m.name == DEFAULT_METHOD else f"`{m.name}`"
        rows.append(f"| {name} | {m.summary} | {reads} | {weights} | "
                    f"{'yes' if m.trainable else 'no'} | {changes} |")
    return "\n".join(rows) + "\n"
