"""The command line on a log (stderr not a terminal) and its help: progress lines at a set
interval, help text for every option of every command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import click

from volref.cli.main import cli
from volref.cli.progress import EngineProgress

LINE = re.compile(r"^(?P<label>[\w: ]+): (?P<done>\d+)/(?P<total>\d+) (blocks|tasks), "
                  r"[\d.]+ (blocks|tasks)/min, elapsed \w+, eta \w+$")


def test_a_run_logs_progress_lines_at_the_interval(tmp_path):
    """A small real run (volref synth) with stderr in a file and a 0.05 s interval."""
    log = tmp_path / "stderr.log"
    env = {**os.environ, "VOLREF_PROGRESS_INTERVAL": "0.05"}
    with log.open("w") as err:
        subprocess.run([sys.executable, "-m", "volref.cli.main", "synth",
                        str(tmp_path / "p.ome.zarr"), "--shape", "8", "256", "256",
                        "--chunks", "8", "64", "64"], stderr=err, stdout=subprocess.PIPE,
                       env=env, check=True, timeout=300)
    lines = [ln for ln in log.read_text().splitlines() if LINE.match(ln)]
    assert len(lines) >= 2, log.read_text()
    first = LINE.match(lines[0])
    assert first["label"] == "synth" and int(first["total"]) > 0


def test_engine_progress_reports_while_a_block_is_still_running(capsys, monkeypatch):
    monkeypatch.setenv("VOLREF_PROGRESS_INTERVAL", "0.05")
    with EngineProgress(enabled=True) as progress:  # stderr is not a terminal under pytest
        progress({"event": "start", "stage": "refine", "total": 4, "done": 1})
        progress({"event": "block", "stage": "refine", "key": "0,0,0", "ok": True,
                  "done": 2, "total": 4})
        time.sleep(0.5)  # a long block: no event, lines still come
        progress({"event": "end", "stage": "refine", "blocks": 4, "computed": 3, "skipped": 1,
                  "seconds": 0.5, "failed": 0})
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if LINE.match(ln)]
    assert len(lines) >= 2
    assert lines[-1].startswith("refine: 2/4 blocks, ") and not lines[-1].endswith("unknown")
    assert err[-1].startswith("refine: 3 blocks computed, 1 already done, 0 failed")


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_every_option_of_every_command_has_help():
    missing = [f"volref {name} {param.opts[0]}" for name, command in _commands(cli)
               for param in command.params
               if isinstance(param, click.Option) and not param.hidden
               and not (param.help or "").strip()]
    assert not missing, missing


def test_top_level_help_does_not_cut_a_summary(capsys):
    from volref.cli.main import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out.split("Commands:")[1].strip().splitlines()
    assert commands and all(not ln.rstrip().endswith("...") for ln in commands), commands


def test_refusal_after_an_upstream_rerun_names_the_commands_a_user_ran(tmp_path):
    """After ``volref refine --method cnn-ae --overwrite``, ``volref measure`` refuses in the
    terms of the commands the user ran, not of an internal ``instances`` stage."""
    import pytest
    import zarr

    from volref.engine.manifest import Manifest
    from volref.errors import ConfigError

    meta = zarr.open_group(tmp_path / "s.zarr", mode="w").require_group("volref")
    manifest = Manifest(meta, "instances")
    manifest.begin({"refine": "digest-of-the-mae-run", "connectivity": 6}, overwrite=False)
    with pytest.raises(ConfigError) as err:
        manifest.begin({"refine": "digest-of-the-cnn-ae-run", "connectivity": 6},
                       overwrite=False)
    message = str(err.value)
    assert message.startswith("volref measure: ") and "instances" not in message
    assert "labels/volref-refined (volref refine)" in message
    assert "volref measure --overwrite" in message
    with pytest.raises(ConfigError, match="other inputs or settings"):
        manifest.begin({"refine": "digest-of-the-mae-run", "connectivity": 26}, overwrite=False)
