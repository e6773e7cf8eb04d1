"""Evaluation protocols over graded samples: mean accuracy, unbiased pass@k, majority vote.

Pure functions of booleans and answer strings; the equivalence used for voting is
passed in, so voting clusters "1/2" with "0.5" rather than comparing strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), the chance that at least
    one of k samples drawn without replacement from n (c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), stable for large n
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> int | None:
    """Index of the answer the most samples agree on, by `same`, or None when no sample answered.

    Answers are clustered in order: each joins the first cluster whose first member it
    equals. The biggest cluster wins; a tie goes to the cluster that appeared first.
    """
    clusters: list[list[int]] = []
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for cluster in clusters:
            if same(answers[cluster[0]], answer):
                cluster.append(index)
                break
        else:
            clusters.append([index])
    if not clusters:
        return None
    best = max(clusters, key=len)  # max keeps the first of equal lengths
    return best[0]


def k_values(n: int) -> list[int]:
    """The k to report pass@k for: powers of two up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
