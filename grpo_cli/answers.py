"""Final answers: where a completion states one, and whether it equals the gold answer.

Extraction is ours (models mark answers in many ways); mathematical equivalence is
math-verify's (it parses LaTeX and plain text into SymPy and compares). Every
function here is pure and safe in any thread because math-verify's own timeouts
are switched off: they use signal.alarm, which fails off the main thread, and
would cancel an outer alarm. Timeouts are the caller's job: `scoring` runs these
functions in worker processes under its own per-call alarm and kills a worker
that still overruns, so no call can hang a run.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

# A marker introducing the final answer; the answer runs to the end of its line.
_LINE_MARKERS = re.compile(
    r"(?:####|(?:the\s+)?final\s+answer\s*(?:is|:)|the\s+answer\s+is|^\s*answer\s*:|^\s*a\s*:)",
    re.IGNORECASE | re.MULTILINE,
)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_VALUE = r"-?\d+(?:\.\d+)?(?:/\d+)?"
# "x = 2 or x = 3", "x=2, 3": a list of values for one variable, as solutions of equations are stated
_ROOT_LIST = re.compile(rf"[a-zA-Z]\s*=\s*{_VALUE}(?:\s*(?:,|\bor\b|\band\b)\s*(?:[a-zA-Z]\s*=\s*)?{_VALUE})+")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"(?<![\w\\])[a-zA-Z]\s*=\s*(?=[-+(\\\d.])")
_OR = re.compile(r"\s*(?:\\text\{\s*(?:or|and)\s*\}|\bor\b|\band\b)\s*")
_TRAILING_WORDS = re.compile(r"^(-?[\d.,/]+)\s+[a-zA-Z][a-zA-Z .']*$")
_INTEGER = re.compile(r"-?\d+")
_INTEGER_LIST = re.compile(r"-?\d+(\s*,\s*-?\d+)+")  # "2, -3": how roots and multiple answers are written


@dataclass(frozen=True)
class Final:
    """The final answer a completion states, and where the marker that introduces it starts."""

    text: str
    start: int  # index in the completion where the marker (or the bare number) starts
    marked: bool  # False when it is only the last number of the text


def _boxes(text: str) -> list[tuple[int, str]]:
    """(start, content) of every \\boxed{...}, with nested braces balanced."""
    found = []
    for match in _BOX.finditer(text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((match.start(), text[match.end() : i - 1]))
    return found


def find_final(text: str) -> Final | None:
    """The last explicitly marked answer (####, \\boxed{}, 'the answer is', 'Answer:', 'A:'),
    else a closing list of solutions ("x = 2 or x = 3") on the last line, else the last number
    in the text, else None.

    Several boxes on the line of the last box are one answer ("\\boxed{2}, \\boxed{3}" -> "2, 3").
    """
    candidates: list[Final] = []
    boxes = _boxes(text)
    if boxes:
        last_line_start = text.rfind("\n", 0, boxes[-1][0]) + 1
        same_line = [(s, c) for s, c in boxes if s >= last_line_start]
        candidates.append(Final(", ".join(c.strip() for _, c in same_line), same_line[0][0], True))
    for match in _LINE_MARKERS.finditer(text):
        end = text.find("\n", match.end())
        rest = text[match.end() : end if end >= 0 else len(text)]
        if _BOX.search(rest):
            continue  # "The answer is \boxed{5}": the box candidate covers it
        candidates.append(Final(rest.strip(), match.start(), True))
    if candidates:
        return max(candidates, key=lambda c: c.start)
    plain = text.translate(_MINUS)
    last_line_start = plain.rstrip().rfind("\n") + 1
    roots = list(_ROOT_LIST.finditer(plain, last_line_start))
    if roots:
        return Final(roots[-1].group(), roots[-1].start(), False)
    numbers = list(_NUMBER.finditer(plain))
    if numbers:
        return Final(numbers[-1].group(), numbers[-1].start(), False)
    return None


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer as written, or None (an empty box counts as none)."""
    final = find_final(text)
    return final.text if final and final.text.strip() else None


def gold_answer(raw: str) -> str:
    """A dataset's answer field as a bare answer: GSM8K's worked '... #### 42' -> '42'."""
    raw = str(raw)
    if "####" in raw:
        return raw.rsplit("####", 1)[1].strip()
    boxes = _boxes(raw)
    return boxes[-1][1].strip() if boxes else raw.strip()


def normalize(answer: str) -> str:
    """Cosmetic differences removed: unicode minus, $ signs, thousands commas, 'x =' and 'or'."""
    s = answer.translate(_MINUS).strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\%", "%")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _THOUSANDS.sub("", s)
    s = _OR.sub(", ", s)
    s = _ASSIGNMENT.sub("", s)
    words = _TRAILING_WORDS.match(s)
    if words:
        s = words.group(1)
    return s.strip().rstrip(".").strip()


def _plain_text(answer: str) -> str | None:
    """A word answer ('\\text{Evelyn}', 'Evelyn') in comparable form; None for anything numeric."""
    s = re.sub(r"[\s{}]", "", _TEXT_WRAP.sub(r"\1", answer)).lower()
    return s if re.fullmatch(r"[a-z][a-z'\-]*", s) else None


@functools.lru_cache(maxsize=65536)
def _parse(expression: str):
    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" notice
    return parse(f"${expression}$", parsing_timeout=None)


def settled_without_parsing(pred: str | None, gold: str) -> bool | None:
    """is_equivalent's verdict where it needs no parsing (no answer, equal text, words, two
    integers), else None. Pure string work: it cannot hang, so it may run outside the pool."""
    return False if pred is None else _settled(normalize(pred), normalize(gold))


def _settled(p: str, g: str) -> bool | None:
    """settled_without_parsing on normalized answers."""
    if not p:
        return False
    if p == g or (_plain_text(p) is not None and _plain_text(p) == _plain_text(g)):
        return True
    if _INTEGER.fullmatch(p) and _INTEGER.fullmatch(g):
        # two integers: math-verify's verdict, without its ~0.7 ms parse of each (most wrong
        # answers of arithmetic and GSM8K land here)
        return int(p) == int(g)
    if all(_INTEGER.fullmatch(s) or _INTEGER_LIST.fullmatch(s) for s in (p, g)):
        # integers listed (roots, several answers): different sets are never equal; the same set
        # in another order or with repeats is left to math-verify
        if {int(x) for x in p.split(",")} != {int(x) for x in g.split(",")}:
            return False
    return None


@functools.lru_cache(maxsize=65536)
def is_equivalent(pred: str | None, gold: str) -> bool:
    """Whether `pred` is mathematically equal to `gold` (both bare answers, not completions)."""
    from math_verify import verify

    if pred is None:
        return False
    p, g = normalize(pred), normalize(gold)
    settled = _settled(p, g)
    if settled is not None:
        return settled
    parsed_gold, parsed_pred = _parse(g), _parse(p)
    if not parsed_gold or not parsed_pred:
        return False
    try:
        return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None))
    except Exception:  # a SymPy failure on odd input means "not shown equal"
        return False


def equivalence(pred: str, gold: str) -> float:
    """is_equivalent as a score, so the scoring pool can run it under its timeouts."""
    return 1.0 if is_equivalent(pred, gold) else 0.0


def is_correct(completion: str, gold: str) -> bool:
    return is_equivalent(extract_final_answer(completion), gold)
