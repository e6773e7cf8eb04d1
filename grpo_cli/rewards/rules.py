"""Reward rules: pure functions (completion, gold answer) -> float, and custom ones from the recipe.

The reference problem is x^2 - 5x + 6 = 0 with four graded answers; with the default
weights (correctness 1.0, step_format 0.2, reflection_bonus 0.1) these rules rank
them: reflection-then-correct 1.3 >= worked and correct 1.2 > bare boxed answer
0.8 > worked but wrong 0.2 (tests/quadratic_answers.py holds the four texts,
tests/test_rewards.py checks the ranking).

A completion is scored together with whatever the prompt template already opened
for it (e.g. a chat template that ends in "<think>"): see `data.Example.prefill`.
With the code tool, the rules here get the model's own text: what the tool printed is
left out, its output blocks kept empty (`scoring.Scorer.submit`, `tool_calls.model_text`),
so nothing printed counts as an answer, a step, a reflection, a think tag or length.
A custom rule gets the whole transcript, and `tool_outputs` if it asks.

`REWARD_RULES` is the one list of rules: `@reward_rule(...)` on a function adds it, and the
recipe schema (`rewards: [{rule: <name>, ...}]`), its error hints and the scorer all read it
from there (docs/extending.md).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from grpo_cli.rewards.answers import find_final, is_correct, think_tags
from grpo_cli.errors import UserError

Rule = Callable[[str, str], float]


class RuleOptions(BaseModel):
    """A rule's own keys in its recipe entry, beside rule, weight and name (which every rule has).

    Subclass it with pydantic fields for a rule that takes settings; the entry's values reach the
    rule's function as keyword arguments of the same names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def default_name(self, rule: str) -> str:
        """The entry's name in metrics (reward/<name>) when it sets none."""
        return rule


@dataclass(frozen=True, kw_only=True)
class RewardRule:
    """One registered rule: what a recipe calls it, its options, and what scores with it."""

    name: str
    function: Rule | None  # None: `build` makes the callable from the entry alone (the python rule)
    options: type[RuleOptions] = RuleOptions
    build: Callable[[Any, Path | None], Callable] | None = None  # (recipe entry, recipe's directory) -> callable

    def callable_for(self, spec, search_dir: Path | None = None) -> Callable:
        """What scores the recipe entry `spec`: the function, given the entry's options."""
        if self.build is not None:
            return self.build(spec, search_dir)
        settings = {field: getattr(spec, field) for field in self.options.model_fields}
        # without options, the function itself: the scorer knows some rules by identity (SETTLED_IN_PROCESS)
        return functools.partial(self.function, **settings) if settings else self.function


REWARD_RULES: dict[str, RewardRule] = {}  # name -> rule, in the order the recipe's error hints list them


def add_rule(rule: RewardRule) -> RewardRule:
    """Register `rule`; from then on recipes accept `{rule: <its name>}` and the scorer runs it."""
    if rule.name in REWARD_RULES:
        raise ValueError(f"a reward rule named {rule.name!r} is registered already")
    if not issubclass(rule.options, RuleOptions):
        raise TypeError(f"reward rule {rule.name}: its options must subclass RuleOptions")
    taken = {"rule", "weight", "name"} & set(rule.options.model_fields)
    if taken:
        raise TypeError(f"reward rule {rule.name}: every entry has {', '.join(sorted(taken))} already")
    if rule.function is not None and rule.build is None:
        parameters = inspect.signature(rule.function).parameters
        for field, info in rule.options.model_fields.items():
            if field not in parameters:
                raise TypeError(f"reward rule {rule.name}: option {field!r} is no argument of "
                                f"{rule.function.__name__}")
            if not info.is_required() and parameters[field].default not in (inspect.Parameter.empty, info.default):
                raise TypeError(f"reward rule {rule.name}: option {field!r} defaults to {info.default!r}, "
                                f"{rule.function.__name__} to {parameters[field].default!r}")
    REWARD_RULES[rule.name] = rule
    return rule


def reward_rule(options: type[RuleOptions] = RuleOptions, *, name: str | None = None):
    """Decorator: register a function (completion, answer, **options) -> float as a reward rule,
    under its own name unless `name` is given, its recipe keys being the fields of `options`."""

    def register(function: Rule) -> Rule:
        add_rule(RewardRule(name=name or function.__name__, function=function, options=options))
        return function

    return register


