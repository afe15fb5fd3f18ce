"""Per-stage records of finished blocks, so a re-run does only what is left.

Chunk existence is not a record: zarr never writes an all-background chunk, and a killed task can
leave a half-written one. A block task therefore writes its chunks first and its record last::

    volref/manifests/<stage>/
        settings.json          digest of the stage's inputs and settings (+ the settings)
        blocks/<region>.json   one per finished block, written after its chunks (it lists them)
        index.json             every block record at the time the stage finished, in one file
        done.json              the stage finished (level 0 and the pyramid, its listing)

A record that cannot be parsed (a kill during its write) counts as not finished.

Reading the records back (:meth:`Manifest.finished`: a resumed stage, the next stage's check of
its input) costs one file read per block, ~0.3 ms each on a local disk and a round trip each on
an object store: minutes at 10**5 blocks. So when a stage finishes, its records are also written
into ``index.json``, and :meth:`~Manifest.finished` lists the record names (one listing) and
reads from the index every record it holds, reading only the others one by one. The block
files stay the records: a record deleted since (by hand, or by :meth:`~Manifest.forget`) is not
finished, and an index that lists a record no longer there is ignored (reading never writes:
a refused run leaves the store as it was); the next :meth:`~Manifest.mark_done` writes it
afresh from the files. :meth:`~Manifest.forget`, :meth:`~Manifest.undo` and
:meth:`~Manifest.clear` drop the index, and one that cannot be parsed is ignored. What the
index holds wins over a record's file rewritten by hand while it is listed. A run whose
settings digest differs from the recorded one is refused unless the caller overwrites, which
clears the records first. The settings hold an ``inputs`` entry where a stage reads the user's
arrays: their fingerprints (:mod:`volref.io.fingerprint`), so a changed image is refused too.
What a resumed stage checks of its outputs is :mod:`volref.engine.outputs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from typing import Any

import zarr

from volref.errors import ConfigError
from volref.io.fingerprint import changed_files
from volref.io.store import (
    delete_file,
    delete_files,
    list_files,
    read_file,
    read_files,
    write_file,
)
from volref.layout import INITIAL, MITOCHONDRIA, REFINED, label_path, manifest_prefix


def digest(settings: dict[str, Any]) -> str:
    """A stable hash of JSON-able settings."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: the command that runs each stage, and each stage's output as a user sees it
USER_COMMANDS = {"segment": "volref segment", "refine": "volref refine",
                 "instances": "volref measure", "measure": "volref measure"}
UPSTREAM_OUTPUTS = {"segment": label_path(INITIAL), "refine": label_path(REFINED),
                    "instances": label_path(MITOCHONDRIA)}


