"""The command line under an adversary: hypothesis draws argument lists for every subcommand and
mutates stores (files deleted, truncated or rewritten, metadata replaced), and every case must

* exit 0 or 2 (never a traceback: an exception escaping ``main`` fails the case),
* with 2, print exactly one line on stderr (``volref: error: ...``),
* finish within a per-case time limit (SIGALRM; a hang fails the case),
* leave the input's bytes unchanged (SHA-256 of every file of the inputs before and after).

Cases run in this process through ``main(argv)`` (a subprocess costs ~2 s here) on one tiny,
read-only phantom and tiny models shared by every case; the cases are the same every run unless
``VOLREF_FUZZ_RANDOM`` is set. ``VOLREF_FUZZ_EXAMPLES`` sets the number
of cases of each test (default 500 for the argument lists, 150 for the stores: the CI run); a
nightly run sets it higher. The figures of a run are written to ``$VOLREF_FUZZ_REPORT`` (JSON)
when that is set.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
from collections import Counter
from pathlib import Path

import dask
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volref.cli.main import main
from volref.pipeline import write_phantom
from volref.synth import SynthConfig

EXAMPLES = int(os.environ.get("VOLREF_FUZZ_EXAMPLES", "500"))
STORE_EXAMPLES = int(os.environ.get("VOLREF_FUZZ_STORE_EXAMPLES", str(max(150, EXAMPLES // 3))))
CASE_SECONDS = int(os.environ.get("VOLREF_FUZZ_CASE_SECONDS", "60"))
# the default run draws the same cases every time (a CI result can be reproduced); set
# VOLREF_FUZZ_RANDOM=1 to draw new ones (how the noise and chunk cases in test_synth were found)
DERANDOMIZE = not os.environ.get("VOLREF_FUZZ_RANDOM")

TINY = SynthConfig(shape=(8, 64, 64), seed=3, chunks=(8, 32, 32), density=40.0,
                   degraded_fraction=0.5)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"no answer within {CASE_SECONDS} s")


def _read_only(path: Path, on: bool) -> None:
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files, ""]:
            p = Path(root) / name
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                continue
            mode = p.stat().st_mode
            p.chmod(mode & ~0o222 if on else mode | 0o200)


@pytest.fixture(scope="module")
def world(tmp_path_factory, models):
    """A tiny read-only phantom, tiny models, and the files a user should not give."""
    base = tmp_path_factory.mktemp("fuzz")
    img = base / "img.ome.zarr"
    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(TINY, img, levels=2))
    files = base / "files"
    files.mkdir()
    os.mkfifo(files / "fifo")
    (files / "folder").mkdir()
    (files / "empty").write_bytes(b"")
    (files / "pickle.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    (files / "text.yaml").write_text("kind: local\nworkers: [1, 2\n")
    (files / "list.yaml").write_text("- kind\n- local\n")
    (files / "unknown.yaml").write_text("kind: local\nbogus: 1\n")
    (files / "types.yaml").write_text("kind: local\nworkers: many\n")
    (files / "slurm.yaml").write_text("kind: slurm\noptions: {cores: x}\nscale: -3\n")
    (files / "binary").write_bytes(bytes(range(256)))
    (files / "card.json").write_text(json.dumps({"kind": "volref-mae", "config": {"patch": 0}}))
    outs = base / "out"
    outs.mkdir()
    inputs = [img, files]
    _read_only(img, True)
    digest = {str(p): tree_digest_safe(p) for p in inputs}
    seg, mae = models
    # relative paths drawn by a case (a positional "extra", "..") land here, not in the checkout
    with contextlib.chdir(outs):
        yield {"img": img, "files": files, "outs": outs, "seg": seg, "mae": mae,
               "inputs": inputs, "digest": digest, "n": [0]}
    _read_only(img, False)


def _paths(w) -> st.SearchStrategy[str]:
    f = w["files"]
    return st.sampled_from([
        str(w["img"]), str(w["img"] / "s0"), str(w["img"] / "labels"),
        str(w["img"] / "labels" / "ground-truth"), str(f / "fifo"), str(f / "folder"),
        str(f / "empty"), str(f / "binary"), str(f / "missing.zarr"), str(f / "no" / "x.zarr"),
        "", "-", "..", "http://user:hunter2@127.0.0.1:9/x.zarr", "foo://bar/x.zarr",
        # a file URL to a store that does not exist, inside the outputs (emptied after each
        # case), so a synth that makes it never leaves it for a later case or outside the test
        "s3://", f"file://{w['outs']}/missing/x.zarr", str(w["seg"]),
    ])


def _fresh(w) -> str:
    w["n"][0] += 1
    return str(w["outs"] / f"o{w['n'][0]}")


INTS = st.sampled_from(["0", "1", "2", "3", "-1", "x", "nan", "inf", "1e309", "", "2.5",
                        "99999999999999999999", "0x10"])
FLOATS = st.sampled_from(["0", "0.5", "1", "-1", "nan", "inf", "-inf", "1e309", "x", "",
                          "1e-320", "NaN", "2"])
SMALL = st.sampled_from(["1", "2", "4", "8", "0", "-2", "x", "nan"])


def _options(w, kind: str) -> dict[str, st.SearchStrategy[list[str]]]:
    f = w["files"]
    model_files = st.sampled_from([w["seg"], w["mae"], str(f / "fifo"), str(f / "folder"),
                                   str(f / "pickle.pt"), str(f / "empty"), str(f / "binary"),
                                   str(f / "card.json"), str(f / "missing.safetensors")])
    cluster_files = st.sampled_from([str(f / n) for n in ("fifo", "folder", "empty", "text.yaml",
                                                          "list.yaml", "unknown.yaml",
                                                          "types.yaml", "slurm.yaml", "binary",
                                                          "missing.yaml")])
    one = lambda s: s.map(lambda v: [v])  # noqa: E731
    three = st.tuples(SMALL, SMALL, SMALL).map(list)
    engine = {
        "--output": st.one_of(_paths(w), st.just(None)).map(
            lambda v: [v if v is not None else _fresh(w)]),
        "--workers": one(st.sampled_from(["0", "-1", "x", ""])),
        "--block-shape": st.tuples(st.sampled_from(["8", "4", "0", "-8", "x", "16"]),
                                   st.sampled_from(["32", "64", "0", "x", "33"]),
                                   st.sampled_from(["32", "64", "-1", "x", "31"])).map(list),
        "--scheduler": one(st.sampled_from(["foo://x", "x", "", "http://u:pw@h:1",
                                            "tcp://999.1.1.1:1"])),
        "--cluster": one(cluster_files),
        "--overwrite": st.just([]), "--break-lock": st.just([]),
        "--channel": one(INTS), "--timepoint": one(INTS),
    }
    stage = {
        "--segmenter": one(model_files), "--refiner": one(model_files),
        "--method": one(st.sampled_from(["mae", "mae-x", "cnn-ae", "crf", "magic", ""])),
        "--tau": one(FLOATS), "--stride": one(INTS), "--max-removed": one(FLOATS),
        "--blend": one(st.sampled_from(["centre", "window", "x"])), "--smooth": one(FLOATS),
        "--precision": one(st.sampled_from(["bf16", "fp32", "fp8"])), "--csv": st.just([]),
        "--min-voxels": one(INTS),
        "--block": one(st.sampled_from(["0,0,0", "1,0,0", "9,9,9", "0,0", "a,b,c", "-1,0,0"])),
    }
    table = {
        "synth": {"--shape": three, "--seed": one(INTS), "--chunks": three,
                  "--density": one(FLOATS), "--degraded-fraction": one(FLOATS),
                  "--degraded-length": st.tuples(FLOATS, FLOATS).map(list),
                  "--noise": one(FLOATS), "--voxel-size": st.tuples(FLOATS, FLOATS, FLOATS).map(list),
                  "--levels": one(SMALL), "--ngff": one(st.sampled_from(["0.4", "0.5", "0.3"])),
                  "--overwrite": st.just([])},
        "info": {"--channel": one(INTS), "--timepoint": one(INTS)},
        "snapshot": {"--z": one(INTS), "--label": one(st.sampled_from(
            ["ground-truth", "nope", "../x", ""])), "--crop": st.tuples(
            SMALL, SMALL, SMALL, SMALL).map(list), "--channel": one(INTS),
            "--timepoint": one(INTS)},
        "segment": {**engine, "--segmenter": stage["--segmenter"],
                    "--precision": stage["--precision"]},
        "refine": {**engine, **{k: v for k, v in stage.items() if k not in ("--csv", "--block",
                                                                            "--min-voxels")}},
        "measure": {**engine, "--csv": st.just([]), "--min-voxels": one(INTS)},
        "run": {**engine, **stage},
        "panel": {"--output": one(_paths(w)), "--tiles": one(INTS)},
        "report": {"--out": one(st.sampled_from([str(f / "empty"), str(f / "no" / "r"),
                                                 str(f / "fifo")])),
                   "--output": one(_paths(w)), "--tiles": one(INTS)},
        "evaluate": {"--output": one(st.sampled_from([str(f / "empty"), str(f / "no" / "e")])),
                     "--methods": one(st.sampled_from(["mae", "crf", "magic", "", ",,"])),
                     "--every": one(INTS), "--max-tiles": one(INTS),
                     "--mae": one(model_files), "--segmenter": one(model_files)},
        "train": {},
    }
    return table[kind]


POSITIONALS = {"synth": 1, "info": 1, "snapshot": 2, "segment": 1, "refine": 1, "measure": 1,
               "run": 1, "panel": 2, "report": 1, "evaluate": 1, "train": 0}


@st.composite
def argv(draw, w):
    kind = draw(st.sampled_from(sorted(POSITIONALS)))
    args = ["-q", kind] if draw(st.integers(0, 9)) else [kind]
    if kind == "train":  # the group alone and its commands without their required inputs
        args += draw(st.sampled_from([[], ["refiner"], ["segmenter"], ["bogus"],
                                      ["segmenter", "--epochs", "nan"]]))
        return args
    for i in range(draw(st.integers(0, POSITIONALS[kind] + 1))):
        if kind in ("synth", "snapshot", "panel") and i == POSITIONALS[kind] - 1 \
                and draw(st.booleans()):
            args.append(_fresh(w))  # an output that does not exist yet
        else:
            args.append(draw(_paths(w)))
    options = _options(w, kind)
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=5, unique=True)
                     if options else st.just([])):
        args += [name, *draw(options[name])]
    if kind == "synth" and "--shape" not in args:
        args += ["--shape", "4", "32", "32"]  # the default shape is minutes of honest work
    if kind in ("segment", "refine", "measure", "run") and "--workers" not in args:
        args += ["--workers", "0"]  # no local cluster: ~5 s to start one per case
    if draw(st.integers(0, 19)) == 0:
        args.append(draw(st.sampled_from(["--bogus", "--help", "extra", "--", "-v"])))
    return args


def run_case(argv_: list[str], stats: Counter) -> tuple[int, str]:
    """Run ``main(argv)`` here under a time limit; returns (exit status, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    stats["cases"] += 1
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv_)
    except Hang:
        stats["hangs"] += 1
        raise AssertionError(f"hang: {argv_}") from None
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is a traceback
        stats["tracebacks"] += 1
        raise AssertionError(f"traceback ({type(exc).__name__}: {exc}) for {argv_}") from exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    stats[f"exit {code}"] += 1
    return code, err.getvalue()


