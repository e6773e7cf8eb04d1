"""Reward rules: pure functions (completion, gold answer) -> float.

The product brief grades four answers to x^2 - 5x + 6 = 0; with the default
weights (correctness 1.0, step_format 0.2, reflection_bonus 0.1) these rules rank
them: reflection-then-correct 1.3 >= worked and correct 1.2 > bare boxed answer
0.8 > worked but wrong 0.2 (tests/test_rewards.py holds the four texts).

A completion is scored together with whatever the prompt template already opened
for it (e.g. a chat template that ends in "<think>"): see `data.Example.prefill`.
"""

from __future__ import annotations

import re
from typing import Callable

from grpo_cli.answers import find_final, is_correct

Rule = Callable[[str, str], float]

# A step: a clause that does arithmetic or states an equation.
_CLAUSE_SPLIT = re.compile(r"\n|(?<=[.;,:])\s+|\s+(?:so|then|thus|therefore|hence)\s+", re.IGNORECASE)
_OPERATION = re.compile(r"[=+*/^×÷<>≤≥]|\\(?:frac|cdot|times|div|sqrt|pm)|\d\s*-\s*\d|\(\s*x\s*[-+]")
_HAS_MATH = re.compile(r"[\dA-Za-z]")

REFLECTION = re.compile(
    r"\b(?:wait|hmm|let me (?:re-?)?(?:check|verify|think again|try (?:again|another))|"
    r"let'?s (?:re-?)?(?:check|verify|try (?:again|another))|double[- ]check|"
    r"(?:that|this) (?:is|was|'s) (?:not right|wrong|incorrect)|i made an? (?:mistake|error)|"
    r"went wrong|doesn'?t work|on second thought|re-?examine)\b",
    re.IGNORECASE,
)
MAX_REFLECTIONS = 3  # more than this reads as repeating the phrase for the bonus, which then pays nothing


def count_steps(work: str) -> int:
    """Clauses in `work` that compute something or state an equation."""
    return sum(
        1 for clause in _CLAUSE_SPLIT.split(work) if _OPERATION.search(clause) and _HAS_MATH.search(clause)
    )


def correctness(completion: str, answer: str) -> float:
    """1 when the completion's final answer is mathematically equal to the gold answer, else 0."""
    return 1.0 if is_correct(completion, answer) else 0.0


def step_format(completion: str, answer: str) -> float:
    """Worked steps before a clearly marked final answer.

    +1  at least one step, then a marked final answer (####, \\boxed{}, "The answer is", "Answer:")
     0  steps, but the final answer is not marked
    -1  no steps at all: a bare answer (even a right one) or nothing
    """
    final = find_final(completion)
    work = completion[: final.start] if final else completion
    if count_steps(work) == 0:
        return -1.0
    return 1.0 if final is not None and final.marked else 0.0


def reflection_bonus(completion: str, answer: str) -> float:
    """1 when the completion checks or revises its work, keeps working after that, and ends correct.

    Paid at most once; a completion that says one of the phrases more than
    MAX_REFLECTIONS times gets nothing, so repeating "wait" cannot farm it.
    """
    final = find_final(completion)
    if final is None:
        return 0.0
    work = completion[: final.start]
    marks = list(REFLECTION.finditer(work))
    if not marks or len(marks) > MAX_REFLECTIONS:
        return 0.0
    if count_steps(work[marks[-1].end() :]) == 0:
        return 0.0  # a bare "wait" right before the answer revises nothing
    return correctness(completion, answer)


RULES: dict[str, Rule] = {
    "correctness": correctness,
    "step_format": step_format,
    "reflection_bonus": reflection_bonus,
}
