"""Held-out accuracy: greedy pass@1 on a dataset, graded by the correctness rule."""

from __future__ import annotations

import time
from dataclasses import dataclass

from grpo_cli.data import Example
from grpo_cli.rollout import generate
from grpo_cli.scoring import Scorer


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # fraction of examples whose greedy completion is correct
    n: int
    correct: list[bool]
    completions: list[str]
    seconds: float


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int,
    scorer: Scorer,
    batch_size: int = 64,
    add_special_tokens: bool = True,
    on_batch=None,
) -> EvalResult:
    """Greedy completions for every example, in batches, then graded in one go."""
    started = time.perf_counter()
    completions: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        rollout = generate(
            model, tokenizer, [e.prompt for e in batch], max_new_tokens, greedy=True,
            add_special_tokens=add_special_tokens,
        )
        completions.extend(rollout.texts)
        if on_batch:
            on_batch(len(completions), len(examples))
    graded = scorer.score(["correctness"], [e.prefill + c for e, c in zip(examples, completions)],
                          [e.answer for e in examples])
    correct = [bool(v) for v in graded.column("correctness")]
    return EvalResult(
        accuracy=sum(correct) / len(correct),
        n=len(correct),
        correct=correct,
        completions=completions,
        seconds=time.perf_counter() - started,
    )