def check_case(argv_: list[str], code: int, err: str, stats: Counter) -> None:
    assert code in (0, 2), (code, argv_, err)
    assert "Traceback" not in err, (argv_, err)
    assert "hunter2" not in err, (argv_, err)  # a password in a URL is never shown
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1 or not lines[0].startswith("volref: error: "):
            stats["not one line"] += 1
        assert len(lines) == 1 and lines[0].startswith("volref: error: "), (argv_, err)


def _report(name: str, stats: Counter) -> None:
    target = os.environ.get("VOLREF_FUZZ_REPORT")
    if not target:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = dict(stats)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def test_random_command_lines_exit_0_or_2_on_one_line_and_change_no_input(world):
    stats: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))
    @given(args=argv(world))
    def one(args):
        code, err = run_case(args, stats)
        check_case(args, code, err, stats)
        for p in world["inputs"]:
            was, now = world["digest"][str(p)], tree_digest_safe(p)
            changed = sorted(k for k in was if now.get(k) != was[k])
            # a command that succeeded may make what it was told to write (synth into a missing
            # folder, snapshot's NAME.png beside a file NAME); a refused one leaves no trace
            new = sorted(set(now) - set(was))
            if changed or (new and code != 0):
                stats["inputs changed"] += 1
                raise AssertionError(f"{p} changed by {args}: {changed or new}")
            for made in new:
                made_path = p / made.rstrip("/")
                if made.endswith("/"):
                    shutil.rmtree(made_path, ignore_errors=True)
                else:
                    made_path.unlink(missing_ok=True)
        for out in world["outs"].iterdir():  # keep the disk small: outputs are not inputs
            if out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink()

    one()
    _report("command lines", stats)
    assert stats["cases"] >= EXAMPLES
    assert stats["tracebacks"] == stats["hangs"] == stats["inputs changed"] == 0
    assert stats["exit 0"] + stats["exit 2"] == stats["cases"]


