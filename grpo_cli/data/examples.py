"""Datasets in, prompts and gold answers out.

A dataset is a builtin set, a local .jsonl/.json/.csv/.parquet file, or a hub
dataset. Each row becomes an `Example`: the prompt rendered from the recipe's
template (optionally inside the tokenizer's chat template) and the gold answer in
bare form. Rows without an answer or a prompt are skipped, each skip kept with its
reason and line, never crashed on; for training, so are prompts the tokenizer
reads as mostly its unknown token.

CSV, parquet and hub sets are read through `datasets`; JSON files are read here,
so that what does not read as rows (a broken line, a line that is not an object,
bytes that are not UTF-8) is refused with its line instead of a traceback or a
silent drop, and so that a file of columns ({"question": [...], "answer": [...]})
is read as the rows it holds, which is what its writer meant, rather than as one
row of lists.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grpo_cli.data import builtin_task
from grpo_cli.rewards.answers import gold_answer
from grpo_cli.errors import UserError, listed
from grpo_cli.config.recipe import DataSpec, DatasetRef, HubDataset

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# A chat template that opens a block for the assistant ("...<think>\n") has written the
# start of the completion; format rules must see it (see rewards/rules.py).
_OPENED_TAG = re.compile(r"<([A-Za-z_][\w-]*)>\s*$")
# A prompt whose own text is more than this share of the tokenizer's unknown token says nothing
# the model can read: training on it teaches guessing. Half leaves a question with a few
# out-of-vocabulary symbols (a name, a unit) in.
UNREADABLE_SHARE = 0.5
UNREADABLE = "a prompt mostly outside the tokenizer's vocabulary"


@dataclass(kw_only=True, frozen=True)
class Example:
    prompt: str  # rendered text, ready to tokenize
    answer: str  # gold answer, bare ("42", "2, 3")
    prefill: str = ""  # the part of the completion the template already wrote, e.g. "<think>\n"
    row: dict = field(default_factory=dict, compare=False)
    place: str = field(default="", compare=False)  # where the row stands in its file: "line 7", "row 7"


@dataclass(kw_only=True, frozen=True)
class Examples:
    items: list[Example]
    name: str
    skipped: int  # rows left out, for any of the reasons in `skips`
    skips: dict[str, list[str]] = field(default_factory=dict)  # reason -> places of the rows it left out

    def skip_note(self) -> str:
        """'3 rows skipped: 2 with no answer (line 4, line 9), 1 with no prompt (line 12)'; '' if none was."""
        if not self.skipped:
            return ""
        reasons = ", ".join(f"{len(places)} with {reason} ({listed(places)})" for reason, places in self.skips.items())
        return f"{self.skipped} row{'s' if self.skipped > 1 else ''} skipped: {reasons}"


def place(places: list[str] | None, index: int) -> str:
    """Where row `index` stands: its line when the reader knew it, else its number counted from 1."""
    return places[index] if places else f"row {index + 1}"


def describe(ref: DatasetRef) -> str:
    if isinstance(ref, HubDataset):
        return f"{ref.name}" + (f" ({ref.config})" if ref.config else "") + f" [{ref.split}]"
    return ref


def load_rows(ref: DatasetRef, base_dir: Path | None = None) -> list[dict]:
    """Rows of a builtin set, a local file, or a hub dataset, as plain dicts."""
    return read_rows(ref, base_dir)[0]


def read_rows(ref: DatasetRef, base_dir: Path | None = None) -> tuple[list[dict], list[str] | None]:
    """load_rows, with each row's line when the file is JSON Lines (None: rows are counted from 1)."""
    if isinstance(ref, str) and ref.startswith("builtin:"):
        split = ref.removeprefix("builtin:")
        if split not in builtin_task.SPLITS:
            known = ", ".join(f"builtin:{s}" for s in builtin_task.SPLITS)
            raise UserError(f"unknown builtin dataset {ref!r}; the builtin sets are {known}.")
        return [{"question": p.question, "answer": p.answer, "kind": p.kind} for p in builtin_task.SPLITS[split]()], None
    import datasets

    datasets.disable_progress_bars()
    if isinstance(ref, str):
        path = _local_path(ref, base_dir)
        if path is None:
            return _hub_rows(HubDataset(name=ref)), None
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{path}: unsupported file type; use one of {', '.join(FILE_FORMATS)}.")
        if builder == "json":
            rows, places = read_json_rows(path)
            return _same_fields(rows), places
        if builder == "csv":
            utf8_text(path)  # bytes that are not UTF-8 named by their line, not by a traceback from the csv reader
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise UserError(f"could not read {path} as {builder}: {exc}") from None
        return table.to_list(), None
    return _hub_rows(ref), None


def utf8_text(path: Path) -> str:
    """A file's text, or a UserError naming the line of its first byte that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}.") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is not part of the data
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise UserError(f"{path} line {line}: byte {data[exc.start]:#04x} (column {column}) is not UTF-8 text; "
                        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in > out).") from None


def read_json_rows(path: Path) -> tuple[list[dict], list[str] | None]:
    """The rows of a JSON Lines file, or of a JSON file holding a list of rows or columns, with each
    row's line (JSON Lines) or None (rows counted from 1).

    A .jsonl file is JSON Lines; any other file is one JSON document, unless it holds several (what
    datasets' to_json writes, whatever the suffix), then it is JSON Lines too. What does not read as
    a row is refused with its line, never skipped: a row left out silently changes what is trained
    or measured.
    """
    text = utf8_text(path)
    if path.suffix.lower() != ".jsonl" and text.strip():
        try:
            return _document_rows(json.loads(text), path), None
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise UserError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}); the file "
                                "must be JSON Lines (one object per line) or a JSON list of objects.") from None
    return _json_lines(text, path)


def _json_lines(text: str, path: Path) -> tuple[list[dict], list[str]]:
    rows, places, bad = [], [], []
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and other breaks it splits on
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"line {number} ({exc.msg}, column {exc.colno})")
            continue
        if not isinstance(row, dict):
            bad.append(f"line {number} ({json_kind(row)}, not an object)")
            continue
        rows.append(row)
        places.append(f"line {number}")
    if bad:
        count = len(rows) + len(bad)
        raise UserError(f"{path}: {len(bad)} of {count} lines are not JSON objects: {listed(bad)}. Each line must hold "
                        "one row as a JSON object; fix or remove those lines (none is skipped: that would change "
                        "what is trained or measured without a word).")
    return rows, places


def json_kind(value) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def _document_rows(document, path: Path) -> list[dict]:
    """A JSON document's rows: a list of objects, or columns as pandas writes them: an object of
    equal-length lists (to_dict("list")) or of {index: value} objects (to_json()'s default)."""
    if isinstance(document, list):
        bad = [f"item {i} ({json_kind(r)})" for i, r in enumerate(document, 1) if not isinstance(r, dict)]
        if bad:
            raise UserError(f"{path}: {len(bad)} of the {len(document)} items of its list are not objects: "
                            f"{listed(bad)}. Each row must be a JSON object.")
        return document
    columns = list(document.values()) if isinstance(document, dict) else []
    if len(columns) == 1 and isinstance(columns[0], list) and columns[0] and all(isinstance(r, dict) for r in columns[0]):
        # {"data": [{...}, ...]}: rows wrapped in an object, not one column whose values are objects
        raise UserError(f"{path} holds its rows under {next(iter(document))!r}; write the list itself "
                        '([{"question": ..., "answer": ...}, ...]) or JSON Lines, one object per line.')
    if columns and all(isinstance(c, dict) for c in columns) and all(list(c) == list(columns[0]) for c in columns):
        return [{name: column[key] for name, column in document.items()} for key in columns[0]]
    if columns and all(isinstance(c, list) for c in columns):
        lengths = {name: len(column) for name, column in document.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name}: {length}" for name, length in lengths.items())
            raise UserError(f"{path} holds columns of different lengths ({shown}); each column needs one value per "
                            "row.")
        return [dict(zip(document, values)) for values in zip(*columns)]
    raise UserError(f"{path} holds {json_kind(document)}, not rows: write a list of objects "
                    '([{"question": ..., "answer": ...}, ...]), columns of equal length ({"question": [...], '
                    '"answer": [...]}), or JSON Lines, one object per line (pandas: df.to_json(path, '
                    'orient="records", lines=True)).')


def _same_fields(rows: list[dict]) -> list[dict]:
    """Every row with every field, missing ones as None, as `datasets` gives a table's rows."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return [row if len(row) == len(names) else {name: row.get(name) for name in names} for row in rows]


def _local_path(ref: str, base_dir: Path | None) -> Path | None:
    """The file `ref` names, relative to the working directory or else to the recipe's."""
    for candidate in (Path(ref), (base_dir or Path.cwd()) / ref):
        if candidate.exists():
            if not candidate.is_file():
                raise UserError(f"{candidate} is a directory; data.train / data.eval name a file or a hub dataset.")
            return candidate
    if Path(ref).suffix.lower() in FILE_FORMATS or ref.startswith((".", "/")):
        raise UserError(f"data file {ref} not found (looked in {Path.cwd()} and {base_dir or Path.cwd()}).")
    return None


def is_hub(ref: DatasetRef, base_dir: Path | None = None) -> bool:
    """Whether `ref` names a hub dataset rather than a builtin set or a local file (a UserError for a
    local-looking path that is not there)."""
    if isinstance(ref, HubDataset):
        return True
    return not ref.startswith("builtin:") and _local_path(ref, base_dir) is None


def _hub_rows(ref: HubDataset) -> list[dict]:
    import datasets

    try:
        table = datasets.load_dataset(ref.name, ref.config, split=ref.split)
    except Exception as exc:
        raise UserError(
            f"could not load dataset {describe(ref)}: {type(exc).__name__}: {exc}. "
            "If this is a local file, check the path; if it is a hub dataset, check its name, "
            "config and split and that the hub is reachable (or set HF_HUB_OFFLINE=1 to use the cache)."
        ) from None
    return table.to_list()


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_prompt(row: dict, spec: DataSpec, tokenizer) -> str:
    text = spec.template.format(**row) if spec.template is not None else str(row[spec.prompt_field])
    if not spec.chat:
        return text
    messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    messages.append({"role": "user", "content": text})
    return render_chat(tokenizer, messages, spec.chat_template_kwargs)


def render_chat(tokenizer, messages: list[dict], template_kwargs: dict) -> str:
    """The one place a chat prompt is rendered: `messages` through the tokenizer's chat template with the
    assistant's turn opened, the template's variables (data.chat_template_kwargs) passed to it."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)


# What a Hugging Face chat template is given besides the recipe's variables: not worth listing as its own
_RENDERER_NAMES = {"messages", "add_generation_prompt", "raise_exception", "strftime_now", "range", "namespace"}


def template_variables(template: str) -> list[str]:
    """The variables a Jinja chat template reads ("enable_thinking", "tools", ...), those every renderer
    supplies left out; [] for a template Jinja cannot parse."""
    import jinja2
    from jinja2 import meta

    try:
        environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])  # {% break %}, as transformers has
        names = meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateError:
        return []
    return sorted(names - _RENDERER_NAMES)


def check_template_kwargs(tokenizer, template_kwargs: dict) -> None:
    """Refuse a data.chat_template_kwargs key the chat template ignores (a misspelt enable_thinking would
    otherwise change nothing, silently): a key is used when a sample prompt renders differently without
    it, or when the template reads it (Qwen3's enable_thinking: true renders as its default does)."""
    if not template_kwargs:
        return
    sample = [{"role": "user", "content": "1+1?"}]
    variables = template_variables(tokenizer.chat_template)
    rendered = render_chat(tokenizer, sample, template_kwargs)
    for key in template_kwargs:
        without = {k: v for k, v in template_kwargs.items() if k != key}
        if key in variables or render_chat(tokenizer, sample, without) != rendered:
            continue
        model = getattr(tokenizer, "name_or_path", "") or "the model"
        listed = f"its variables are {', '.join(variables)}" if variables else "it reads no variables of its own"
        raise UserError(f"data.chat_template_kwargs.{key}: the chat template of {model} does not use it; {listed}. "
                        "Remove the key or correct its name.")


def prompt_fields(spec: DataSpec) -> list[str]:
    """The row fields a prompt is written from."""
    try:
        return template_fields(spec.template) if spec.template is not None else [spec.prompt_field]
    except ValueError as exc:
        raise UserError(f"data.template {spec.template!r} is not a valid format string ({exc}); "
                        "write fields as {question} and literal braces as {{ }}.") from None


def _unusable(row: dict, spec: DataSpec, fields: list[str]) -> str | None:
    """Why a row cannot be trained or measured on (a reason for Examples.skips), or None."""
    raw = row.get(spec.answer_field)
    if raw is None or not str(raw).strip():
        return "no answer"
    if not gold_answer(raw):
        return "an answer that reduces to nothing"  # GSM8K's '#### ' with nothing after it
    if any(row.get(f) is None or not str(row.get(f)).strip() for f in fields):
        return "no prompt"  # a null would be written into the prompt as the word "None"
    return None


def build_examples(rows: list[dict], spec: DataSpec, tokenizer, name: str,
                   places: list[str] | None = None) -> Examples:
    """Check the recipe's fields against the rows, then render every prompt; `places` are the rows'
    lines in their file, for the skipped ones (default: rows counted from 1)."""
    if not rows:
        raise UserError(f"dataset {name} is empty.")
    columns = list(dict.fromkeys(column for row in rows for column in row))
    fields = prompt_fields(spec)
    needed = {spec.answer_field, *fields}
    missing = sorted(needed - set(columns))
    if missing:
        raise UserError(
            f"dataset {name} has no field {', '.join(map(repr, missing))} (used by data.prompt_field, data.answer_field "
            f"or data.template). Its fields are: {', '.join(columns)}. Set data.prompt_field / data.answer_field / "
            "data.template to match."
        )
    if spec.chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.chat is true but the model's tokenizer has no chat template; set data.chat: false.")
    if spec.chat:
        check_template_kwargs(tokenizer, spec.chat_template_kwargs)
    items, skips = [], {}
    for index, row in enumerate(rows):
        reason = _unusable(row, spec, fields)
        if reason:
            skips.setdefault(reason, []).append(place(places, index))
            continue
        prompt = render_prompt(row, spec, tokenizer)
        opened = _OPENED_TAG.search(prompt) if spec.chat else None
        items.append(Example(prompt=prompt, answer=gold_answer(row[spec.answer_field]),
                             prefill=opened.group(0).lstrip() if opened else "",
                             row=row, place=place(places, index)))
    examples = Examples(items=items, name=name, skipped=len(rows) - len(items), skips=skips)
    if not items:
        raise UserError(f"dataset {name}: none of its {len(rows)} rows can be used ({examples.skip_note()}); "
                        f"the answer is read from {spec.answer_field!r}, the prompt from {', '.join(map(repr, fields))}.")
    return examples


def readable(examples: Examples, spec: DataSpec, tokenizer) -> Examples:
    """The examples without prompts the tokenizer reads as mostly its unknown token, those counted in
    `skips`; a UserError when that is every prompt. Only the row's own text is measured: a
    template's or chat template's words would hide an unreadable question."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:  # byte-level tokenizers (GPT-2's, Qwen's, Llama 3's) can write any text
        return examples
    fields = prompt_fields(spec)
    texts = ["".join(str(e.row[f]) for f in fields) for e in examples.items]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    unreadable = [sum(t == unknown for t in seq) > UNREADABLE_SHARE * len(seq) for seq in ids]
    if not any(unreadable):
        return examples
    if all(unreadable):
        first = examples.items[0]
        raise UserError(f"every prompt of {examples.name} is mostly outside the tokenizer's vocabulary: more than "
                        f"half of each one's tokens are {tokenizer.unk_token!r}, so the model would read nothing of "
                        f"the question (e.g. {first.place}: {texts[0][:60]!r}). Use a model whose "
                        "tokenizer covers the data's language and characters, or check the file's encoding.")
    kept = [e for e, bad in zip(examples.items, unreadable) if not bad]
    skipped = [e.place for e, bad in zip(examples.items, unreadable) if bad]
    return Examples(items=kept, name=examples.name, skipped=examples.skipped + len(skipped),
                    skips={**examples.skips, UNREADABLE: skipped})


def load_examples(ref: DatasetRef, spec: DataSpec, tokenizer, base_dir: Path | None = None) -> Examples:
    """A dataset's examples for training: prompts the tokenizer cannot read are left out too (`grpo eval`
    keeps them, so a set measures the same problems for every model)."""
    rows, places = read_rows(ref, base_dir)
    return readable(build_examples(rows, spec, tokenizer, describe(ref), places), spec, tokenizer)


class PromptOrder:
    """Which prompts each step takes: a fresh seeded permutation per pass over the data.

    Its whole state is (epoch, position), saved in checkpoints so a resumed run
    continues with exactly the prompts it would have taken.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0):
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def take(self, count: int) -> list[int]:
        taken = []
        while len(taken) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
            order = self._permutation()
            grab = min(count - len(taken), self.size - self.position)
            taken.extend(int(i) for i in order[self.position : self.position + grab])
            self.position += grab
        return taken

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        """Go back to a position `state()` returned: a resumed run, or a step taken back."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
