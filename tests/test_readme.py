"""The README documents every recipe key, and its commands are the ones CI runs."""

from pathlib import Path

from grpo_cli.recipe import RULE_SPECS, Recipe, _section_type

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def recipe_keys() -> list[str]:
    """Every key a recipe can set, as the README writes it: model.lora.r, rewards[].weight, ..."""
    keys = []
    for spec in RULE_SPECS.values():
        keys.extend(f"rewards[].{name}" for name in spec.model_fields if f"rewards[].{name}" not in keys)
    for section, field in Recipe.model_fields.items():
        if section == "rewards":
            continue
        model = _section_type(field.annotation)
        prefix = f"{section}."
        for name, inner in model.model_fields.items():
            keys.append(prefix + name)
            if name == "lora":
                keys.extend(f"{prefix}lora.{sub}" for sub in _section_type(inner.annotation).model_fields)
    return keys


def test_every_recipe_key_is_documented():
    keys = recipe_keys()
    assert "train.lr" in keys and "model.lora.r" in keys and "rewards[].weight" in keys
    missing = [k for k in keys if f"`{k}`" not in README]
    assert not missing


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0" in ci and 'pip install -e ".[test]"' in ci and "python -m pytest -q" in ci
    assert 'pip install torch==2.13.0 && pip install -e ".[test]"\npython -m pytest -q' in README


def test_the_failure_modes_document_names_real_tests():
    import re

    document = (ROOT / "docs" / "failure-modes.md").read_text()
    sources = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    named = set(re.findall(r"::(test_\w+)|`(test_\w+)`", document))
    names = {a or b for a, b in named}
    assert len(names) > 20
    assert [n for n in names if f"def {n}(" not in sources] == []
