"""Groups of scored completions: `grpo score` computes them for given completions, exactly as
training would, and `grpo samples` reads them back from a run's samples.jsonl.

Rows sharing a prompt form one group, as a rollout's G completions do; each
completion gets every rule's reward, the weighted total, and its advantage inside
its group. `grpo score` is the dry run for designing rewards before paying for a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli.update.advantages import group_advantages, total_reward
from grpo_cli.data.examples import build_examples, load_rows
from grpo_cli.errors import UserError
from grpo_cli.config.recipe import Recipe
from grpo_cli.rewards.rules import rule_functions
from grpo_cli.run.log import SAMPLES, read_jsonl
from grpo_cli.rewards.scoring import GRADERS, Scorer


@dataclass(frozen=True)
class ScoredCompletion:
    completion: str
    rewards: dict[str, float]  # rule -> reward (NaN where a custom rule skipped it)
    total: float  # weighted sum, the reward training uses
    advantage: float  # z-score inside the group


@dataclass(frozen=True)
class Group:
    prompt: str
    answer: str
    completions: list[ScoredCompletion]


def _prompt_tokenizer(recipe: Recipe):
    """Only a chat prompt needs the tokenizer (to see what its template opens); no weights load."""
    if not recipe.data.chat:
        return None
    from grpo_cli.model import builtin as builtin_model
    from grpo_cli.model.loading import load_tokenizer, resolve

    if recipe.model.name.startswith("builtin:"):
        return builtin_model.build_tokenizer()
    return load_tokenizer(resolve(recipe.model.name))


def _normalize_rows(rows: list[dict], recipe: Recipe) -> list[dict]:
    """One row per completion; `prompt`/`answer` stand in for the recipe's field names."""
    spec = recipe.data
    flat = []
    for number, row in enumerate(rows, 1):
        completions = row.get("completions") or ([row["completion"]] if row.get("completion") is not None else None)
        if not completions or isinstance(completions, str):
            raise UserError(f"row {number} needs 'completion' (a string) or 'completions' (a list of strings).")
        fields = {k: v for k, v in row.items() if k not in ("completion", "completions")}
        if spec.prompt_field not in fields and "prompt" in fields:
            fields[spec.prompt_field] = fields["prompt"]
        if spec.answer_field not in fields and "answer" in fields:
            fields[spec.answer_field] = fields["answer"]
        flat.extend({**fields, "_completion": str(c)} for c in completions)
    return flat


def score_completions(recipe: Recipe, path: Path, recipe_dir: Path | None = None) -> list[Group]:
    rules = rule_functions(recipe.rewards, recipe_dir)
    rows = _normalize_rows(load_rows(str(path)), recipe)
    examples = build_examples(rows, recipe.data, _prompt_tokenizer(recipe), str(path)).items
    by_prompt: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_prompt.setdefault(example.prompt, []).append(index)
    names = [r.key for r in recipe.rewards]
    weights = torch.tensor([r.weight for r in recipe.rewards], dtype=torch.float64)  # [R]
    contexts = [{"prompt": e.prompt, **{k: v for k, v in e.row.items() if k != "_completion"}} for e in examples]
    with Scorer({**GRADERS, **rules}) as scorer:
        scores = scorer.score(names, [e.prefill + e.row["_completion"] for e in examples], [e.answer for e in examples],
                              contexts)
    totals = total_reward(scores.values, weights)  # [N]
    groups = []
    for prompt, members in by_prompt.items():
        advantages, _ = group_advantages(totals[members], len(members))  # [G]
        groups.append(Group(prompt, examples[members[0]].answer, [
            ScoredCompletion(completion=examples[i].row["_completion"], rewards=dict(zip(names, scores.values[i].tolist())),
                             total=totals[i].item(), advantage=advantages[j].item())
            for j, i in enumerate(members)
        ]))
    return groups


def logged_groups(run_dir: Path, step: int | None = None) -> tuple[int, list[Group]]:
    """The groups a run logged in samples.jsonl at `step` (default: the latest logged step)."""
    rows = read_jsonl(Path(run_dir) / SAMPLES)
    if not rows:
        raise UserError(f"{run_dir} has no logged samples ({SAMPLES}); pass the directory of a grpo train run.")
    steps = sorted({r["step"] for r in rows})
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise UserError(f"no samples were logged at step {step}; the logged steps are {', '.join(map(str, steps))} "
                        "(output.samples_every sets how often).")
    groups: dict[int, Group] = {}
    for row in (r for r in rows if r["step"] == chosen):
        group = groups.setdefault(row["group"], Group(row["prompt"], row["answer"], []))
        group.completions.append(ScoredCompletion(completion=row["completion"], rewards=row["rewards"],
                                                  total=row["reward"], advantage=row["advantage"]))
    return chosen, list(groups.values())