# ---------------------------------------------------------------- mutated stores

MUTATIONS = ("delete", "truncate", "garbage", "json-junk", "empty", "fifo", "directory")
JUNK = ['{"ome": 5}', "[]", "null", '{"zarr_format": 3, "node_type": "array"}',
        '{"zarr_format": 9, "node_type": "group"}', '{"attributes": {"ome": {"version": "0.5",'
        ' "multiscales": [{"axes": [], "datasets": []}]}}, "zarr_format": 3, '
        '"node_type": "group"}', '{"zarr_format": 3, "node_type": "group", "attributes": '
        '{"ome": {"version": "0.5", "labels": "ground-truth"}}}']


def _mutate(store: Path, rel: str, how: str, junk: str) -> None:
    p = store / rel
    if how == "delete":
        p.unlink()
    elif how == "truncate":
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        p.write_bytes(os.urandom(max(1, p.stat().st_size)))
    elif how == "json-junk":
        p.write_text(junk)
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "fifo":
        p.unlink()
        os.mkfifo(p)
    else:
        p.unlink()
        p.mkdir()


@pytest.fixture(scope="module")
def pristine(world, tmp_path_factory):
    """A writable copy of the phantom (mutations start from it) and its file list."""
    base = tmp_path_factory.mktemp("pristine")
    dst = base / "img.ome.zarr"
    shutil.copytree(world["img"], dst)
    _read_only(dst, False)
    names = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    return dst, names