class Manifest:
    def __init__(self, group: zarr.Group, stage: str) -> None:
        self.group = group  # the store's ``volref`` group
        self.stage = stage
        self.prefix = manifest_prefix(stage)

    # ------------------------------------------------------------ settings

    def settings_digest(self) -> str | None:
        raw = read_file(self.group, f"{self.prefix}/settings.json")
        if raw is None:
            return None
        try:
            digest: str = json.loads(raw)["digest"]
            return digest
        except (ValueError, KeyError, TypeError):
            return None

    def settings(self) -> dict[str, Any]:
        """The settings (the inputs' record) the stage's results were made with; {} if none."""
        raw = read_file(self.group, f"{self.prefix}/settings.json")
        try:
            return json.loads(raw)["settings"] if raw is not None else {}
        except (ValueError, KeyError, TypeError):
            return {}

    def begin(self, settings: dict[str, Any], overwrite: bool) -> str:
        """Start or resume the stage with ``settings``; returns their digest.

        Resuming needs the same digest; otherwise :class:`ConfigError` unless ``overwrite``, which
        clears every record of the stage.
        """
        new = digest(settings)
        old = self.settings_digest()
        if old is not None and old != new and not overwrite:
            raise ConfigError(self._changed_message(settings, old, new))
        if overwrite or old != new:
            self.clear()
        if old != new or overwrite:
            body = json.dumps({"digest": new, "settings": settings}, indent=2, sort_keys=True,
                              default=str)
            write_file(self.group, f"{self.prefix}/settings.json", body.encode())
        return new

    def _changed_message(self, settings: dict[str, Any], old: str, new: str) -> str:
        """Why the recorded results do not match, in terms of the commands a user runs."""
        command = USER_COMMANDS.get(self.stage, f"volref {self.stage}")
        before = self.settings()
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if "inputs" in changed:
            return (f"{command}: the image changed since the results in this store were made "
                    f"from it ({image_change(before.get('inputs'), settings.get('inputs'))}); "
                    f"run {command} --overwrite to recompute them from the new image")
        upstream = [k for k in changed if k in UPSTREAM_OUTPUTS]
        if changed and upstream == changed:
            names = " and ".join(f"{UPSTREAM_OUTPUTS[k]} ({USER_COMMANDS[k]})" for k in upstream)
            return (f"{command}: the results in this store were made from earlier {names}, "
                    f"which have been recomputed since; run {command} --overwrite to remake "
                    "them from the new ones")
        return (f"{command}: the results in this store were made with other inputs or settings "
                f"(digest {old}, now {new}); pass --overwrite to recompute them")

    def clear(self) -> None:
        delete_files(self.group, self.prefix)

    def forget(self, keys: list[str]) -> None:
        """Drop the records of ``keys`` (their blocks run again), the index and the ``done``
        record."""
        self.undo()
        for key in keys:
            delete_file(self.group, f"{self.prefix}/blocks/{key}.json")

    # ------------------------------------------------------------ blocks

    def finished(self) -> dict[str, Any]:
        """Region key -> payload of every readable block record (from the index where it holds
        the record, see the module doc). Reads only."""
        return self._records(self._index())

    def _records(self, index: dict[str, Any]) -> dict[str, Any]:
        names = [n[:-5] for n in list_files(self.group, f"{self.prefix}/blocks")
                 if n.endswith(".json")]
        if not set(index) <= set(names):  # records deleted since: the index is stale
            index = {}
        out: dict[str, Any] = {key: index[key] for key in names if key in index}
        unread = [key for key in names if key not in index]  # read together, not in turn
        raws = read_files(self.group, [f"{self.prefix}/blocks/{key}.json" for key in unread])
        for key, raw in zip(unread, raws):
            try:
                out[key] = json.loads(raw) if raw is not None else None
            except ValueError:
                continue  # torn by a kill: not finished
        return {k: out[k] for k in names if isinstance(out.get(k), dict)}

    def record(self, key: str, payload: dict[str, Any] | None = None) -> None:
        _fault(self.stage, "before")
        body = json.dumps({"block": key, **(payload or {})}, sort_keys=True)
        write_file(self.group, f"{self.prefix}/blocks/{key}.json", body.encode())
        _fault(self.stage, "after")

    # ------------------------------------------------------------ the stage

    @property
    def done(self) -> bool:
        return read_file(self.group, f"{self.prefix}/done.json") is not None

    def done_record(self) -> dict[str, Any]:
        """What ``done.json`` says ({} when the stage has not finished or it cannot be read)."""
        return self._read_object("done.json")

    def _read_object(self, name: str) -> dict[str, Any]:
        """The JSON object in the stage's file ``name`` ({} when missing, torn or not one)."""
        raw = read_file(self.group, f"{self.prefix}/{name}")
        try:
            out = json.loads(raw) if raw is not None else {}
        except ValueError:
            return {}
        return out if isinstance(out, dict) else {}

    def undo(self) -> None:
        """The stage counts as unfinished again (its pyramid is rebuilt when it next runs); its
        index is dropped."""
        delete_file(self.group, f"{self.prefix}/done.json")
        delete_file(self.group, f"{self.prefix}/index.json")

    def mark_done(self, summary: dict[str, Any]) -> None:
        """Write the index of the block records (read from their files), then the ``done``
        record."""
        records = self._records({})
        write_file(self.group, f"{self.prefix}/index.json",
                   json.dumps(records, sort_keys=True, separators=(",", ":")).encode())
        write_file(self.group, f"{self.prefix}/done.json",
                   json.dumps(summary, indent=2, sort_keys=True).encode())

    def _index(self) -> dict[str, Any]:
        """The records of the index ({} when there is none or it cannot be parsed)."""
        return {k: v for k, v in self._read_object("index.json").items() if isinstance(v, dict)}


def image_change(before: Any, now: Any) -> str:
    """How the fingerprints of the image's levels (``{"image": {level: fingerprint}}``) differ."""
    old = (before or {}).get("image") if isinstance(before, dict) else None
    new = (now or {}).get("image") if isinstance(now, dict) else None
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "no fingerprint of it was recorded"
    for level in sorted(set(old) | set(new)):
        if old.get(level) != new.get(level):
            return f"level {level}: {changed_files(old.get(level), new.get(level) or {})}"
    return "its sampled voxels differ"


# ---------------------------------------------------------------- fault injection (tests)

_RECORDED: dict[str, int] = {}


def _fault(stage: str, when: str) -> None:
    """``VOLREF_FAULT_KILL=<stage>:<n>:<before|after>[:TERM]`` SIGKILLs (or SIGTERMs) this
    process at the n-th record of ``stage`` it writes, before or after writing it (its chunks are
    written either way). The reliability tests use it to kill a run at exact points; unset, it
    costs one lookup."""
    spec = os.environ.get("VOLREF_FAULT_KILL")
    if not spec:
        return
    target, n, at, *sig = spec.split(":")
    signum = signal.SIGTERM if sig == ["TERM"] else signal.SIGKILL
    if target != stage:
        return
    if when == "before":
        _RECORDED[stage] = _RECORDED.get(stage, 0) + 1
    if at == when and _RECORDED[stage] == int(n):
        os.kill(os.getpid(), signum)
