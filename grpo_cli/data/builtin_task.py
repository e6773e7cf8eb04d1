"""`builtin:arithmetic`: generated math problems with verifiable answers.

Three kinds, all small enough for the builtin tiny model to learn on a CPU:
two-digit additions, a one-digit times a two-digit number, and monic quadratics
with two distinct integer roots (x^2 - 5x + 6 = 0, the reward rules'
reference problem, is one).

Each problem also carries three reference solutions used only to warm-start the
builtin models: a *worked* one that writes the digit-by-digit steps before the
marked final answer, a *bare* one that writes only the final answer, and a *tool*
one that computes the answer in a python block, reads it from the output block
and marks it (tools/calls.py's format; builtin:tiny-math-tools sees these). The
worked form is easier for a small model to get right than the bare one, and the
tool form easier still, which is what GRPO has to discover in the quickstarts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TRAIN_ROWS = 3000
TEST_ROWS = 200
TRAIN_SEED = 1234
TEST_SEED = 4321
KIND_WEIGHTS = {"add": 0.6, "mul": 0.3, "quadratic": 0.1}


@dataclass(kw_only=True, frozen=True)
class Problem:
    question: str
    answer: str  # gold answer: "71", or "2, 3" for a quadratic's roots (ascending)
    worked: str  # steps, then the marked final answer
    bare: str  # the marked final answer alone
    kind: str
    code: str  # python that prints the answer
    printed: str  # what `code` prints (tests run it in the sandbox to check)

    @property
    def tool(self) -> str:
        """The tool-using solution: the code block, its output block as the rollout appends it, the answer."""
        return f"\n```python\n{self.code}\n```\n```output\n{self.printed}\n```\n{_final(self.answer)}"


def _final(answer: str) -> str:
    return f"#### {answer}"


def addition(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    low = a % 10 + b % 10
    carry = low // 10
    high = a // 10 + b // 10 + carry
    carry_term = "+1" if carry else ""
    steps = f"{a % 10}+{b % 10}={low}, {a // 10}+{b // 10}{carry_term}={high}."
    answer = str(a + b)
    return Problem(question=f"What is {a} + {b}?", answer=answer, worked=f" {steps} {_final(answer)}",
                   bare=f" {_final(answer)}", kind="add", code=f"print({a} + {b})", printed=answer)


def multiplication(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(10, 99)
    low = a * (b % 10)
    carry = low // 10
    high = a * (b // 10) + carry
    carry_term = f"+{carry}" if carry else ""
    steps = f"{a}*{b % 10}={low}, {a}*{b // 10}{carry_term}={high}."
    answer = str(a * b)
    # Both orders are asked; the steps always multiply the one-digit factor in.
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    return Problem(question=f"What is {first} * {second}?", answer=answer, worked=f" {steps} {_final(answer)}",
                   bare=f" {_final(answer)}", kind="mul", code=f"print({first} * {second})", printed=answer)


def _signed_term(coef: int, var: str) -> str:
    """' - 5x', ' + x', '' for a zero coefficient; var='' gives a constant term."""
    if coef == 0:
        return ""
    sign = "-" if coef < 0 else "+"
    magnitude = abs(coef)
    body = var if (var and magnitude == 1) else f"{magnitude}{var}"
    return f" {sign} {body}"


def _factor(root: int) -> str:
    if root == 0:
        return "x"
    return f"(x-{root})" if root > 0 else f"(x+{-root})"


def quadratic(rng: random.Random) -> Problem:
    r1, r2 = sorted(rng.sample(range(-9, 10), 2))
    b, c = -(r1 + r2), r1 * r2
    equation = f"x^2{_signed_term(b, 'x')}{_signed_term(c, '')} = 0"
    answer = f"{r1}, {r2}"
    steps = f"{_factor(r1)}{_factor(r2)}=0, x={r1} or x={r2}."
    polynomial = f"x*x{_signed_term(b, '*x')}{_signed_term(c, '')}".replace(" ", "").replace("+1*x", "+x") \
        .replace("-1*x", "-x")
    code = f"print([x for x in range(-9, 10) if {polynomial} == 0])"
    return Problem(question=f"Solve {equation}.", answer=answer, worked=f" {steps} {_final(answer)}",
                   bare=f" {_final(answer)}", kind="quadratic", code=code, printed=f"[{r1}, {r2}]")


MAKERS = {"add": addition, "mul": multiplication, "quadratic": quadratic}


def sample(rng: random.Random) -> Problem:
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    return MAKERS[rng.choices(kinds, weights)[0]](rng)


def generate(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """n distinct problems (by question), none of them in `exclude`, deterministic in seed.

    There are about 9,700 distinct questions in all, so n must stay well below that.
    """
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    problems: list[Problem] = []
    for _ in range(100 * n):
        problem = sample(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
            if len(problems) == n:
                return problems
    raise ValueError(f"could not draw {n} distinct problems; ask for fewer")


def test_split() -> list[Problem]:
    return generate(TEST_ROWS, TEST_SEED)


def train_split() -> list[Problem]:
    """Disjoint from the test split, so held-out accuracy is held out."""
    return generate(TRAIN_ROWS, TRAIN_SEED, exclude=frozenset(p.question for p in test_split()))


SPLITS = {"arithmetic": train_split, "arithmetic-test": test_split}
