"""The run lock on real clusters: malformed lock files, reused pids, other hosts, SIGTERM, and
two runs racing to create the same new output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import zarr

from tests.helpers import INLINE, INLINE_JOB, records, tiny, tree_digest
from volref.cli.main import main
from volref.engine.lock import (
    LockFileError,
    StoreLockedError,
    break_store_lock,
    process_start,
    store_lock,
)
from volref.io.store import create_store
from volref.pipeline.run import run


def _store(tmp_path):
    path = tmp_path / "out.zarr"
    root = create_store(path, 3)
    meta = root.require_group("volref")
    return path, meta, path / "volref"


def _lock_text(path, text):
    (path / "volref" / "run.lock").write_text(text)


def _me(**kw):
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": process_start(os.getpid()), "started": 0, **kw})


MALFORMED = {
    "a JSON list": "[1, 2]",
    "pid as text": json.dumps({"host": socket.gethostname(), "pid": "123", "started": 0}),
    "a huge pid": json.dumps({"host": socket.gethostname(), "pid": 10**30, "started": 0}),
    "no pid": json.dumps({"host": socket.gethostname(), "started": 0}),
    "a negative pid": json.dumps({"host": socket.gethostname(), "pid": -1, "started": 0}),
    "not JSON": "{torn",
    "empty": "",
    "started as text": json.dumps({"host": "h", "pid": 5, "started": "today"}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_lock_is_one_clear_line_and_left_alone(tmp_path, case):
    path, meta, local = _store(tmp_path)
    _lock_text(path, MALFORMED[case])
    with pytest.raises(LockFileError, match="not a volref lock") as info, \
            store_lock(meta, local, str(path)):
        pass
    assert "\n" not in str(info.value) and "--break-lock" in str(info.value)
    assert (local / "run.lock").read_text() == MALFORMED[case]
    # --break-lock removes what volref did not write
    assert break_store_lock(path) == {}
    with store_lock(meta, local, str(path)):
        assert (local / "run.lock").exists()
    assert not (local / "run.lock").exists()


def test_a_lock_that_is_a_directory_or_a_fifo_never_hangs(tmp_path, capsys, small_phantom):
    path, meta, local = _store(tmp_path)
    (local / "run.lock").mkdir()
    with pytest.raises(LockFileError, match="is a directory"), store_lock(meta, local, "x"):
        pass
    with pytest.raises(LockFileError, match="is a directory"):
        break_store_lock(path)
    # through the command line: one line, exit 2, the directory still there
    code = main(["-q", "segment", str(small_phantom), "--output", str(path), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a directory" in err
    assert (local / "run.lock").is_dir()
    (local / "run.lock").rmdir()
    os.mkfifo(local / "run.lock")
    with pytest.raises(LockFileError, match="FIFO"), store_lock(meta, local, "x"):
        pass


def test_staleness_by_host_pid_and_start_time(tmp_path):
    path, meta, local = _store(tmp_path)
    # this process, started when it did: alive, refused
    _lock_text(path, _me())
    with pytest.raises(StoreLockedError, match="another volref run"), \
            store_lock(meta, local, "x"):
        pass
    # the same pid with another start time: the pid was reused by another process, stale
    _lock_text(path, _me(pid_start=(process_start(os.getpid()) or 0) + 12345))
    with store_lock(meta, local, "x"):
        assert json.loads((local / "run.lock").read_text())["pid_start"] == \
            process_start(os.getpid())
    # another host: never stale, even with a pid that is gone here; broken only on request
    other = json.dumps({"host": "elsewhere.invalid", "pid": 4194000, "started": 0})
    _lock_text(path, other)
    with pytest.raises(StoreLockedError, match="--break-lock") as info, \
            store_lock(meta, local, "x"):
        pass
    assert "another host" in str(info.value)
    assert break_store_lock(path)["host"] == "elsewhere.invalid"
    # a live run on this host is never broken, even on request
    _lock_text(path, _me())
    with pytest.raises(StoreLockedError, match="on this host"):
        break_store_lock(path)
    assert (local / "run.lock").exists()


def test_break_lock_option_on_the_command_line(small_phantom, models, tmp_path, capsys):
    path, _, local = _store(tmp_path)
    _lock_text(path, json.dumps({"host": "elsewhere.invalid", "pid": 7, "started": 0}))
    # a scheduler that cannot be reached fails just after the lock is taken
    argv = ["-q", "segment", str(small_phantom), "--output", str(path), "--segmenter", models[0],
            "--scheduler", "foo://x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another host" in err and "--break-lock" in err and len(err.splitlines()) == 1
    assert (local / "run.lock").exists()
    assert main([*argv, "--break-lock"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Dask scheduler" in err and "another volref run" not in err, err
    assert not (local / "run.lock").exists()


def test_sigterm_releases_the_lock_after_the_current_record(reference, small_phantom, models,
                                                             tmp_path):
    """A batch scheduler's time limit: SIGTERM during a block's record lets that block finish
    and record, releases the lock, and the next run resumes to the same bytes."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(INLINE_JOB))
    out = tmp_path / "term.zarr"
    before = tree_digest(small_phantom)
    env = {**os.environ, "VOLREF_FAULT_KILL": "segment:3:before:TERM"}
    proc = subprocess.run([sys.executable, str(script), str(small_phantom), str(out), *models],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (-signal.SIGINT, 130, 1), proc.stderr
    assert "Terminated" in proc.stderr or "KeyboardInterrupt" in proc.stderr
    assert records(out, "segment") == 3  # the block being recorded finished first
    assert not (out / "volref" / "run.lock").exists()  # released, not left to go stale
    result = run(small_phantom, output=out, settings=tiny(models, block_shape=(8, 64, 128)),
                 stages=("segment",), cluster=INLINE)
    seg = result.report("segment")
    assert (seg.computed, seg.skipped) == (9, 3)
    root, want = zarr.open_group(out, mode="r"), reference[2]
    for key in ("labels/volref-initial/s0", "volref/uncertainty/s0"):
        assert (root[key][:] == want[key]).all(), key
    assert tree_digest(small_phantom) == before


def test_two_runs_creating_one_new_output_end_in_locked_not_broken(small_phantom, models,
                                                                    tmp_path):
    """Both runs race to create the same new store: one creates it whole (built under a
    temporary name and renamed into place), the other finds a complete store and its lock."""
    out = tmp_path / "race.zarr"
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def create() -> None:
        barrier.wait()
        root = create_store(out, 3, {"volref": {"n": 1}})
        outcomes.append("created" if root is not None else "exists")

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created", "exists"]
    assert zarr.open_group(out, mode="r").attrs["volref"] == {"n": 1, "created_by": "volref"}
    assert [p.name for p in tmp_path.iterdir()] == ["race.zarr"]  # no temporary left
    # the loser of a race opens the finished store; with the winner's lock held it is "locked"
    fresh = tmp_path / "fresh.zarr"
    root = create_store(fresh, 3)
    meta = root.require_group("volref")
    with store_lock(meta, fresh / "volref", str(fresh)):
        with pytest.raises(StoreLockedError, match="another volref run"):
            run(small_phantom, output=fresh, settings=tiny(models), stages=("segment",),
                cluster=INLINE)
