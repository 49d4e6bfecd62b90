"""Recipes: shipped ones load; bad keys and values are rejected with the field's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemt.config import Recipe, list_recipes, load_recipe, to_dict
from edgemt.errors import ConfigError


def test_shipped_demo_recipe_loads() -> None:
    assert "demo" in list_recipes()
    r = load_recipe("demo")
    assert isinstance(r, Recipe) and r.name == "demo"
    assert r.data.tasks == ["semseg", "depth", "normals", "edge"]
    assert r.data.crop == (96, 128)
    assert r.pipeline[0] == "data" and r.pipeline[-1] == "report"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train: {stepz: 3}", r"train\.stepz: unknown key; allowed keys here: \[.*'steps'"),
        ("train: {optimizer: sgd}", r"train\.optimizer: 'sgd' is not allowed; allowed values: \['adam', 'adamw'\]"),
        ("train: {steps: many}", r"train\.steps: expected an integer, got 'many'"),
        ("data: {tasks: [semseg, colour]}", r"data\.tasks\[1\]: unknown task 'colour'; allowed: \["),
        ("data: {crop: [96]}", r"data\.crop: expected a list of 2 values"),
        ("data: {synth: {train: 1.5}}", r"data\.synth\.train: expected an integer"),
        ("data: {flip: yes please}", r"data\.flip: expected true or false"),
        (
            "validate: {parity: {fp32: {semseg_agreement: x}}}",
            r"validate\.parity\.fp32\.semseg_agreement: expected a number",
        ),
        ("- just\n- a list", r"expected a mapping at the top level"),
        ("train: [", r"invalid YAML"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_recipe(_write(tmp_path, text))


def test_overrides_apply_and_validate() -> None:
    r = load_recipe("demo", {"train.steps": 7, "data.synth.train": 9})
    assert r.train.steps == 7 and r.data.synth.train == 9
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        load_recipe("demo", {"train.lr": "fast"})


def test_missing_recipe_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"shipped: \[.*'demo'"):
        load_recipe("no-such-recipe")


def test_round_trip_through_dict(tmp_path: Path) -> None:
    import yaml

    r = load_recipe("demo")
    p = _write(tmp_path, yaml.safe_dump(to_dict(r)))
    assert load_recipe(p) == r


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads_and_names_a_registered_model(name: str) -> None:
    from edgemt.models import list_models
    from edgemt.pipeline import registry

    r = load_recipe(name)
    assert r.name == name
    assert r.teacher.name in list_models(), r.teacher.name
    assert set(r.pipeline) <= set(registry().stages)
    if r.data.dataset == "pascal":
        assert r.data.eval_size is not None  # fixed-grid teachers need a fixed validation size
