"""Where volref's outputs live in a store: the one module that names them.

Every other module asks here for a group, label image, level, table or record path; a test
(``tests/test_layout.py``) finds no output name anywhere else in the code. Level paths are never
spelled out: they come from each image's multiscales metadata (``s0 s1 …`` or ``0 1 …``)::

    <store>/                       an --output store: a copy of the processed image at its root
      labels/                      ome.labels lists every label image below
        volref-initial/            LABEL_IMAGES: ensemble argmax, refined classes, instance ids
        volref-refined/
        volref-mitochondria/
        volref-uncertainty/        UNCERTAINTY_LABELS: the uncertainty in ten steps, for viewers
      tables/                      TABLES: the ngio/Fractal tables, listed in its attributes
        volref-mitochondria/       MITOCHONDRIA_TABLE: the metrics, tied to its label image
          table.parquet            TABLE_FILE
      volref/                      META: readers ignore it
        uncertainty/               UNCERTAINTY: normalised entropy as an OME-Zarr image
        metrics.parquet            METRICS_TABLE (+ METRICS_CSV on request)
        manifests/<stage>/         manifest_prefix(stage): finished-block records
        provenance.json            PROVENANCE

``META`` paths below (uncertainty, tables, records) are relative to the ``volref`` group; the
``*_path`` functions give paths from the store's root.
"""

from __future__ import annotations

import zarr

from volref.io.ngff import read_multiscale

#: NGFF's group of label images
LABELS = "labels"
#: volref's own group (not an image; OME-Zarr readers ignore it)
META = "volref"

INITIAL = "volref-initial"
REFINED = "volref-refined"
MITOCHONDRIA = "volref-mitochondria"
#: the label images volref writes, in the order the stages write them
LABEL_IMAGES = (INITIAL, REFINED, MITOCHONDRIA)

#: the uncertainty as a label image (viewers show label images beside the image; see
#: :mod:`volref.pipeline.publish`)
UNCERTAINTY_LABELS = "volref-uncertainty"

#: the ngio/Fractal tables group (:mod:`volref.io.tables`), its table's file, and volref's table
#: (named as the label image its rows describe)
TABLES = "tables"
TABLE_FILE = "table.parquet"
MITOCHONDRIA_TABLE = MITOCHONDRIA

#: what ``volref synth`` adds to a phantom: classes, instances and low-SNR areas
GROUND_TRUTH = "ground-truth"
GROUND_TRUTH_INSTANCES = "ground-truth-instances"
DEGRADED = "degraded"

#: below META
UNCERTAINTY = "uncertainty"
METRICS_TABLE = "metrics.parquet"
METRICS_CSV = "metrics.csv"
MANIFESTS = "manifests"
PROVENANCE = "provenance.json"


def label_path(name: str) -> str:
    """A label image's group, from the store's root."""
    return f"{LABELS}/{name}"


def table_path(name: str) -> str:
    """A table's group, from the store's root."""
    return f"{TABLES}/{name}"


def meta_path(name: str) -> str:
    """A member of the ``volref`` group, from the store's root."""
    return f"{META}/{name}"


UNCERTAINTY_PATH = meta_path(UNCERTAINTY)
METRICS_TABLE_PATH = meta_path(METRICS_TABLE)
METRICS_CSV_PATH = meta_path(METRICS_CSV)


#: the images each block stage writes (their records list the chunks written; resuming checks
#: them), from the store's root
STAGE_OUTPUTS = {"segment": (label_path(INITIAL), UNCERTAINTY_PATH),
                 "refine": (label_path(REFINED),),
                 "instances": (label_path(MITOCHONDRIA),)}


def manifest_prefix(stage: str) -> str:
    """Where a stage's records live, below the ``volref`` group."""
    return f"{MANIFESTS}/{stage}"


# ---------------------------------------------------------------- levels, from the metadata


def level_paths(group: zarr.Group) -> list[str]:
    """The level paths of the multiscale image ``group``, finest first (from its metadata)."""
    return [lv.path for lv in read_multiscale(group, where=group.path).levels]


def levels_of(group: zarr.Group) -> list[zarr.Array]:
    """The level arrays of the multiscale image ``group``, finest first."""
    return [group[p] for p in level_paths(group)]


def existing_levels(root: zarr.Group, path: str) -> list[zarr.Array] | None:
    """The level arrays of the image at ``path`` below ``root``, or None if it is not there."""
    try:
        return levels_of(root[path])
    except KeyError:
        return None


def finest(root: zarr.Group, path: str) -> zarr.Array:
    """The finest level of the image at ``path`` below ``root`` (KeyError if absent)."""
    return levels_of(root[path])[0]
