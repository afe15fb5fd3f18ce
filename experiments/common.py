"""Helpers shared by the experiment scripts: the options of a setting sweep, the command line
that made a result, one slice refined as ``volref refine`` refines it."""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from benchmarks import common
from volref.classes import BACKGROUND
from volref.stages.refine import Refined, RefineSettings, context, refine_region


def command(module: str, argv: list[str] | None) -> str:
    """The command line that made a result (``argv`` None: this process's own arguments)."""
    return common.command(module, argv, package="experiments")


def store_option(ap: argparse.ArgumentParser, what: str) -> None:
    """``--store``: the phantom an experiment reads; ``--quick`` without it makes a small one."""
    ap.add_argument("--store", default=None,
                    help=f"{what} (with --quick and no --store: a small phantom made here)")


def store_of(args: argparse.Namespace) -> str:
    """The store to read: ``--store``, or for ``--quick`` without it a small phantom made in a
    temporary folder (segmented with the shipped models)."""
    return common.store_arg(args, tempfile.mkdtemp(prefix="volref-quick-"))


def tuning_args(doc: str, values: str, every: int,
                argv: list[str] | None) -> tuple[argparse.Namespace, list[float]]:
    """The options of a setting sweep on a validation phantom: ``--store`` (segmented, with ground
    truth), ``--refiner``, ``--values`` (comma-separated), ``--every`` (N-th slice); ``--quick``
    keeps the first two values on every 4th slice (a smoke run). Returns the parsed options (the
    store made when ``--quick`` has none) and the values as floats."""
    ap = common.parser(doc, "two values, every 4th slice (a smoke run)")
    store_option(ap, "a segmented validation phantom with ground truth")
    ap.add_argument("--refiner", default=None)
    ap.add_argument("--values", default=values)
    ap.add_argument("--every", type=int, default=every)
    args = ap.parse_args(argv)
    swept = [float(v) for v in args.values.split(",")]
    if args.quick:
        swept, args.every = swept[:2], 4
    args.store = store_of(args)
    return args, swept


def refine_slice(model: torch.nn.Module, labels: np.ndarray, uncertainty: np.ndarray,
                 settings: RefineSettings, device: str | torch.device = "cpu") -> Refined:
    """Refine one slice given with ``settings.margin`` pixels of context on every side (outside
    the volume: background, zero uncertainty); results have the slice's shape, without z."""
    m = settings.margin
    extra = context(settings, model.config.patch) - m
    lab = np.pad(labels, extra, constant_values=BACKGROUND)[None]
    unc = np.pad(uncertainty, extra, constant_values=0.0)[None]
    r = refine_region(model, lab, unc, settings, device=device)
    return Refined(labels=r.labels[0], removed=r.removed[0], rebuilt=r.rebuilt[0],
                   tiles_total=r.tiles_total, tiles_run=r.tiles_run)
