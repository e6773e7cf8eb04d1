"""The labelled grader set (tests/data/grader): well-formed with provenance, and the grader meets its
target on it: on every source, agreement with the labels at least math-verify alone's and no more
false positives (scripts/grader_check.py computes both, side by side)."""

import json
import re

import pytest

from conftest import TEST_DATA
from test_scripts import run_script

GRADER_SET = TEST_DATA / "grader"
ORIGIN = re.compile(r"[\w.-]+/[\w.-]+@[0-9a-f]{12}:\S+:\S+")


def rows() -> list[dict]:
    return [json.loads(line) for path in sorted(GRADER_SET.glob("*.jsonl")) for line in open(path)]


def test_every_row_says_where_it_comes_from():
    everything = rows()
    assert len({r["id"] for r in everything}) == len(everything)
    for row in everything:
        assert ORIGIN.fullmatch(row["origin"]), row["id"]
        assert row["kind"] in ("pair", "completion") and isinstance(row["label"], bool), row["id"]
        assert isinstance(row["gold"], str) and isinstance(row["response"], str), row["id"]


def test_the_set_is_as_large_and_varied_as_promised():
    everything = rows()
    pairs = [r for r in everything if r["kind"] == "pair"]
    completions = [r for r in everything if r["kind"] == "completion"]
    assert len(pairs) >= 600 and len({r["source"] for r in pairs}) >= 4
    assert len(completions) >= 300
    # both verdicts, on both sides: wrong answers that look right are where graders fail
    for kind in (pairs, completions):
        assert sum(not r["label"] for r in kind) >= 100 and sum(r["label"] for r in kind) >= 200


def test_every_source_file_has_its_licence_and_notes():
    readme = (GRADER_SET / "README.md").read_text()
    for path in GRADER_SET.glob("*.jsonl"):
        assert f"`{path.name}`" in readme, path.name
        assert (GRADER_SET / f"notes-{path.stem}.md").is_file(), path.name


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("grader") / "figures.json"
    run_script("scripts/grader_check.py", "--only-set", "--json", str(out))
    return json.loads(out.read_text())["set"]


def test_on_every_source_grpo_agrees_at_least_as_often_as_math_verify_with_no_more_false_positives(figures):
    assert len(figures) >= 8
    for source, entry in figures.items():
        ours, alone = entry["target"]["grpo"], entry["target"]["math_verify"]
        assert ours["agree"] >= alone["agree"], (source, ours, alone)
        assert ours["fp"] <= alone["fp"], (source, ours, alone)


def test_the_grader_beats_math_verify_alone_on_real_latex_completions(figures):
    ours = sum(e["target"]["grpo"]["agree"] for e in figures.values() if e["kind"] == "completion")
    alone = sum(e["target"]["math_verify"]["agree"] for e in figures.values() if e["kind"] == "completion")
    false_positives = sum(e["target"]["grpo"]["fp"] for e in figures.values())
    assert ours > alone and false_positives <= 2
