"""Settings dataclasses are the one source of defaults: the command line reads them, digests
cover every field by themselves, and a bad value names its flag."""

from __future__ import annotations

import dataclasses
import pickle

import click
import pytest

from volref.cli.main import cli, main
from volref.engine.manifest import digest
from volref.errors import ConfigError, SettingsError
from volref.pipeline.settings import RunSettings
from volref.settings import PRECISIONS, default_of
from volref.stages.crf import CRFSettings
from volref.stages.settings import LabelSettings, RefineSettings, SegmentSettings
from volref.synth import SynthConfig

#: option -> (settings classes, field) for every engine and synth option with a default
SOURCES = {
    "tau": ((RefineSettings,), "tau"),
    "stride": ((RefineSettings,), "stride"),
    "max_removed": ((RefineSettings,), "max_removed"),
    "blend": ((RefineSettings,), "blend"),
    "precision": ((SegmentSettings, RefineSettings), "precision"),
    "method": ((RunSettings,), "method"),
    "min_voxels": ((RunSettings,), "min_voxels"),
    "csv": ((RunSettings,), "csv"),
    "overwrite": ((RunSettings,), "overwrite"),
    "class_map": ((LabelSettings,), "class_map"),
    "intensity_window": ((SegmentSettings,), "intensity_window"),
    "shape": ((SynthConfig,), "shape"),
    "seed": ((SynthConfig,), "seed"),
    "chunks": ((SynthConfig,), "chunks"),
    "density": ((SynthConfig,), "density"),
    "degraded_fraction": ((SynthConfig,), "degraded_fraction"),
    "degraded_length": ((SynthConfig,), "degraded_length_px"),
    "noise": ((SynthConfig,), "noise"),
    "voxel_size": ((SynthConfig,), "voxel_size_um"),
}
#: options whose default is "not given" (None), or not a setting of the result
NOT_SETTINGS = {"synth": {"overwrite", "ngff"},
                **{c: {"break_lock"} for c in ("run", "segment", "refine", "measure")}}


@pytest.mark.parametrize("command", ["run", "segment", "refine", "measure", "synth"])
def test_cli_defaults_are_the_settings_defaults(command):
    checked = 0
    ctx = click.Context(cli.commands[command])
    for param in cli.commands[command].params:
        default = param.get_default(ctx)
        if default is None or param.name in NOT_SETTINGS.get(command, ()) or \
                isinstance(param, click.Argument):
            continue
        assert param.name in SOURCES, f"--{param.name}: a default not taken from settings"
        classes, name = SOURCES[param.name]
        for cls in classes:
            want = default_of(cls, name)
            got = tuple(default) if isinstance(want, tuple) else default
            assert got == want, (command, param.name, cls.__name__)
        checked += 1
    assert checked


def test_an_added_field_changes_the_digest_without_editing_to_dict():
    for base in (RefineSettings, SegmentSettings, CRFSettings):
        extra = dataclasses.make_dataclass(
            "Extra", [("new_knob", int, dataclasses.field(default=3))], bases=(base,),
            frozen=True)
        assert extra().to_dict() == {**base().to_dict(), "new_knob": 3}
        assert digest({"settings": extra().to_dict()}) != digest({"settings": base().to_dict()})


def test_todays_settings_keep_their_dicts():
    """Digests of archives made before the dicts became automatic stay the same. The default
    precision is ``auto`` now, but a run records the precision it resolved to: where that is
    bf16 (the old default), the records are the old ones and such archives resume."""
    assert RefineSettings().precision == SegmentSettings().precision == "auto"
    assert RefineSettings(precision="bf16").to_dict() == {
        "tile": 128, "stride": 64, "tau": 0.4, "near_px": 16.0, "batch": 0,
        "precision": "bf16", "blend": "centre", "max_removed": 1.0, "smooth": 1.0}
    # the intensity fields came with the background mapping, which changes the labels: archives
    # segmented before it are refused on resume (other settings), as they must be
    assert SegmentSettings(precision="bf16").to_dict() == {"tile": 256, "halo": 32, "batch": 4,
                                           "precision": "bf16", "intensity_range": None,
                                           "intensity_window": False}
    s = RefineSettings(tau=0.5, stride=32)
    assert RefineSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="unknown"):
        SegmentSettings.from_dict({"tile": 64, "halo_px": 3})


@pytest.mark.parametrize("field, kwargs", [
    ("max_removed", {"max_removed": 1.5}), ("max_removed", {"max_removed": 0.0}),
    ("stride", {"stride": 48}), ("smooth", {"smooth": 30.0}), ("blend", {"blend": "max"}),
    ("precision", {"precision": "fp16"}), ("batch", {"batch": -1})])
def test_errors_name_their_field(field, kwargs):
    with pytest.raises(SettingsError) as err:
        RefineSettings(**kwargs)
    assert err.value.field == field and isinstance(err.value, ValueError)
    again = pickle.loads(pickle.dumps(err.value))  # crosses Dask workers intact
    assert again.field == field and str(again) == str(err.value)


@pytest.mark.parametrize("args, flag", [
    (["--max-removed", "1.5"], "--max-removed"), (["--stride", "48"], "--stride"),
    (["--smooth", "30"], "--smooth"), (["--blend", "window", "--smooth", "1"], "--smooth")])
def test_cli_blames_the_flag_of_a_bad_setting(tmp_path, capsys, args, flag):
    # settings are checked before the image is opened: no image needed
    assert main(["refine", str(tmp_path / "none.ome.zarr"), *args]) == 2
    err = capsys.readouterr().err
    blamed = err.split("Invalid value for ")[1].split(" (see volref")[0]
    assert err.count("\n") == 1, err  # one line
    assert blamed.startswith(f"{flag}:") and blamed.count("--") == 1, err


def test_model_precisions_are_the_settings_precisions():
    from volref.models.precision import DTYPES

    assert ("auto", *DTYPES) == PRECISIONS
