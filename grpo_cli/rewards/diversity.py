"""Is the group still exploring? Two diversity measures of a group's completions, logged each step.

When a policy collapses, every sample of a prompt says the same thing and the
group-relative advantage has nothing left to compare. These two measures
watch for it: `answer_diversity` is the fraction of distinct final answers in a
group, `text_diversity` the fraction of distinct word 3-grams over the group's
completions ("distinct-3"). Both are 1 for a group of all-different samples and
fall towards 1/G and 0 as the samples converge.
"""

from __future__ import annotations

from grpo_cli.rewards.answers import extract_final_answer, text_key

NGRAM = 3


def answer_diversity(completions: list[str]) -> float:
    """Distinct final answers / completions; a completion without an answer counts as its own."""
    answers = [extract_final_answer(c) for c in completions]
    distinct = {text_key(a) for a in answers if a is not None}
    return (len(distinct) + sum(a is None for a in answers)) / len(completions)


def text_diversity(completions: list[str], n: int = NGRAM) -> float:
    """Distinct word n-grams / all word n-grams over the group; 1 when there are none."""
    grams = [tuple(words[i : i + n]) for c in completions for words in [c.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def group_diversity(texts: list[str], group_size: int) -> tuple[float, float]:
    """(answer, text) diversity averaged over consecutive groups of `group_size` completions."""
    groups = [texts[i : i + group_size] for i in range(0, len(texts), group_size)]
    return (sum(answer_diversity(g) for g in groups) / len(groups),
            sum(text_diversity(g) for g in groups) / len(groups))