class _RuleFunctions(Mapping[str, Rule]):
    """name -> function of each registered rule that has one (all but python): a live view of REWARD_RULES."""

    def __getitem__(self, name: str) -> Rule:
        function = REWARD_RULES[name].function
        if function is None:
            raise KeyError(name)
        return function

    def __iter__(self) -> Iterator[str]:
        return (name for name, rule in list(REWARD_RULES.items()) if rule.function is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


RULE_FUNCTIONS: Mapping[str, Rule] = _RuleFunctions()

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


@reward_rule()
def correctness(completion: str, answer: str) -> float:
    """1 when the completion's final answer is mathematically equal to the gold answer, else 0."""
    return 1.0 if is_correct(completion, answer) else 0.0


@reward_rule()
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


@reward_rule()
def think_format(completion: str, answer: str) -> float:
    """A reasoning model's form: one think block, then a marked final answer.

    1  the text (the prompt's prefill in front, so a template that opened "<think>" counts) starts
       with <think>, thinks something, closes it with the only </think>, and marks a final answer
       after it (####, \\boxed{}, "The answer is", "Answer:": answers.find_final's markers)
    0  anything else: no think block; thinking that never closed; an empty one ("<think></think>");
       text before the <think>; a second block or a stray tag; no answer after </think>, an unmarked
       one, or an answer only inside the thinking
    """
    opens, closes = think_tags(completion)
    if len(opens) != 1 or len(closes) != 1 or completion[: opens[0].start()].strip():
        return 0.0  # (so the one </think> follows the <think>: only space stands before that)
    if not completion[opens[0].end() : closes[0].start()].strip():
        return 0.0
    final = find_final(completion)  # reads only what follows </think>
    return 1.0 if final is not None and final.marked and final.text.strip() else 0.0


@reward_rule()
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


class LengthOptions(RuleOptions):
    max_chars: int = Field(1000, gt=0, description="1 for an empty completion, falling to 0 at this many characters")


@reward_rule(LengthOptions)
def length(completion: str, answer: str, max_chars: int = 1000) -> float:
    """1 for an empty completion, falling linearly to 0 at `max_chars` characters and beyond:
    with a positive weight, a pull towards brevity."""
    return 1.0 - min(1.0, len(completion) / max_chars)


class RepetitionOptions(RuleOptions):
    ngram: int = Field(3, ge=1, description="word n-grams; the penalty is the fraction that repeat, as a negative")


@reward_rule(RepetitionOptions)
def repetition(completion: str, answer: str, ngram: int = 3) -> float:
    """Minus the fraction of the completion's word n-grams that repeat an earlier one: 0 for no
    repetition, towards -1 for a completion that loops. Shorter than n words: 0."""
    words = completion.split()
    grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
    if not grams:
        return 0.0
    return -(1.0 - len(set(grams)) / len(grams))


@dataclass(frozen=True, kw_only=True)
class CustomRule:
    """A rule from the user's module, called as function(completion=, answer=, prompt=, tool_outputs=, **row
    fields) (only the arguments it accepts), returning a number or None to skip the completion. `completion` is
    the whole transcript; `tool_outputs` the [start, end] characters of it that the code tool printed."""

    function: Callable
    timeout_s: float

    def __call__(self, completion: str, answer: str, context: dict) -> float | None:
        parameters = inspect.signature(self.function).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        arguments = {"completion": completion, "answer": answer, **context}
        return self.function(**(arguments if takes_all else {k: v for k, v in arguments.items() if k in parameters}))


def load_custom(function: str, timeout_s: float, search_dir: Path | None = None) -> CustomRule:
    """Import `module:function`, looking in `search_dir` (the recipe's directory) before the Python path."""
    module_name, function_name = function.split(":")
    if search_dir is not None and str(search_dir) not in sys.path:
        sys.path.insert(0, str(search_dir))  # the scoring workers inherit sys.path, so they find it too
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UserError(
            f"reward rule python: cannot import {module_name!r} for {function!r} ({type(exc).__name__}: {exc}). "
            f"Put {module_name.replace('.', '/')}.py next to the recipe ({search_dir}) or on PYTHONPATH."
        ) from None
    target = getattr(module, function_name, None)
    if not callable(target):
        raise UserError(f"reward rule python: {module_name} has no function {function_name!r}.")
    parameters = inspect.signature(target).parameters
    if not {"completion"} <= set(parameters) and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        raise UserError(f"reward rule python: {function} must accept `completion` (and may take answer, prompt "
                        "and the row's other fields): def rule(completion, answer, prompt, **fields) -> float | None.")
    return CustomRule(function=target, timeout_s=timeout_s)


class PythonOptions(RuleOptions):
    function: str = Field(..., pattern=r"^[\w.]+:[\w]+$", description="module:function, e.g. my_rewards:brevity")
    timeout_s: float = Field(5.0, gt=0, description="seconds one call may take; a slower call scores 0")

    def default_name(self, rule: str) -> str:
        return self.function.split(":")[1]


add_rule(RewardRule(name="python", function=None, options=PythonOptions,
                    build=lambda spec, where: load_custom(spec.function, spec.timeout_s, where)))


def rule_functions(specs, search_dir: Path | None = None) -> dict[str, Callable]:
    """The callable for each recipe reward entry, by its key (its name in metrics)."""
    return {spec.key: REWARD_RULES[spec.rule].callable_for(spec, search_dir) for spec in specs}
