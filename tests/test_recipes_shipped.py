"""Every recipe we ship loads and validates, so none rots as the schema moves."""

from pathlib import Path

import pytest

from grpo_cli.config.recipe import load

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


def test_grpo_recipes_leaves_memory_to_the_estimate():
    """A figure written by hand beside a recipe drifts from what it needs (it said 24 GiB where the
    estimate says 5): `grpo recipes` states none and points to `grpo validate`, the one source."""
    import re

    from typer.testing import CliRunner

    from grpo_cli.cli import app

    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0
    listing, _, footer = result.output.partition("\nMemory:")
    assert all(path.stem in listing for path in RECIPES)
    assert not re.search(r"\d\s*(GiB|GB)\b", listing) and "grpo validate" in footer
