"""Datasets in, prompts and gold answers out.

A dataset is a builtin set, a local .jsonl/.json/.csv/.parquet file, or a hub
dataset, all read through `datasets`. Each row becomes an `Example`: the prompt
rendered from the recipe's template (optionally inside the tokenizer's chat
template) and the gold answer in bare form. Rows whose gold answer is empty are
skipped and counted, never crashed on.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grpo_cli import builtin_task
from grpo_cli.answers import gold_answer
from grpo_cli.errors import UserError
from grpo_cli.recipe import DataSpec, DatasetRef, HubDataset

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# A chat template that opens a block for the assistant ("...<think>\n") has written the
# start of the completion; format rules must see it (see rewards.py).
_OPENED_TAG = re.compile(r"<([A-Za-z_][\w-]*)>\s*$")


@dataclass(frozen=True)
class Example:
    prompt: str  # rendered text, ready to tokenize
    answer: str  # gold answer, bare ("42", "2, 3")
    prefill: str = ""  # the part of the completion the template already wrote, e.g. "<think>\n"
    row: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Examples:
    items: list[Example]
    name: str
    skipped: int  # rows without a usable gold answer


def describe(ref: DatasetRef) -> str:
    if isinstance(ref, HubDataset):
        return f"{ref.name}" + (f" ({ref.config})" if ref.config else "") + f" [{ref.split}]"
    return ref


def load_rows(ref: DatasetRef, base_dir: Path | None = None) -> list[dict]:
    """Rows of a builtin set, a local file, or a hub dataset, as plain dicts."""
    if isinstance(ref, str) and ref.startswith("builtin:"):
        split = ref.removeprefix("builtin:")
        if split not in builtin_task.SPLITS:
            known = ", ".join(f"builtin:{s}" for s in builtin_task.SPLITS)
            raise UserError(f"unknown builtin dataset {ref!r}; the builtin sets are {known}.")
        return [{"question": p.question, "answer": p.answer, "kind": p.kind} for p in builtin_task.SPLITS[split]()]
    import datasets

    datasets.disable_progress_bars()
    if isinstance(ref, str):
        path = _local_path(ref, base_dir)
        if path is None:
            return _hub_rows(HubDataset(name=ref))
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"{path}: unsupported file type; use one of {', '.join(FILE_FORMATS)}.")
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise UserError(f"could not read {path} as {builder}: {exc}") from None
        return table.to_list()
    return _hub_rows(ref)


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
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_examples(rows: list[dict], spec: DataSpec, tokenizer, name: str) -> Examples:
    """Check the recipe's fields against the rows, then render every prompt."""
    if not rows:
        raise UserError(f"dataset {name} is empty.")
    columns = list(rows[0])
    try:
        prompt_fields = template_fields(spec.template) if spec.template is not None else [spec.prompt_field]
    except ValueError as exc:
        raise UserError(f"data.template {spec.template!r} is not a valid format string ({exc}); "
                        "write fields as {question} and literal braces as {{ }}.") from None
    needed = {spec.answer_field, *prompt_fields}
    missing = sorted(needed - set(columns))
    if missing:
        raise UserError(
            f"dataset {name} has no field {', '.join(map(repr, missing))} (used by data.prompt_field, data.answer_field "
            f"or data.template). Its fields are: {', '.join(columns)}. Set data.prompt_field / data.answer_field / "
            "data.template to match."
        )
    if spec.chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.chat is true but the model's tokenizer has no chat template; set data.chat: false.")
    items, skipped = [], 0
    for row in rows:
        answer = gold_answer(row[spec.answer_field]) if row[spec.answer_field] is not None else ""
        if not answer:
            skipped += 1
            continue
        prompt = render_prompt(row, spec, tokenizer)
        opened = _OPENED_TAG.search(prompt) if spec.chat else None
        items.append(Example(prompt, answer, opened.group(0).lstrip() if opened else "", row))
    if not items:
        raise UserError(f"dataset {name}: none of its {len(rows)} rows has a usable answer in {spec.answer_field!r}.")
    return Examples(items, name, skipped)


def load_examples(ref: DatasetRef, spec: DataSpec, tokenizer, base_dir: Path | None = None) -> Examples:
    return build_examples(load_rows(ref, base_dir), spec, tokenizer, describe(ref))


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
