"""Generate answers for a dataset and grade them: the one evaluation path, for `grpo eval`
and for a training run's held-out evaluations.

Greedy decoding gives pass@1. With k samples per problem the report adds the mean
accuracy over samples, unbiased pass@k, and maj@k (a majority vote over the
extracted answers, clustered by mathematical equivalence). Grading uses the
`correctness` rule through the scoring pool, so no answer can hang an evaluation.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

from grpo_cli.rewards.answers import extract_final_answer, gold_answer
from grpo_cli.config.defaults import EVAL_BATCH_SIZE
from grpo_cli.data.examples import Example, json_kind
from grpo_cli.errors import listed
from grpo_cli.run.guard import drop_point
from grpo_cli.run.protocols import k_values, majority_vote, pass_at_k
from grpo_cli.rollout.sampling import generate
from grpo_cli.rollout.settings import Sampling
from grpo_cli.rewards.scoring import Scorer

GROUP_FIELDS = ("subject", "level", "kind", "model")  # per-value breakdowns when the rows carry these


@dataclass(kw_only=True, frozen=True)
class EvalItem:
    gold: str
    completions: list[str]  # k of them (1 when greedy)
    extracted: list[str | None]  # the final answer each completion states
    correct: list[bool]
    fields: dict = field(default_factory=dict)  # carried from the input row (problem, subject, level, ...)
    majority: int | None = None  # index of the maj@k answer; None when no sample answered
    timed_out: list[bool] = field(default_factory=list)  # grading ran past the time limit: wrong, but no verdict
    vote_timeouts: int = 0  # answer comparisons of the majority vote cut off (those two answers count as different)


@dataclass(frozen=True)
class EvalReport:
    items: list[EvalItem]
    seconds: float

    @property
    def samples(self) -> int:
        """Samples per problem: the fewest any problem has, so pass@k and maj@k stay defined when
        problems were given different numbers (`grpo eval --predictions` refuses those files)."""
        return min((len(i.completions) for i in self.items), default=0)

    @property
    def timeouts(self) -> int:
        """Gradings and vote comparisons cut off at the time limit (each counted as not equal)."""
        return sum(sum(i.timed_out) + i.vote_timeouts for i in self.items)

    @property
    def accuracy(self) -> float:
        """pass@1: per problem the fraction of its samples that are correct, averaged."""
        return sum(sum(i.correct) / len(i.correct) for i in self.items) / len(self.items)

    def summary(self) -> dict:
        k = self.samples
        figures: dict = {"accuracy": self.accuracy, "n": len(self.items), "samples": k,
                         "correct": sum(sum(i.correct) for i in self.items), "timeouts": self.timeouts}
        if k > 1:
            figures["mean_accuracy"] = self.accuracy
            for kk in k_values(k):
                figures[f"pass@{kk}"] = sum(pass_at_k(len(i.correct), sum(i.correct), kk) for i in self.items) / len(self.items)
            figures[f"maj@{k}"] = sum(i.majority is not None and i.correct[i.majority] for i in self.items) / len(self.items)
        for name in GROUP_FIELDS:
            groups = defaultdict(list)
            for item in self.items:
                if name in item.fields:
                    groups[str(item.fields[name])].append(sum(item.correct) / len(item.correct))
            if len(groups) > 1:
                figures[f"by_{name}"] = {key: {"accuracy": sum(v) / len(v), "n": len(v)} for key, v in sorted(groups.items())}
        return figures


def generate_completions(model, tokenizer, prompts: list[str], sampling: Sampling, batch_size: int = EVAL_BATCH_SIZE,
                         on_progress=None, sampler=None) -> list[list[str]]:
    """`sampling.samples_per_prompt` completions per prompt, in input order.

    Prompts are batched by token length, so a batch pads to similar lengths. `sampler(tokenizer, prompts,
    sampling)`: rollout.generate but the model (a training run passes its Parallel's generate).
    """
    sampler = sampler or (lambda tokenizer, prompts, sampling: generate(model, tokenizer, prompts, sampling))
    samples = sampling.samples_per_prompt
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=sampling.add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        drop_point()  # a SIGTERM during a run's evaluation drops it here (guard.Interrupts.droppable)
        batch = order[start : start + batch_size]
        rollout = sampler(tokenizer, [prompts[i] for i in batch], sampling)
        for j, index in enumerate(batch):
            out[index] = rollout.texts[j * samples : (j + 1) * samples]
        if on_progress:
            on_progress(min(start + batch_size, len(order)), len(order))
    return out


def _vote(items: list[EvalItem], scorer: Scorer) -> list[EvalItem]:
    """Fill in each item's maj@k answer, comparing answers by equivalence in the scoring pool."""
    pairs = sorted({(a, b) for item in items for i, a in enumerate(item.extracted) for b in item.extracted[i + 1 :]
                    if a is not None and b is not None and a != b})
    equal, cut_off = {}, set()
    if pairs:
        scores = scorer.score(["equivalent"], [a for a, _ in pairs], [b for _, b in pairs])
        equal = {pair: bool(v) for pair, v in zip(pairs, scores.column("equivalent"))}
        cut_off = {frozenset(pair) for pair, late in zip(pairs, scores.timed_out("equivalent")) if late}

    def same(a: str, b: str) -> bool:
        return a == b or equal.get((a, b), False) or equal.get((b, a), False)

    def vote_timeouts(extracted: list[str | None]) -> int:
        distinct = sorted({a for a in extracted if a is not None})
        return sum(frozenset((a, b)) in cut_off for i, a in enumerate(distinct) for b in distinct[i + 1 :])

    return [replace(i, majority=majority_vote(i.extracted, same), vote_timeouts=vote_timeouts(i.extracted))
            for i in items]


def grade(golds: list[str], completions: list[list[str]], scorer: Scorer, fields: list[dict] | None = None,
          prefills: list[str] | None = None) -> list[EvalItem]:
    """Grade k completions per problem against its gold answer (bare form)."""
    prefills = prefills or [""] * len(golds)
    flat = [(p + c, g) for g, cs, p in zip(golds, completions, prefills) for c in cs]
    scores = scorer.score(["correctness"], [c for c, _ in flat], [g for _, g in flat])
    values, late = scores.column("correctness"), scores.timed_out("correctness")  # [N], [N]
    fields = fields or [{} for _ in golds]
    items, at = [], 0
    for gold, group, prefill, row in zip(golds, completions, prefills, fields):
        span = slice(at, at + len(group))
        at += len(group)
        items.append(EvalItem(gold=gold, completions=list(group),
                              extracted=[extract_final_answer(prefill + c) for c in group],
                              correct=[bool(v) for v in values[span]], fields=row,
                              timed_out=[bool(t) for t in late[span]]))
    if any(len(g) > 1 for g in completions):
        items = _vote(items, scorer)
    return items


def evaluate(model, tokenizer, examples: list[Example], sampling: Sampling, scorer: Scorer, batch_size: int = EVAL_BATCH_SIZE,
             on_progress=None, sampler=None) -> EvalReport:
    """Generate and grade `sampling.samples_per_prompt` completions per problem (Sampling.for_evaluation:
    greedy for one)."""
    started = time.perf_counter()
    completions = generate_completions(model, tokenizer, [e.prompt for e in examples], sampling, batch_size,
                                       on_progress, sampler)
    items = grade([e.answer for e in examples], completions, scorer, [e.row for e in examples],
                  [e.prefill for e in examples])
    return EvalReport(items, time.perf_counter() - started)


def grade_predictions(rows: list[dict], scorer: Scorer, places: list[str] | None = None) -> EvalReport:
    """Grade completions produced elsewhere: rows with `answer` and `completion` or `completions`.

    Every row is graded or none is: a ValueError names each row that cannot be (by `places`, the
    rows' lines, default their numbers), since a row left out would change the accuracy without a
    word.
    """
    started = time.perf_counter()
    places = places or [f"row {i}" for i in range(1, len(rows) + 1)]
    problems = [f"{where}{problem}" for where, row in zip(places, rows) if (problem := _prediction_problem(row))]
    if problems:
        raise ValueError(f"{len(problems)} of {len(rows)} rows cannot be graded: {listed(problems, '; ')}")
    groups = [row["completions"] if "completions" in row else [row["completion"]] for row in rows]
    golds = [gold_answer(row["answer"]) for row in rows]
    fields = [{k: v for k, v in row.items() if k not in ("completion", "completions")} for row in rows]
    return EvalReport(grade(golds, [[str(c) for c in g] for g in groups], scorer, fields), time.perf_counter() - started)


def _prediction_problem(row) -> str | None:
    """What keeps a predictions row from being graded, written to follow its place ("line 4 ..."), or None."""
    if not isinstance(row, dict):
        return f" is {json_kind(row)}, not an object"
    if "answer" not in row or ("completion" not in row and "completions" not in row):
        return " needs 'answer' and 'completion' (a string) or 'completions' (a list)"
    if "completion" in row and "completions" in row:
        return " has both 'completion' and 'completions'; keep the one to grade"
    if row["answer"] is None or not gold_answer(row["answer"]):
        return " has an empty 'answer'"
    group = row["completions"] if "completions" in row else [row["completion"]]
    if not isinstance(group, list) or not group:
        return ": 'completions' must be a non-empty list of strings"
    if any(c is None for c in group):
        return ' has a null completion (write "" to grade a missing completion as wrong)'
    if any(isinstance(c, (dict, list)) for c in group):
        return " has a completion that is not a string"
    return None
