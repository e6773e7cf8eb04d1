"""The recipe: reading a YAML file with `--set` overrides, validating it, writing it back, and what a resumed
run may change. Everything a run does is decided here, before any model loads. Unknown keys are errors that
name the file, the line and the closest valid key; every error in a file is reported at once.

The parts, each in its module (and importable from here, the one place callers import the recipe from):
the sections' keys in sections.py, the rewards' entries (one per registered rule) in rule_entries.py, the
whole Recipe in schema.py, the checks across sections in checks.py, the messages with their lines in
messages.py, and defaults other commands share in defaults.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from grpo_cli.config.checks import cross_field_problems
from grpo_cli.config.messages import RecipeError, line_map, report, schema_problems
from grpo_cli.config.rule_entries import RULE_SPECS
from grpo_cli.config.schema import Recipe, follow_registries, out_of_bounds, section_type
from grpo_cli.config.sections import (AUTO_MAX_NEW_TOKENS_CAP, MIN_AUTO_MAX_NEW_TOKENS, MIN_TOOL_TIMEOUT_S,
                                      RESERVED_TEMPLATE_KWARGS, DataSpec, DatasetRef, GrpoSpec, HubDataset, ModelSpec,
                                      TrainSpec, reserved_template_kwargs)

__all__ = [
    # this module's own
    "RESUME_FIXED", "apply_override", "changes", "dump", "load", "parse_override", "validate",
    # from the modules it is made of, for the rest of grpo to import from here
    "AUTO_MAX_NEW_TOKENS_CAP", "MIN_AUTO_MAX_NEW_TOKENS", "MIN_TOOL_TIMEOUT_S", "RESERVED_TEMPLATE_KWARGS",
    "RULE_SPECS", "DataSpec", "DatasetRef", "GrpoSpec", "HubDataset", "ModelSpec", "Recipe", "RecipeError",
    "TrainSpec", "out_of_bounds", "reserved_template_kwargs", "section_type"]


def validate(data: dict, source: str = "recipe", lines: dict[tuple, Any] | None = None) -> Recipe:
    """A Recipe from plain data, or a RecipeError listing every problem with its line."""
    lines = lines or {}
    follow_registries()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise report(schema_problems(exc), source, lines) from None
    problems = cross_field_problems(recipe)
    if problems:
        raise report([(loc, f"{'.'.join(map(str, loc))}: {text}.") for loc, text in problems], source, lines)
    return recipe


def parse_override(text: str) -> tuple[tuple, Any]:
    """'grpo.kl_beta=0.02' -> (('grpo', 'kl_beta'), 0.02); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected KEY=VALUE, e.g. --set grpo.kl_beta=0.02")
    key, raw = text.split("=", 1)
    parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    if not key.strip() or any(p == "" for p in parts):
        raise RecipeError(f"--set {text}: the key must be a dotted path such as grpo.kl_beta")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({exc})") from None
    return parts, value


def apply_override(data: dict, path: tuple, value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(f"--set {text}: {'.'.join(map(str, path[: i + 1]))} is not an item of the list")
            node = node[part]
            continue
        child = node.get(part)
        if not isinstance(child, (dict, list)):
            # A missing or null section (e.g. `lora: null`) becomes a mapping the override fills in.
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError(f"--set {text}: {'.'.join(map(str, path))} is not an item of the list")
    node[last] = value


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise RecipeError(f"recipe {path} not found{hint}. Pass the path of a YAML recipe, e.g. recipes/quickstart.yaml.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        lines: dict[tuple, Any] = line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: malformed YAML: {problem}. Check the indentation and quoting there.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, data, grpo, ...), not a {type(data).__name__}.")
    for text_override in overrides:
        key, value = parse_override(text_override)
        apply_override(data, key, value, text_override)
        for known in list(lines):
            if known[: len(key)] == key:
                del lines[known]
        lines[key] = f"--set {text_override}"
    return validate(data, source=str(path), lines=lines)


# Settings a resumed run cannot change without training something else than what the checkpoint holds.
RESUME_FIXED = ("model.name", "model.load_in_4bit", "model.lora", "data.train", "data.prompt_field",
                "data.answer_field", "data.template", "data.chat", "data.system_prompt", "grpo.group_size",
                "train.seed", "data.chat_template_kwargs", "model.adapter", "model.adapter_mode")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def changes(before: Recipe, after: Recipe) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(changes resume must refuse, changes it can allow), each {dotted key: (before, after)}."""
    old, new = _flatten(before.model_dump(mode="json")), _flatten(after.model_dump(mode="json"))
    changed = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}
    if new.get("grpo.max_new_tokens") == "auto":
        changed.pop("grpo.max_new_tokens", None)  # a resumed run keeps the number auto resolved to when it started
    fixed = {k: v for k, v in changed.items() if any(k == f or k.startswith(f + ".") for f in RESUME_FIXED)}
    return fixed, {k: v for k, v in changed.items() if k not in fixed}


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default written out."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
