"""Every recipe we ship loads and validates, so none rots as the schema moves."""

from pathlib import Path

import pytest

from grpo_cli.recipe import load

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load(path)
    assert recipe.completions_per_step % (recipe.grpo.micro_batch_size or recipe.completions_per_step) == 0
    assert Path(recipe.output.dir).parts[0] == "runs"


def test_quickstart_uses_only_builtin_pieces():
    recipe = load(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert recipe.model.name.startswith("builtin:")
    assert recipe.data.train.startswith("builtin:") and recipe.data.eval.startswith("builtin:")
