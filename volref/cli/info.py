"""Text of ``volref info``: what the archive holds and whether volref can process it."""

from __future__ import annotations

import zarr

from volref.classes import mitochondria
from volref.errors import UnsupportedImageError, VolrefError
from volref.io import label_names, open_multiscale, read_multiscale
from volref.io.image import select_volume
from volref.io.ngff import Multiscale
from volref.io.store import member, members, redact
from volref.layout import LABEL_IMAGES, META, label_path, meta_path


def describe(location: str, *, channel: int | None = None,
             timepoint: int | None = None) -> tuple[str, VolrefError | None]:
    """Describe an image. Raises for what cannot be read at all (missing, not OME-Zarr);
    returns the problem separately when the image is readable but not processable as given."""
    group, ms = open_multiscale(location)
    lines = [
        _row("location", redact(location)),
        _row("format", f"OME-Zarr {ms.version} (zarr v{ms.zarr_format})"),
    ]
    if ms.name:
        lines.append(_row("name", ms.name))
    lines.append(_row("axes", ", ".join(
        f"{a.name} ({a.type or '?'}{', ' + a.unit if a.unit else ''})" for a in ms.axes)))
    lines.append(_row("dtype", ms.levels[0].dtype))
    lines.append(_row("levels", f"{len(ms.levels)}"))
    for lv in ms.levels:
        lines.append(f"  {lv.path:<6} shape {_x(lv.shape):<22} chunks {_x(lv.chunks):<18} "
                     f"scale {' '.join(f'{s:g}' for s in lv.scale)}")
    problem: VolrefError | None = None
    try:
        vol = select_volume(group, ms, redact(location), channel=channel, timepoint=timepoint)
        chosen = ", ".join(f"{k}={v}" for k, v in vol.selection.items())
        lines.append(_row("volume", f"z y x = {_x(vol.shape)}" + (f" ({chosen})" if chosen else "")))
    except UnsupportedImageError as exc:
        problem = exc
        lines.append(_row("volume", "not processable as given (see the error below)"))
    lines.extend(_labels(group, ms))
    lines.extend(_volref_outputs(group))
    return "\n".join(lines), problem


def _labels(group: zarr.Group, image: Multiscale) -> list[str]:
    names = label_names(group)
    if not names:
        return [_row("labels", "none")]
    out = [_row("labels", f"{len(names)}")]
    for name in names:
        try:
            lms = read_multiscale(member(member(group, "labels"), name), where=f"labels/{name}")
        except (KeyError, VolrefError) as exc:
            out.append(f"  {name:<24} unreadable: {exc}")
            continue
        note = "" if len(lms.levels) == len(image.levels) else (
            f"  (warning: {len(lms.levels)} levels, image has {len(image.levels)})")
        out.append(f"  {name:<24} {lms.levels[0].dtype:<7} {_x(lms.levels[0].shape)}{note}")
    return out


def _volref_outputs(group: zarr.Group) -> list[str]:
    found = [label_path(n) for n in label_names(group) if n in LABEL_IMAGES]
    try:
        meta = group[META]
    except KeyError:
        meta = None
    if isinstance(meta, zarr.Group):
        info = meta.attrs.get("volref", {})
        if isinstance(info, dict) and "phantom" in info:
            p = info["phantom"]
            n = info.get("n_mitochondria")
            count = mitochondria(n) if isinstance(n, int) else "mitochondria"
            found.append(f"phantom (seed {p.get('seed')}, {count}; ground truth in labels)")
        found.extend(meta_path(k) for k in members(meta))
    try:
        group["tables"]
        found.append("tables")
    except KeyError:
        pass
    return [_row("volref", ", ".join(found) if found else "no volref outputs yet")]


def _row(key: str, value: str) -> str:
    return f"{key:<9} {value}"


def _x(shape) -> str:
    return " x ".join(str(s) for s in shape)
