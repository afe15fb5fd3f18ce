"""Tables in the convention ngio and Fractal read: ``tables/<name>/`` beside ``labels/``.

Layout (what ``ngio`` 1.x writes for a feature table with its Parquet backend, written here with
pandas and pyarrow so that volref itself does not depend on ngio)::

    tables/                      attributes {"tables": [..., "<name>"]}
      <name>/                    attributes {"type": "feature_table", "table_version": "1",
        table.parquet               "backend": "parquet", "region": {"path": "../labels/<label>"},
                                    "instance_key": "label", "index_key": "label", ...}

One row per instance, keyed by the integer column ``label`` (the value in the label image that
``region`` names). volref adds the unit of every column under ``"volref": {"units": ...}``
(readers ignore keys they do not know).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pandas as pd
import zarr

from volref.errors import OutputExistsError
from volref.io.store import check_name, members, read_file, write_file
from volref.layout import TABLE_FILE, TABLES, label_path


def write_feature_table(root: zarr.Group, name: str, table: pd.DataFrame, *, region: str,
                        units: Mapping[str, str] | None = None,
                        description: str | None = None) -> zarr.Group:
    """Write ``table`` (one row per instance, an integer ``label`` column) as
    ``tables/<name>``, tied to the label image ``labels/<region>``; replaces an older one."""
    check_name(name)
    check_name(region)
    if "label" not in table.columns:
        raise ValueError("a feature table needs an integer 'label' column")
    try:
        tables = root[TABLES]
    except KeyError:
        tables = root.create_group(TABLES)
    if not isinstance(tables, zarr.Group):
        raise OutputExistsError(f"{TABLES!r} exists in the store and is not a group")
    if name in members(tables):
        del tables[name]
    group = tables.create_group(name)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    write_file(group, TABLE_FILE, buf.getvalue())
    attrs: dict[str, Any] = {
        "type": "feature_table",
        "table_version": "1",
        "backend": "parquet",
        "region": {"path": f"../{label_path(region)}"},
        "instance_key": "label",
        "index_key": "label",
        "index_type": "int",
        "categorical_columns": [],
        "measurement_columns": [c for c in table.columns if c != "label"],
        "metadata_columns": [],
    }
    extra: dict[str, Any] = {}
    if units:
        extra["units"] = {c: u for c, u in units.items() if c in table.columns}
    if description:
        extra["description"] = description
    made = table.attrs.get("volref")
    if isinstance(made, dict):  # how the table's lengths were converted (volref.io.units)
        extra.update({k: v for k, v in made.items() if k not in extra})
    if extra:
        attrs["volref"] = extra
    group.attrs.update(attrs)
    listed = tables.attrs.get("tables", [])
    listed = [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else []
    if name not in listed:
        tables.attrs["tables"] = listed + [name]
    return group


def read_feature_table(root: zarr.Group, name: str) -> pd.DataFrame | None:
    """The table ``tables/<name>`` as a DataFrame, or None when there is none."""
    try:
        group = root[TABLES][name]
    except KeyError:
        return None
    raw = read_file(group, TABLE_FILE)
    return None if raw is None else pd.read_parquet(io.BytesIO(raw))


def table_names(root: zarr.Group) -> list[str]:
    """Names listed in ``tables`` (empty when there is none)."""
    try:
        listed = root[TABLES].attrs.get("tables", [])
    except KeyError:
        return []
    return [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else []
