"""``volref train segmenter``, ``refiner``, ``decision`` and ``fusion``."""

from __future__ import annotations

import shlex
import sys
import time

import click
from rich.console import Console
from rich.progress import Progress, TaskID, TextColumn

from volref.cli.labels import label_options, label_settings
from volref.cli.progress import progress_bar
from volref.layout import DEGRADED, GROUND_TRUTH
from volref.methods import REGISTRY, trainable


class TrainingProgress:
    """Observer of training events: a rich progress bar on stderr when it is a terminal;
    otherwise (a batch job's log, ``nohup``) one line per epoch with its mean loss, its time and
    the time left for the run (for the segmenter: for the member being trained)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.console = Console(stderr=True)
        self.bar = enabled and self.console.is_terminal
        self.lines = enabled and not self.console.is_terminal
        self.label = label
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self._losses: list[float] = []
        self._since = 0.0

    def __enter__(self) -> TrainingProgress:
        if self.bar:
            self.progress = progress_bar(self.console, "[bold]{task.description}",
                                         TextColumn("loss {task.fields[loss]:.4f}"))
        self._since = time.perf_counter()
        return self

    def __call__(self, event: dict) -> None:
        desc = self.label + (f" member {event['member'] + 1}/{event['members']}"
                             if "member" in event else "")
        if self.lines:
            self._line(desc, event)
        if self.progress is None:
            return
        if self.task is None or self.progress.tasks[0].description != desc:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(desc, total=event["steps"], loss=0.0)
        self.progress.update(self.task, completed=event["step"], loss=event["loss"])

    def _line(self, desc: str, event: dict) -> None:
        self._losses.append(event["loss"])
        if event["step"] % (event["steps"] // event["epochs"]):
            return
        now = time.perf_counter()
        took, done = now - self._since, len(self._losses)
        left = took / done * (event["steps"] - event["step"])
        print(f"{desc} epoch {event['epoch']}/{event['epochs']}: loss "
              f"{sum(self._losses) / done:.4f}, {took:.0f} s, {left / 60:.0f} min left",
              file=sys.stderr, flush=True)
        self._losses, self._since = [], now

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def with_options(options):
    """A decorator adding click ``options`` in their order."""
    def wrap(f):
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


def command_line() -> str:
    return "volref " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _device(ctx: click.Context, param: click.Parameter, value: str):
    """``--device``: resolved before any data is read, so a device that is not there fails first
    (one line, exit 2)."""
    from volref.errors import ConfigError
    from volref.train.device import resolve_device

    try:
        return resolve_device(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


device_option = click.option(
    "--device", default="auto", show_default=True, callback=_device,
    help="Where to train: auto (the first GPU when torch sees one, else the CPU), cpu, cuda or "
         "cuda:N. Checkpoints are the same files on any device; a run resumes on another.")


@click.group()
def train() -> None:
    """Train the segmentation ensemble or the MAE refiner on OME-Zarr volumes."""


@train.command("segmenter")
@click.option("--data", "data", multiple=True, required=True,
              help="OME-Zarr image with labels (repeatable).")
@click.option("--labels", default=GROUND_TRUTH, show_default=True,
              help="Label image holding the annotations.")
@click.option("--degraded", default=DEGRADED, show_default=True,
              help="Label image marking low-SNR areas (annotator ambiguity is simulated there).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for checkpoints and the finished ensemble.")
@click.option("--members", type=click.IntRange(min=1), default=5, show_default=True,
              help="U-Nets in the ensemble.")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True,
              help="Epochs per ensemble member.")
@click.option("--steps", type=click.IntRange(min=1), default=60, show_default=True,
              help="Optimizer steps per epoch.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Crops per training step.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed of the weights and the drawn crops.")
@click.option("--bf16", is_flag=True, help="Train with bf16 autocast (default: float32).")
@device_option
@click.pass_context
def segmenter(ctx, data, labels, degraded, out, members, epochs, steps, batch, seed, bf16,
              device):
    """Train K 2.5-D U-Nets on different subsets, seeds and simulated annotators.

    Interrupted runs resume from the last finished epoch when started again with the same OUT.
    """
    from volref.train.data import load_volume
    from volref.train.segmenter import SegmenterRecipe, train_segmenter

    volumes = [load_volume(d, labels=labels, degraded=degraded or None) for d in data]
    recipe = SegmenterRecipe(members=members, epochs=epochs, steps_per_epoch=steps,
                             batch=batch, seed=seed, bf16=bf16)
    with TrainingProgress("segmenter", ctx.obj["progress"]) as progress:
        path = train_segmenter(volumes, recipe, out, observer=progress,
                               data_names=list(data), command=command_line(), device=device)
    click.echo(f"wrote {path}")


@train.command("refiner")
@click.option("--data", "data", multiple=True, required=True,
              help="OME-Zarr image segmented by volref segment, or holding --labels "
                   "(repeatable).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for checkpoints and the finished model.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Training epochs.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Optimizer steps per epoch.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tiles per training step.")
@click.option("--crop", type=click.Choice(["64", "128"]), default="64", show_default=True,
              help="Training tile size (64 on CPU; the paper's 128 on a GPU).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1.5e-4,
              show_default=True, help="Peak learning rate (AdamW, cosine schedule).")
@click.option("--fp32", is_flag=True, help="Train in float32 (default: bf16 autocast).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed of the weights and the drawn crops.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Start from this refiner's weights (e.g. train on 64x64 crops first, then "
                   "continue on 128x128 tiles).")
@click.option("--blob-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of training tiles whose removed patches form one contiguous blob "
                   "(like a low-SNR spot) instead of scattered patches.")
@click.option("--method", type=click.Choice(list(trainable())), default="mae",
              show_default=True, help="The method whose model to train: "
              + "; ".join(f"{n}: {REGISTRY[n].summary}" for n in trainable())
              + " (MAE+X: start it from a MAE with --init).")
@click.option("--image-depth", type=click.IntRange(min=1), default=4, show_default=True,
              help="mae-x: blocks of the image encoder.")
@with_options(label_options("Train on", "Every --data archive holds it."))
@device_option
@click.pass_context
def refiner(ctx, data, out, epochs, steps, batch, crop, lr, fp32, seed, init, blob_fraction,
            method, image_depth, labels, class_map, uncertainty, device):
    """Train the MAE (or a baseline) on the ensemble's own predictions (labels/volref-initial),
    or on a segmentation of your own (--labels, --class-map, --uncertainty, as for volref
    refine).

    Interrupted runs resume from the last finished epoch when started again with the same OUT.
    """
    from volref.models.mae import MAEConfig
    from volref.train.data import load_image, load_predictions
    from volref.train.refiner import RefinerRecipe, tile_pool, train_refiner

    inputs = label_settings({"labels": labels, "class_map": class_map,
                             "uncertainty": uncertainty})
    spec = REGISTRY[method]
    mae = MAEConfig(image_depth=image_depth if spec.model == "mae-x" else 0)
    if init and spec.model == "cnn-ae":
        raise click.UsageError("--init continues a MAE or MAE+X; the CNN-AE trains from scratch")
    recipe = RefinerRecipe(epochs=epochs, steps_per_epoch=steps, batch=batch, crop=int(crop),
                           lr=lr, bf16=not fp32, seed=seed, init=init, method=method, mae=mae,
                           blob_fraction=blob_fraction)
    images = [load_image(d) for d in data] if spec.model == "mae-x" else None
    pool = tile_pool([load_predictions(d, inputs) for d in data], recipe.crop,
                     recipe.min_mito_fraction,
                     images=images)
    with TrainingProgress("refiner", ctx.obj["progress"]) as progress:
        path = train_refiner(pool, recipe, out, observer=progress, data_names=list(data),
                             command=command_line(),
                             segmentation=inputs.to_dict() if inputs.labels is not None
                             else None, device=device)
    click.echo(f"wrote {path}")


@train.command("decision")
@click.option("--data", "data", multiple=True, required=True,
              help="A phantom with ground truth (volref synth; repeatable): validation "
                   "phantoms, never the ones you evaluate on. Mix sparse and dense ones.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="The ensemble to write (safetensors): the same weights, the decision in "
                   "its card.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fit on every N-th z-slice.")
@click.option("--segmenter", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The ensemble (default: the shipped one).")
def decision(data, out, every, segmenter):
    """Fit the ensemble's decision: one offset per class added to its log probabilities before
    the argmax, chosen for the clean-region mean Dice of the four classes on phantoms with
    ground truth."""
    from volref.train.decision import train_decision

    d = train_decision(list(data), out, every=every, segmenter=segmenter,
                       command=command_line(), log=click.echo)
    click.echo(f"offsets {d['offsets']}: mean Dice {d['fit']['mean_dice_argmax']:.4f} (argmax) "
               f"-> {d['fit']['mean_dice']:.4f}")
    click.echo(f"wrote {out}")


@train.command("fusion")
@click.option("--data", "data", multiple=True, required=True,
              help="A phantom with ground truth and degraded areas, segmented by volref segment "
                   "(repeatable): validation phantoms, never the ones you evaluate on.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="The fusion file to write (JSON).")
@click.option("--every", type=click.IntRange(min=1), default=2, show_default=True,
              help="Fit on every N-th z-slice.")
@click.option("--balance", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Class weights (N / (C N_c)) ** BALANCE: 0 none, 1 every class alike.")
@click.option("--segmenter", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The ensemble (default: the shipped one).")
@click.option("--refiner", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The MAE (default: the shipped one).")
@click.option("--smooth", type=click.FloatRange(0, 16), default=2.0, show_default=True,
              help="Pixels of smoothing of the ensemble's probabilities for the outline "
                   "(background / IMS / inner structure); 0: pixel by pixel.")
@click.option("--rim/--no-rim", default=True, show_default=True,
              help="Turn rebuilt cristae or matrix beside background into IMS, and rebuilt IMS or "
                   "background enclosed by cristae or matrix into inner structure.")
def fusion(data, out, every, balance, segmenter, refiner, smooth, rim):
    """Fit the fused refinement (volref refine --method fused): how the ensemble's and the MAE's
    class probabilities combine where the MAE rebuilds, on phantoms with ground truth."""
    from volref.train.fusion import train_fusion

    _, card = train_fusion(list(data), out, every=every, balance=balance, segmenter=segmenter,
                           refiner=refiner, command=command_line(), log=click.echo,
                           smooth=smooth, rim=rim)
    fit = card["fit"]
    click.echo(f"fitted on {sum(fit['pixels'])} rebuilt pixels: loss {fit['loss_start']:.4f} -> "
               f"{fit['loss']:.4f}")
    click.echo(f"wrote {out}")
