"""A recipe's problems as messages: the line of every key in the YAML file, pydantic's errors reworded (an
unknown key with the closest valid one, an unknown rule with the rules there are), every problem of a file in
one RecipeError, in the file's order, each with its line (or the --set that gave it).
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import ValidationError

from grpo_cli.config.rule_entries import RULE_SPECS
from grpo_cli.config.schema import Recipe, section_type
from grpo_cli.config.sections import Section
from grpo_cli.errors import UserError


class RecipeError(UserError):
    """A recipe grpo cannot use: every problem found in it, each with its place."""


def line_map(text: str) -> dict[tuple, int]:
    """1-based line of every key and list item in the YAML text, by its path."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = path + (key_node.value,)
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _fields_at(raw_loc: tuple) -> list[str]:
    """Valid key names of the section that pydantic's `raw_loc` points into."""
    if len(raw_loc) > 2 and raw_loc[0] == "rewards" and raw_loc[2] in RULE_SPECS:
        return list(RULE_SPECS[raw_loc[2]].model_fields)
    loc = _clean_loc(raw_loc)
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = section_type(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags ('str', 'HubDataset', 'list[str]', a reward's rule) so a loc is
    a recipe path."""
    tags = {"str", "int", "float", "bool", "none", *(c.__name__ for c in Section.__subclasses__())}
    loc = tuple(p for p in loc if not (isinstance(p, str) and (p in tags or "[" in p)))
    if len(loc) > 2 and loc[0] == "rewards" and loc[2] in RULE_SPECS:
        loc = loc[:2] + loc[3:]
    return loc


def _describe(error: dict) -> str:
    loc = _clean_loc(error["loc"])
    dotted = ".".join(str(p) for p in loc) or "recipe"
    if error["type"] == "extra_forbidden":
        valid = _fields_at(tuple(error["loc"]))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        section = ".".join(str(p) for p in loc[:-1]) or "the recipe"
        return f"{dotted}: unknown key.{hint} Valid keys in {section}: {', '.join(valid)}."
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] in ("missing",):
        return f"{dotted}: required key is missing."
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = error.get("ctx", {}).get("tag")
        close = difflib.get_close_matches(str(tag), list(RULE_SPECS), n=1, cutoff=0.5) if tag else []
        hint = f" Did you mean '{close[0]}'?" if close else ""
        given = f"unknown rule {tag!r}." if tag else "each reward needs a rule."
        return f"{dotted}.rule: {given}{hint} The rules are: {', '.join(RULE_SPECS)}."
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{dotted}: {message}{shown}."


def _drop_union_noise(errors: list[dict]) -> list[dict]:
    """A `str | mapping` field reports one error per branch; keep the one that says what is wrong."""
    kept, seen = [], set()
    for error in errors:
        loc = _clean_loc(error["loc"])
        deeper = any(
            len(_clean_loc(other["loc"])) > len(loc) and _clean_loc(other["loc"])[: len(loc)] == loc
            for other in errors
        )
        if (error["type"].endswith("_type") and deeper) or loc in seen:
            continue
        seen.add(loc)
        kept.append(error)
    return kept


def schema_problems(error: ValidationError) -> list[tuple[tuple, str]]:
    """(recipe path, message) for each problem pydantic found, one per key."""
    return [(_clean_loc(e["loc"]), _describe(e)) for e in _drop_union_noise(error.errors())]


def report(items: list[tuple[tuple, str]], source: str, lines: dict) -> RecipeError:
    """One RecipeError for these (recipe path, message) items, each at the line `lines` gives its path (or the
    nearest enclosing one's)."""
    located = [(_nearest_line(lines, loc), text) for loc, text in items]
    located.sort(key=lambda item: item[0] if isinstance(item[0], int) else float("inf"))  # file order, then --set
    paragraphs = []
    for line, text in located:
        where = f"{source}:{line}" if isinstance(line, int) else (line or source)
        paragraphs.append(f"  {where}: {text}")
    count = len(paragraphs)
    head = f"{source}: {count} problem{'s' if count > 1 else ''} in the recipe:"
    return RecipeError("\n".join([head, *paragraphs]))


def _nearest_line(lines: dict[tuple, int | str], loc: tuple):
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None
