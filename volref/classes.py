"""The segmentation classes (METHOD.md; order of the reference code) and how label images show them.

A leaf module of constants: every layer may import it.
"""

from __future__ import annotations

BACKGROUND, IMS, CRISTAE, MATRIX = 0, 1, 2, 3
N_CLASSES = 4
CLASS_NAMES = ("background", "intermembrane space", "cristae", "matrix")
#: the short names a class map uses (``volref refine --class-map background=0,ims=1,...``)
CLASS_KEYS = ("background", "ims", "cristae", "matrix")

#: Okabe-Ito colours, every class listed (napari hides values that lack a colour when others
#: have one); background fully transparent.
CLASS_COLORS = (
    (BACKGROUND, (0, 0, 0, 0)),
    (IMS, (230, 159, 0, 255)),
    (CRISTAE, (86, 180, 233, 255)),
    (MATRIX, (0, 158, 115, 255)),
)
CLASS_PROPERTIES = tuple({"label-value": v, "class": n} for v, n in enumerate(CLASS_NAMES))


def counted(n: int, one: str, many: str) -> str:
    """``n`` and the noun in the right number: ``counted(1, "mitochondrion", "mitochondria")``
    is "1 mitochondrion"."""
    return f"{n} {one if n == 1 else many}"


def mitochondria(n: int) -> str:
    """"1 mitochondrion", "0 mitochondria", "2 mitochondria"."""
    return counted(n, "mitochondrion", "mitochondria")


DEGRADED_COLORS = ((0, (0, 0, 0, 0)), (1, (213, 94, 0, 160)))
DEGRADED_PROPERTIES = ({"label-value": 0, "region": "clear"},
                       {"label-value": 1, "region": "low SNR"})
