"""The registry of refinement methods: every user of the list reads it from there."""

from __future__ import annotations

import click
import pytest

from volref.errors import ConfigError
from volref.methods import (
    DEFAULT_METHOD,
    REGISTRY,
    Method,
    markdown_table,
    method,
    names,
    table_order,
    trainable,
)


def test_every_list_of_methods_is_the_registry():
    from volref.cli.main import cli
    from volref.cli.train import train
    from volref.evaluate import methods as evaluate_methods
    from volref.evaluate.table2 import METHODS, PAPER, REFINERS
    from volref.models.registry import DEFAULT_REFINERS, WEIGHTS
    from volref.pipeline import refine
    from volref.pipeline.settings import RunSettings
    from volref.stages.settings import METHODS as STAGE_METHODS
    from volref.train.refiner import METHODS as TRAINED
    from volref.train.refiner import MODEL_FILES

    assert DEFAULT_METHOD in REGISTRY and RunSettings().method is None  # None: the default
    assert STAGE_METHODS == names() and set(REFINERS) == set(REGISTRY)
    assert METHODS == ("initial", *table_order(), "control", "truth") and REFINERS[-1] == names()[0]
    for command in ("refine", "run"):
        option = next(p for p in cli.commands[command].params if p.name == "method")
        assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == names()
        assert option.default is None and DEFAULT_METHOD in option.help
    option = next(p for p in train.commands["refiner"].params if p.name == "method")
    assert tuple(option.type.choices) == trainable() == TRAINED
    flags = {o for p in cli.commands["evaluate"].params for o in p.opts}
    assert {f"--{m}" for m in trainable()} <= flags
    assert DEFAULT_REFINERS == {m.name: WEIGHTS / m.weights for m in REGISTRY.values()
                                if m.weights}
    assert MODEL_FILES == {m: REGISTRY[m].weights for m in trainable()}
    for m in REGISTRY.values():  # every block kind has its engine and its evaluation function
        assert m.block in refine.BLOCKS and m.block in evaluate_methods.TILES
        assert (m.name in PAPER) == (m.paper is not None)


def test_entries_are_checked():
    assert method("crf").probabilities and method("crf").image and not method("mae").needs
    assert method("cnn-ae").replaces == method("crf").replaces == "tile"
    assert method("mae").replaces == "removed"
    with pytest.raises(ConfigError, match="unknown refinement method 'nope'"):
        method("nope")
    with pytest.raises(ValueError, match="inputs"):
        Method("x", "X", "x", model="mae", needs=frozenset({"truth"}))
    with pytest.raises(ValueError, match="trainable"):
        Method("x", "X", "x", model="ensemble", block="crf", trainable=True)


def test_the_readme_lists_the_registry():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme
