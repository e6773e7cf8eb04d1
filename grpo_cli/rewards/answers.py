"""Final answers: where a completion states one, and whether it equals the gold answer.

Locating the answer is ours: models mark answers in many ways, and the format rules
need to know where the answer starts and whether it was marked. Deciding equality is
math-verify's: it parses LaTeX and plain text into SymPy and compares, and it already
reads thousands separators, "x = 2 or x = 3", "4, 9, and 17", units, percentages,
`\\dfrac`, intervals and sets. So the answer reaches it nearly as written: the only rewrites
here are the few math-verify gets wrong (a plain-text mixed number, unicode mathematics,
delimiters around the whole answer, digits grouped by spaces), each tested not to change the
meaning of a correct answer (tests/test_answers.py). Two readings are ours because math-verify
loses them: a prime (it drops every "'", so E' would equal E; see _primed), and a decimal
comma ("1,22" = 1.22; the rule is at _DECIMAL_COMMA). A completion that marks no answer is
graded on what it closes with, so one cut off mid-solution states none.

Every function here is pure and safe in any thread because math-verify's own timeouts
are switched off: they use signal.alarm, which fails off the main thread, and would
cancel an outer alarm. Timeouts are the caller's job: `scoring` runs these functions
in worker processes under its own per-call alarm and kills a worker that still
overruns, so no call can hang a run.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

from grpo_cli.tools.calls import after_last_output, model_text

# A marker introducing the final answer; the answer runs to the end of its sentence.
_LINE_MARKERS = re.compile(
    r"(?:####|(?:the\s+)?final\s+answer\s*(?:is\s*:?|:)|the\s+answer\s+is\s*:?|^\s*answer\s*:|^\s*a\s*:"
    r"|(?P<json>^\s*[\"']answer[\"']\s*:\s*[\"']?))",  # the last: a JSON field, '"answer": "12"'
    re.IGNORECASE | re.MULTILINE,
)
_JSON_VALUE_END = re.compile(r"[\"']?\s*,?\s*}?\s*$")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A math span: $$...$$, $...$, \[...\] or \(...\) (a "\$" is a currency sign, not a delimiter)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)
# What separates groups of three digits ("1 000", "1\u2009000", "1\\,000"): a space, a no-break, thin, narrow
# no-break or figure space, or LaTeX's thin, medium and wide spaces and ~. math-verify reads "1 000" only in
# plain text, "1\\,000" as 1 * 0 and "1\u2009000" as 0.
_GROUP_SPACE = r"(?:[ \u00a0\u2007\u2009\u202f]|\\[,:; ]|~)"
# A number grouped by such spaces: 1 to 3 digits, then groups of exactly 3 ("12 345.5"); not "1 00", "12 34"
# or "1 000 00", nor a numerator ("2 100/300" is a mixed number, left to _MIXED_NUMBER)
_SPACED_NUMBER = re.compile(rf"(?<![\w.,])-?[1-9]\d{{0,2}}(?:{_GROUP_SPACE}\d{{3}})+(?!\d|{_GROUP_SPACE}\d|\s*/)")
_NUMBER = re.compile(rf"{_SPACED_NUMBER.pattern}(?:\.\d+)?"  # "12 345.5", then "12.5", "2/3", "4343_6" (base 6)
                     r"|-?\d[\d,]*(?:\.\d+)?(?:/\d+)?(?:_\{?\d+\}?)?")
_VALUE = r"-?\d+(?:\.\d+)?(?:/\d+)?"
# "x = 2 or x = 3", "x=2, 3": a list of values for one variable, as solutions of equations are stated
_ROOT_LIST = re.compile(rf"[a-zA-Z]\s*=\s*{_VALUE}(?:\s*(?:,|\bor\b|\band\b)\s*(?:[a-zA-Z]\s*=\s*)?{_VALUE})+")
# The end of a sentence: . ! or ? before a new sentence or the end (not a decimal point: a space follows)
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z(]|\s*$)")
# What may follow an unmarked answer that closes a completion: a few words ending the sentence
# ("... so she has 18 left."), or only closing brackets. Digits or "=" after it mean the text went on.
_CLOSING = re.compile(r"[\s$)\]}*%\u00b0\u20ac\u00a3]*(?:[^\d=$]{0,200}[.!?\u3002\uff01\uff1f][\s$)\]}*\"']*)?")
_ASSIGNMENT = re.compile(r"\\?[a-zA-Z]\w*\s*=[^=]+")  # "x = 5": one variable given one value
# A word of text: not a LaTeX command or environment name, not a variable like x, AB or NO
# ("and" joins the members of a list: "4, 9, and 17")
_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z{])(?!and\b)[a-zA-Z][a-z]{2,}\b")
# Where a chat model's turn ends: what follows is not its answer
_END_OF_TURN = re.compile(r"<\|(?:im_end|im_start|endoftext|end_of_text|eot_id|eot|end)\|>|</s>|<end_of_turn>")
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z_]+\|>")  # "<|end_of_solution|>": markup, not text
# A reasoning model's thinking: its answer comes after the thinking closes; answers inside it are drafts
_THINK_OPEN = re.compile(r"<think>|<\|begin_of_thought\|>")
_THINK_CLOSE = re.compile(r"</think>|<\|end_of_thought\|>")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-"})
# Unicode mathematics that math-verify misreads ("4√2 + 8" as 8, "(−∞, 2]" as 2, "2·3" as 2), as LaTeX
_UNICODE_SYMBOLS = str.maketrans({"\u221e": "\\infty ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ",
                                  "\u00bd": "\\frac{1}{2}", "\u2153": "\\frac{1}{3}", "\u2154": "\\frac{2}{3}",
                                  "\u00bc": "\\frac{1}{4}", "\u00be": "\\frac{3}{4}"})
_SUPERSCRIPT = re.compile("[\u207b\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+")  # x² -> x^{2}
_SUPERSCRIPT_DIGITS = str.maketrans("\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079", "-0123456789")
_ROOT = re.compile(r"([\u221a\u221b])\s*(\([^()]*\)|\{[^{}]*\}|\d+(?:\.\d+)?|\\?[a-zA-Z])")  # √2, √(x+1), ∛8
_DELIMITERS = re.compile(r"\\\$|\$|\\\(|\\\)|\\\[|\\\]")
_MIXED_NUMBER = re.compile(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)")  # "2 1/4", the whole answer
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_INTEGER = re.compile(r"-?\d+")
_GROUPED_INTEGER = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+")  # "1,234,000": one number with thousands separators
# A decimal comma. The rule: a comma is a thousands separator where the digits can be read so ("1,000",
# "1,234", "12,345,678.5": the English reading wins where both can, so "1,234" is 1234); it is a decimal
# comma where they cannot: one comma, and either other than three digits after it ("1,22", "1000,99") or a
# first group that is no thousands group ("0,5", "0,500", "1000,999"). That reading is allowed only for a
# whole answer that is one such number (never in a tuple, interval or list: "(0,5)", "1,2,3", "x = 1,5"),
# and only against an answer that is one number, since a lone "1,5" may also be the two roots 1 and 5: so
# "1,5" equals "1.5" and "3/2", and also "1, 5" and "5, 1" as before.
_DECIMAL_COMMA = re.compile(r"-?\d+,\d+")
_ENGLISH_GROUPS = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # read the English way
# One number, what a decimal comma may be compared with: "1.22", "1,000", ".5", "3/2", "\\frac{1}{2}", "12\\%"
# (not "6 \\text{ and } 8" or "x = 2 or x = 3", which are lists)
_ONE_NUMBER = re.compile(r"-?(?:\d*\.?\d+|[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?|\d+/\d+"
                         r"|\\[dt]?frac\s*(?:\{\s*\d+\s*\}\s*\{\s*\d+\s*\}|\d\d))(?:\\?%)?")
# A prime in any spelling: ' ’ ′ (″ and ‴ are two and three), \prime, ^\prime, ^{\prime\prime}, ^{''}.
# A run of them is one mark: E'' and E^{\prime\prime} are both E^{\prime\prime} (see _primed).
_PRIME_RUN = re.compile(r"(?:\^\s*\{(?:\s*(?:\\prime(?![a-zA-Z])|['\u2019\u2032]))+\s*\}|\^\s*(?:\\prime(?![a-zA-Z])|')"
                        r"|\\prime(?![a-zA-Z])|['\u2019\u2032\u2033\u2034])+")
_PRIME_COUNT = {"'": 1, "\u2019": 1, "\u2032": 1, "\u2033": 2, "\u2034": 3}
# What a prime marks: a letter or a LaTeX command (E', \alpha'), a closed bracket (f(x)', \bar{x}', x_{1}'), a
# subscript (x_1'). After any other digit it is a unit, feet or minutes of arc (5'), read as units are.
_PRIMED = re.compile(r"(?:[A-Za-z)\]}]|_\d+)$")
_OPENS_QUOTE = re.compile(r"(?:^|[\s(\[{,=:])$")  # "'A'": an apostrophe after no symbol opens a quote
_WRAPPED_PRIME = re.compile(r"(\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}']*[A-Za-z]))"
                            r"(['\u2019\u2032\u2033\u2034]+)\}")  # "\\mathrm{E'}"
_INTEGER_LIST = re.compile(r"-?\d+(\s*,\s*-?\d+)+")  # "2, -3": how roots and multiple answers are written


@dataclass(frozen=True)
class Final:
    """The final answer a completion states, and where the marker that introduces it starts."""

    text: str
    start: int  # index in the completion where the marker (or the unmarked answer) starts
    marked: bool  # False when it is only the closing expression or number of the text


def _boxes(text: str) -> list[tuple[int, str]]:
    """(start, content) of every outermost \\boxed{...}, with nested braces balanced."""
    found, end = [], 0
    for match in _BOX.finditer(text):
        if match.start() < end:
            continue  # a box inside the previous one
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append((match.start(), text[match.end() : i - 1]))
            end = i
    return found


def _joined(boxes: list[tuple[int, str]]) -> str:
    """Several boxes are one answer: "\\boxed{2}, \\boxed{3}" -> "2, 3"."""
    return ", ".join(content.strip() for _, content in boxes)


def _first_sentence(rest: str) -> str:
    """The answer after a marker, without what follows its sentence: "$2x+y=3$. I hope it is
    correct." -> "$2x+y=3$". Sentence ends inside math spans do not count."""
    spans = [m.span() for m in _MATH_SPAN.finditer(rest)]
    for end in _SENTENCE_END.finditer(rest):
        if not any(a <= end.start() < b for a, b in spans):
            return rest[: end.start()].strip()
    return rest.strip()


def _closes(text: str, end: int) -> bool:
    """Whether what follows index `end` only closes the text (so the answer there is its last word)."""
    return _CLOSING.fullmatch(text, end) is not None


def _is_bare(line: str) -> bool:
    """Whether a completion is nothing but an answer: one short line of mathematics, words only after
    it ("64 square feet", not "The total is 64"), no chain of equations; or one word ("Evelyn")."""
    if not line or "\n" in line or len(line) > 120 or ("=" in line and not _ASSIGNMENT.fullmatch(line)):
        return False
    if _plain_text(line) is not None:
        return " " not in line.strip() or _TEXT_WRAP.fullmatch(line) is not None  # "Evelyn", not "no idea"
    first_math = re.search(r"[\d\\]", line)
    words = _PROSE_WORD.findall(line)
    return first_math is not None and len(words) <= 3 and not _PROSE_WORD.search(line, 0, first_math.start())


def _unmarked(text: str) -> Final | None:
    """The answer a completion states when it marks none: the whole completion when it is one
    short line of mathematics ("\\frac{10}{9}", "x = 5", "12 apples"), else a closing list of
    solutions ("x = 2 or x = 3"), else a closing math span ("$(1, \\pi/3)$"), else a closing
    number. A completion cut off mid-solution ends in none of these, so it states no answer (its
    last number is some intermediate result)."""
    plain = text.translate(_MINUS)
    line = plain.strip()
    if _is_bare(line):
        return Final(line, plain.index(line), False)
    last_line_start = plain.rstrip().rfind("\n") + 1
    roots = list(_ROOT_LIST.finditer(plain, last_line_start))
    if roots and _closes(plain, roots[-1].end()):
        return Final(roots[-1].group(), roots[-1].start(), False)
    spans = list(_MATH_SPAN.finditer(plain))
    if spans and _closes(plain, spans[-1].end()):
        content = next(g for g in spans[-1].groups() if g is not None).strip()
        if content:
            return Final(content, spans[-1].start(), False)
    numbers = list(_NUMBER.finditer(plain))
    if numbers and _closes(plain, numbers[-1].end()):
        return Final(numbers[-1].group().rstrip(","), numbers[-1].start(), False)
    return None


def _own_turn(text: str) -> str:
    """The model's own text (what the code tool printed blanked, indices kept: a printed "<|im_end|>" or
    "</think>" is not the model's; tool_calls.model_text) up to the first end-of-turn token that follows some
    content of its own."""
    text = model_text(text, keep_places=True)
    for token in _END_OF_TURN.finditer(text):
        if text[: token.start()].strip():
            return text[: token.start()]
    return text


def think_tags(text: str) -> tuple[list[re.Match], list[re.Match]]:
    """The tags that open thinking ("<think>") and those that close it ("</think>") in the model's own
    turn, in order of position."""
    turn = _own_turn(text)
    return list(_THINK_OPEN.finditer(turn)), list(_THINK_CLOSE.finditer(turn))


def split_thinking(text: str) -> tuple[str, str] | None:
    """(thinking, answer) of a completion that closes its thinking: what stands before the last
    </think> (opening tags left out) and what follows it in the model's own turn, both stripped.
    None when it closes none; no opening tag is needed, since a chat template may have opened it."""
    turn = _own_turn(text)
    closes = list(_THINK_CLOSE.finditer(turn))
    if not closes:
        return None
    thinking = _THINK_OPEN.sub("", turn[: closes[-1].start()])
    return thinking.strip(), turn[closes[-1].end() :].strip()


def _answer_part(text: str) -> str:
    """The part of the text that can hold the final answer, blanked elsewhere so indices stay: the
    model's own turn (see _own_turn), after its last tool output block (an answer written before a call
    was not its last word; tools/calls.py), and after the thinking when the text thinks
    ("<think> ... </think>"). Thinking that never closed gave no answer: all blank."""
    text = _own_turn(text)
    after_tools = after_last_output(text)
    text = " " * after_tools + text[after_tools:]
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return " " * closes[-1].end() + text[closes[-1].end() :]
    return " " * len(text) if _THINK_OPEN.search(text) else text


def find_final(text: str) -> Final | None:
    """The last explicitly marked answer (####, \\boxed{}, 'the answer is', 'Answer:', 'A:'),
    else the expression or number the text closes with (see _unmarked), else None.

    Several boxes on the line of the last box are one answer ("\\boxed{2}, \\boxed{3}" -> "2, 3").
    After a written marker the answer runs to the end of its sentence. Text after an end-of-turn
    token ("<|im_end|>", "</s>") is not the model's, and a reasoning model answers after its thinking
    (see _answer_part).
    """
    text = _SPECIAL_TOKEN.sub(lambda token: " " * len(token.group()), _answer_part(text))  # indices kept
    candidates: list[Final] = []
    boxes = _boxes(text)
    if boxes:
        last_line_start = text.rfind("\n", 0, boxes[-1][0]) + 1
        same_line = [(s, c) for s, c in boxes if s >= last_line_start]
        candidates.append(Final(_joined(same_line), same_line[0][0], True))
    for match in _LINE_MARKERS.finditer(text):
        end = text.find("\n", match.end())
        rest = text[match.end() : end if end >= 0 else len(text)]
        if _BOX.search(rest):
            continue  # "The answer is \boxed{5}": the box candidate covers it
        if match.group("json"):
            rest = _JSON_VALUE_END.sub("", rest)  # '"answer": "12"},' -> '12'
        candidates.append(Final(_first_sentence(rest), match.start(), True))
    if candidates:
        return max(candidates, key=lambda c: c.start)
    return _unmarked(text)


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer as written, or None (an empty box counts as none)."""
    final = find_final(text)
    return final.text if final and final.text.strip() else None


def gold_answer(raw: str) -> str:
    """A dataset's answer field as a bare answer: GSM8K's worked '... #### 42' -> '42'; a gold
    that holds boxes is all of them ("\\(\\boxed{3}\\) and \\(\\boxed{-5}\\)" -> "3, -5")."""
    raw = str(raw)
    if "####" in raw:
        return raw.rsplit("####", 1)[1].strip()
    boxes = _boxes(raw)
    return _joined(boxes) if boxes else raw.strip()


def _latex_symbols(s: str) -> str:
    """Unicode mathematics (√2, ∛8, x², ∞, ·, ½) written as LaTeX."""
    s = _ROOT.sub(lambda m: ("\\sqrt{" if m.group(1) == "\u221a" else "\\sqrt[3]{")
                  + m.group(2).removeprefix("(").removesuffix(")").strip("{}") + "}", s)
    s = _SUPERSCRIPT.sub(lambda m: "^{" + m.group().translate(_SUPERSCRIPT_DIGITS) + "}", s)
    return s.translate(_UNICODE_SYMBOLS)


def normalize(answer: str) -> str:
    """The answer as math-verify reads it best. Only what it gets wrong is rewritten:
    unicode minus signs and other unicode mathematics (√2, x², ∞); delimiters around the answer ($, \\(, \\[, and a \\$ currency sign),
    since we wrap the whole answer in one pair; a sentence's full stop; a plain-text mixed
    number "2 1/4", which math-verify reads as 2 * 1/4 while it reads LaTeX's 2\\frac{1}{4} as 9/4;
    and digits grouped by spaces ("1 000", "1\\,000", "12\u2009345.5"; see _SPACED_NUMBER), which it
    reads inside $...$ as a product or as 0."""
    s = _DELIMITERS.sub("", _latex_symbols(answer.translate(_MINUS))).strip()
    s = s.removesuffix(".").strip() if not s.endswith("..") else s
    mixed = _MIXED_NUMBER.fullmatch(s)
    if mixed and int(mixed.group(3)) < int(mixed.group(4)):
        sign, whole, numerator, denominator = mixed.groups()
        s = f"{sign}{whole}\\frac{{{numerator}}}{{{denominator}}}"
    return _SPACED_NUMBER.sub(lambda m: re.sub(_GROUP_SPACE, "", m.group()), s)  # "1\\,000" -> "1000"


def _primed(s: str) -> str:
    """A normalized answer with every prime written one way, as LaTeX's ^{\\prime}, which math-verify
    reads (E' -> E^{\\prime}, f''(x) -> f^{\\prime\\prime}(x), E\u2032 and E^\\prime alike). math-verify
    drops "'" (and fails on "\u2032"), so without this E' equals E and f'(x) equals f(x); a prime inside
    \\mathrm{E'} or \\text{E'} is moved out of it, where math-verify reads it. Left as written:
    apostrophes in words (an answer in prose, words in \\text{}, "\\'e"), quotes ("'A'"), and a prime after
    a number, a unit (5' is five feet or minutes of arc) that math-verify drops as it drops other units."""
    if not _PRIME_RUN.search(s) or _PROSE_WORD.search(_TEXT_WRAP.sub("", s)):
        return s
    # "\\mathrm{E'}" -> "\\mathrm{E}'": the prime of a symbol set in roman (not of a word: "\\text{Jones'}")
    s = _WRAPPED_PRIME.sub(lambda m: m.group() if _PROSE_WORD.search(m.group(2)) else f"{m.group(1)}}}{m.group(3)}", s)
    words = [m.span() for m in _TEXT_WRAP.finditer(s)]
    out, end, quoted = [], 0, False
    for run in _PRIME_RUN.finditer(s):
        before = s[: run.start()]
        if any(a <= run.start() < b for a, b in words) or before.endswith("\\"):
            continue
        if quoted:  # the apostrophe that closes a quote
            quoted = False
            continue
        if run.group()[0] in "^\\":  # LaTeX ignores the space in "E ^{\\prime}"
            before = before.rstrip()
        if not _PRIMED.search(before):
            quoted = run.group() == "'" and _OPENS_QUOTE.search(before) is not None
            continue
        count = run.group().count("\\prime") + sum(_PRIME_COUNT.get(c, 0) for c in run.group())
        out += [s[end : len(before)], "^{" + "\\prime" * count + "}"]
        end = run.end()
    return "".join(out) + s[end:]


def _decimal_point(s: str, other: str) -> str:
    """A decimal comma read as a point where the rule allows (see _DECIMAL_COMMA): `s` is one number
    that no thousands separator explains ("1,22", "0,5") and `other`, compared with it, is one number."""
    if _DECIMAL_COMMA.fullmatch(s) and not _ENGLISH_GROUPS.fullmatch(s) and _ONE_NUMBER.fullmatch(other):
        return s.replace(",", ".")
    return s


def _compared(pred: str, gold: str) -> tuple[str, str]:
    """pred and gold as they are compared: normalized, primes marked, decimal commas read."""
    p, g = _primed(normalize(pred)), _primed(normalize(gold))
    return _decimal_point(p, g), _decimal_point(g, p)


def text_key(answer: str) -> str:
    """The answer as text that equal-looking answers share ("1,000", "1 000" and "1000."; "E'" and
    "E^\\prime"), for counting distinct answers without parsing them. A decimal comma stays: alone,
    "1,5" may be 1.5 or the pair 1 and 5 (see _DECIMAL_COMMA)."""
    s = _primed(normalize(answer))
    integer = _integer(s)
    return s if integer is None else str(integer)


def _plain_text(answer: str) -> str | None:
    """A word answer ('\\text{Evelyn}', 'Evelyn') in comparable form; None for anything numeric."""
    s = re.sub(r"[\s{}]", "", _TEXT_WRAP.sub(r"\1", answer)).lower()
    s = s[1:-1] if re.fullmatch(r"\([a-z]+\)", s) else s  # "(C)", a choice
    return s if re.fullmatch(r"[a-z][a-z'\-]*", s) else None


@functools.lru_cache(maxsize=65536)
def _parse(answer: str):
    """math-verify's reading of a normalized answer. Mathematics ("x = 2 or x = 3", "4, 9, and 17",
    "(1,5) \\cup (5,250)") is read whole as LaTeX, so every member of a list counts; an answer
    with words in it ("12 apples", "definitely 8000") is left to math-verify's own extraction,
    which finds the expression among them (read as LaTeX, the words would be products of symbols)."""
    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" notice
    if _PROSE_WORD.search(_TEXT_WRAP.sub("", answer)):
        return parse(answer, parsing_timeout=None)
    return parse(f"${answer}$", parsing_timeout=None)


def settled_without_parsing(pred: str | None, gold: str) -> bool | None:
    """is_equivalent's verdict where it needs no parsing (no answer, equal text, words, two
    integers), else None. Pure string work: it cannot hang, so it may run outside the pool."""
    return False if pred is None else _settled(*_compared(pred, gold))


def _integer(s: str) -> int | None:
    if _INTEGER.fullmatch(s):
        return int(s)
    return int(s.replace(",", "")) if _GROUPED_INTEGER.fullmatch(s) else None


def _settled(p: str, g: str) -> bool | None:
    """settled_without_parsing on normalized answers."""
    if not p:
        return False
    if p == g or (_plain_text(p) is not None and _plain_text(p) == _plain_text(g)):
        return True
    if _integer(p) is not None and _integer(g) is not None:
        # two integers: math-verify's verdict, without its parse of each (docs/performance.md,
        # "Scoring"; most wrong answers of arithmetic and GSM8K land here)
        return _integer(p) == _integer(g)
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
    p, g = _compared(pred, gold)
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