def _mutated_commands(w, store: str, out: str) -> list[list[str]]:
    """Commands that read the store's metadata and chunks and stop before a model runs (the
    store is read-only; refine and measure need results it does not have)."""
    return [["-q", "info", store],
            ["-q", "snapshot", store, out + ".png"],
            ["-q", "segment", store, "--workers", "0", "--segmenter", w["seg"]],
            ["-q", "refine", store, "--output", out, "--workers", "0"],
            ["-q", "measure", store, "--workers", "0"]]


def test_mutated_stores_are_read_or_refused_on_one_line_and_never_changed(world, pristine,
                                                                          tmp_path_factory):
    src, names = pristine
    stats: Counter = Counter()
    base = tmp_path_factory.mktemp("mutated")

    @settings(max_examples=STORE_EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=list(HealthCheck))
    @given(targets=st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True),
           how=st.lists(st.sampled_from(MUTATIONS), min_size=3, max_size=3),
           junk=st.sampled_from(JUNK), command=st.integers(0, 4))
    def one(targets, how, junk, command):
        store = base / "m.ome.zarr"
        out = base / "out"
        for p in (store, out, base / "out.png"):
            if p.exists():
                _read_only(p, False) if p.is_dir() else None
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.copytree(src, store)
        for rel, h in zip(targets, how):
            _mutate(store, rel, h, junk)
        _read_only(store, True)
        before = tree_digest_safe(store)
        args = _mutated_commands(world, str(store), str(out))[command]
        code, err = run_case(args, stats)
        check_case(args, code, err, stats)
        if tree_digest_safe(store) != before:
            stats["inputs changed"] += 1
            raise AssertionError(f"{targets} {how}: {args} changed the store")

    one()
    _report("mutated stores", stats)
    assert stats["cases"] >= STORE_EXAMPLES
    assert stats["tracebacks"] == stats["hangs"] == stats["inputs changed"] == 0


def tree_digest_safe(path: Path) -> dict[str, str]:
    """:func:`tree_digest` that also names FIFOs and directories where files were (never
    opening a FIFO)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            mode = p.lstat().st_mode
            if stat.S_ISREG(mode):
                out[str(p.relative_to(path))] = tree_digest_file(p)
            else:
                out[str(p.relative_to(path))] = f"mode {stat.S_IFMT(mode)}"
        for name in dirs:
            out[str((Path(root) / name).relative_to(path)) + "/"] = "dir"
    return out


def tree_digest_file(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()
