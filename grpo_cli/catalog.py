"""The recipes shipped with grpo (grpo_cli/recipes/, also reachable as recipes/ in a checkout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpo_cli.errors import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class Shipped:
    name: str
    path: Path
    summary: str  # the recipe's first comment line


def shipped() -> list[Shipped]:
    found = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        comments = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]
        found.append(Shipped(path.stem, path, comments[0] if comments else ""))
    return found


def find(name: str) -> Path:
    """The shipped recipe called `name` (with or without .yaml)."""
    stem = name.removesuffix(".yaml")
    for recipe in shipped():
        if recipe.name == stem:
            return recipe.path
    names = ", ".join(r.name for r in shipped())
    raise UserError(f"no shipped recipe named {name!r}; the shipped recipes are: {names}.")


def resolve(argument: Path) -> Path:
    """A recipe argument as given: an existing file, else the name of a shipped recipe, else the
    argument unchanged (loading it then reports the missing file)."""
    if argument.exists() or argument.parent != Path("."):
        return argument
    names = {r.name for r in shipped()}
    return find(argument.name) if argument.name.removesuffix(".yaml") in names else argument
