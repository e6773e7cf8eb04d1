"""The recipes shipped with grpo (grpo_cli/recipes/, also reachable as recipes/ in a checkout)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from grpo_cli.errors import UserError

RECIPES_DIR = Path(__file__).parents[1] / "recipes"


@dataclass(frozen=True)
class Shipped:
    name: str
    path: Path
    summary: str  # the recipe's first comment line


def shipped() -> list[Shipped]:
    found = []
    for path in sorted(RECIPES_DIR.glob("*.yaml"), key=lambda path: path.stem):  # quickstart before quickstart-tools
        comments = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]
        found.append(Shipped(path.stem, path, comments[0] if comments else ""))
    return found


def _choices(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def close_names(name: str, candidates) -> list[str]:
    """Up to three of `candidates` that `name` looks like a misspelling of, closest first."""
    return difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)


def find(name: str) -> Path:
    """The shipped recipe called `name` (with or without .yaml)."""
    stem = _stem(name)
    for recipe in shipped():
        if recipe.name == stem:
            return recipe.path
    names = [r.name for r in shipped()]
    close = close_names(stem, names)
    guess = f" Did you mean {_choices(close)}?" if close else ""
    raise UserError(f"no shipped recipe named {name!r}.{guess} The shipped recipes are: {', '.join(names)}.")


def _stem(name: str) -> str:
    return name.removesuffix(".yaml").removesuffix(".yml")


def resolve(argument: Path) -> Path:
    """A recipe argument as given: an existing file, else the name of a shipped recipe, else the
    argument unchanged (loading it then reports the missing file). A name or path that looks like a
    misspelling of a shipped recipe's name or of a recipe file beside it is a UserError that names
    them."""
    if argument.exists():
        return argument
    bare = argument.parent == Path(".")
    names = [r.name for r in shipped()]
    if bare and _stem(argument.name) in names:
        return find(argument.name)
    close = _misspelt(argument, names if bare else [])
    if close:
        shipped_too = (" and no shipped recipe of that name", " (grpo recipes lists the shipped ones)") if bare \
            else ("", "")
        raise UserError(f"no recipe file {argument}{shipped_too[0]}. Did you mean {_choices(close)}?{shipped_too[1]}")
    return argument


def _misspelt(argument: Path, shipped_names: list[str]) -> list[str]:
    """What `argument` may have meant: shipped recipe names (for a bare name) and the YAML files in its directory."""
    try:
        files = [p.name for p in argument.parent.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()]
    except OSError:
        files = []
    by_stem = {_stem(n): n for n in shipped_names}
    by_stem.update({_stem(f): str(argument.parent / f) for f in files})  # a file beside it wins over a namesake
    return list(dict.fromkeys(by_stem[s] for s in close_names(_stem(argument.name), by_stem)))
