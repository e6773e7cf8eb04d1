"""`grpo eval`: a model on a math set under a stated protocol, or predictions graded as given.

Named sets resolve to the standard test splits: `gsm8k` is GSM8K's test split (1319
problems), `math500` the MATH-500 subset (500), read from a local copy when
`data_file` is given, else from the hub. The prompt format is the one the model
was trained with when the model is a grpo run or checkpoint (its recipe's data
section), else the model's chat template with a "reason step by step, answer in
\\boxed{}" system prompt, else a plain "Question: ...\\nAnswer:" prompt.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grpo_cli.run import threads
from grpo_cli.data.examples import Examples, build_examples, describe, load_rows, read_json_rows
from grpo_cli.errors import UserError, listed
from grpo_cli.run.evaluation import EvalReport, evaluate, grade_predictions
from grpo_cli.model.loading import load_for_inference
from grpo_cli.config.defaults import (EVAL_BATCH_SIZE, EVAL_DEVICE, EVAL_MAX_NEW_TOKENS, EVAL_SAMPLES, EVAL_SEED,
                                      EVAL_TEMPERATURE, EVAL_TOP_P, NAMED_SET_MAX_NEW_TOKENS)
from grpo_cli.config.recipe import DataSpec, GrpoSpec, HubDataset, out_of_bounds, reserved_template_kwargs
from grpo_cli.rollout.sampling import generate
from grpo_cli.rollout.settings import Sampling
from grpo_cli.rewards.scoring import Scorer, refuse_inside_a_starting_worker
from grpo_cli.tools.calls import TOOLS, count_calls
from grpo_cli.rollout.with_tools import open_session

BOXED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(kw_only=True, frozen=True)
class NamedSet:
    hub: HubDataset
    prompt_field: str
    max_new_tokens: int
    size: int


NAMED_SETS = {
    "gsm8k": NamedSet(hub=HubDataset(name="openai/gsm8k", config="main", split="test"), prompt_field="question",
                      max_new_tokens=NAMED_SET_MAX_NEW_TOKENS["gsm8k"], size=1319),
    "math500": NamedSet(hub=HubDataset(name="HuggingFaceH4/MATH-500", split="test"), prompt_field="problem",
                        max_new_tokens=NAMED_SET_MAX_NEW_TOKENS["math500"], size=500),
}


@dataclass(kw_only=True, frozen=True)
class EvalOptions:
    model: str | None = None  # run dir, checkpoint, model dir, hub id, builtin:...
    data: str | None = None  # gsm8k, math500, builtin:..., a file, a hub dataset; None = the run's eval set
    data_file: str | None = None  # local copy of a named set
    predictions: str | None = None  # grade this file instead of generating
    samples: int = EVAL_SAMPLES
    limit: int | None = None
    max_new_tokens: int | None = None
    temperature: float = EVAL_TEMPERATURE  # only when samples > 1
    top_p: float = EVAL_TOP_P
    batch_size: int = EVAL_BATCH_SIZE
    seed: int = EVAL_SEED
    template: str | None = None
    system_prompt: str | None = None
    chat: bool | None = None
    chat_template_kwargs: dict | None = None  # None: the run's data.chat_template_kwargs, or none
    device: str = EVAL_DEVICE
    dtype: str | None = None
    best: bool = False  # a run directory's best checkpoint (checkpoint.locate_best), not its latest
    tools: list[str] | None = None  # ["python"]: the model may run code (tools/calls.py); None: the run's grpo.tools
    max_tool_calls: int | None = None  # None: the run's, else grpo.max_tool_calls' default
    tool_timeout_s: float | None = None  # None: the run's, else grpo.tool_timeout_s' default


@dataclass(frozen=True)
class Evaluation:
    report: EvalReport
    settings: dict

    def results(self) -> dict:
        """The JSON results: summary figures, settings, and one record per input row, in order."""
        items = []
        for index, item in enumerate(self.report.items):
            single = len(item.completions) == 1
            record = {"index": index, **{k: v for k, v in item.fields.items() if k != "answer"}, "gold": item.gold}
            record["extracted"] = item.extracted[0] if single else item.extracted
            record["correct"] = item.correct[0] if single else item.correct
            record["completion" if single else "completions"] = item.completions[0] if single else item.completions
            if item.majority is not None and not single:
                record["majority"] = item.extracted[item.majority]
            if any(item.timed_out):  # graded wrong because the comparison ran past the limit, not on its merits
                record["timed_out"] = item.timed_out[0] if single else item.timed_out
            if item.vote_timeouts:
                record["vote_timeouts"] = item.vote_timeouts
            items.append(record)
        tool_use = {}
        if self.settings.get("tools"):  # counted from the transcripts: each call left an output block
            calls = [count_calls(c) for item in self.report.items for c in item.completions]
            tool_use = {"tool_calls": round(sum(calls) / max(len(calls), 1), 3),
                        "tool_use_frac": round(sum(c > 0 for c in calls) / max(len(calls), 1), 4)}
        return {**self.report.summary(), **tool_use, "seconds": round(self.report.seconds, 2),
                "settings": self.settings, "items": items}


# grpo eval's options that stand for recipe keys, refused outside the keys' bounds (the recipe states them once)
_RECIPE_BOUNDED = {  # EvalOptions field: (its option, the recipe section, the key)
    "limit": ("--limit", DataSpec, "data.eval_limit"),
    "temperature": ("--temperature", GrpoSpec, "grpo.temperature"),
    "top_p": ("--top-p", GrpoSpec, "grpo.top_p"),
    "max_tool_calls": ("--max-tool-calls", GrpoSpec, "grpo.max_tool_calls"),
    "tool_timeout_s": ("--tool-timeout", GrpoSpec, "grpo.tool_timeout_s"),
}
_COUNTS = {"samples": "--samples", "max_new_tokens": "--max-new-tokens", "batch_size": "--batch-size"}  # 1 or more


def _refuse_unusable_options(options: EvalOptions) -> None:
    """Option values no evaluation can use, refused before anything loads. An option left out (None) takes its
    default; one given, 0 included, is checked and used as given."""
    for name, (option, section, key) in _RECIPE_BOUNDED.items():
        value = getattr(options, name)
        problem = None if value is None else out_of_bounds(section, key.split(".")[-1], value)
        if problem:
            raise UserError(f"{option} {value:g}: {problem[0].lower() + problem[1:]}, as is the recipe's {key}.")
    for name, option in _COUNTS.items():
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be at least 1.")
    problem = reserved_template_kwargs(options.chat_template_kwargs or {})
    if problem:
        raise UserError(f"--chat-template-kwarg: {problem}.")


def _data_spec(named: NamedSet | None, options: EvalOptions, recipe, tokenizer, builtin: bool) -> DataSpec:
    """How prompts are written: explicit options, else the run's recipe, else the set's protocol."""
    if recipe is not None:
        spec = recipe.data
    else:
        chat = options.chat if options.chat is not None else (
            bool(getattr(tokenizer, "chat_template", None)) and not builtin)
        field = named.prompt_field if named else "question"
        spec = DataSpec(prompt_field=field, chat=chat, system_prompt=BOXED_SYSTEM_PROMPT if chat else None,
                        template=None if (chat or builtin) else f"Question: {{{field}}}\nAnswer:")
    if named is not None:
        spec = spec.model_copy(update={"answer_field": "answer"})
    updates = {"template": options.template, "system_prompt": options.system_prompt, "chat": options.chat,
               "chat_template_kwargs": options.chat_template_kwargs}
    spec = spec.model_copy(update={k: v for k, v in updates.items() if v is not None})
    if options.chat_template_kwargs and not spec.chat:
        raise UserError("--chat-template-kwarg sets a variable of the chat template, but these prompts are plain "
                        "text: add --chat, or leave it out.")
    return spec


def parse_template_kwargs(pairs: list[str]) -> dict:
    """--chat-template-kwarg values, KEY=VALUE each, the value read as YAML: ["enable_thinking=true"] ->
    {"enable_thinking": True}."""
    import yaml

    variables = {}
    for pair in pairs:
        key, equals, raw = pair.partition("=")
        if not key.strip() or not equals:
            raise UserError(f"--chat-template-kwarg {pair}: expected KEY=VALUE, e.g. enable_thinking=true")
        try:
            variables[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"--chat-template-kwarg {pair}: the value is not valid YAML ({exc})") from None
    return variables


def _load_set(options: EvalOptions, recipe) -> tuple[list[dict], NamedSet | None, str]:
    if options.data is None:
        if recipe is None or recipe.data.eval is None:
            raise UserError("say which data to evaluate on with --data (gsm8k, math500, a file or a hub dataset).")
        return load_rows(recipe.data.eval), None, describe(recipe.data.eval)
    named = NAMED_SETS.get(options.data.lower())
    if named is not None:
        if options.data_file:
            return load_rows(options.data_file), named, f"{options.data} ({options.data_file})"
        return load_rows(named.hub), named, f"{options.data} ({describe(named.hub)})"
    if options.data_file:
        raise UserError(f"--data-file gives a local copy of a named set ({', '.join(NAMED_SETS)}), not of {options.data!r}.")
    return load_rows(options.data), None, options.data


def run(options: EvalOptions, on_progress=None, on_message=None) -> Evaluation:
    """Everything `grpo eval` does, without the console."""
    refuse_inside_a_starting_worker("benchmark.run()")
    _refuse_unusable_options(options)
    unknown = [t for t in options.tools or [] if t not in TOOLS]
    if unknown:  # before anything loads
        raise UserError(f"--tools {', '.join(unknown)}: the tools are {', '.join(TOOLS)} (or none).")
    if options.predictions:
        return _grade_file(options)
    if options.model is None:
        raise UserError("say which model to evaluate with --model (a run directory, checkpoint, model directory, "
                        "hub id or builtin:tiny-math), or grade a file with --predictions.")
    random.seed(options.seed)
    np.random.seed(options.seed)
    torch.manual_seed(options.seed)
    loaded = load_for_inference(options.model, options.device, options.dtype, progress=on_message, best=options.best)
    if next(loaded.model.parameters()).device.type == "cpu":
        threads.apply(on_message)
    rows, named, data_name = _load_set(options, loaded.recipe)
    builtin = options.model.startswith("builtin:") or (
        loaded.recipe is not None and loaded.recipe.model.name.startswith("builtin:"))
    spec = _data_spec(named, options, loaded.recipe, loaded.tokenizer, builtin)
    if named is not None and spec.prompt_field != named.prompt_field:
        # a run trained on {question} evaluated on MATH's {problem}: give rows the name its prompt uses
        rows = [{**row, spec.prompt_field: row[named.prompt_field]} for row in rows]
    examples: Examples = build_examples(rows, spec, loaded.tokenizer, data_name)
    items = examples.items[: options.limit]  # None: all
    trained_with = loaded.recipe.grpo.max_new_tokens if loaded.recipe else None  # a run's: auto resolved in it
    max_new = options.max_new_tokens if options.max_new_tokens is not None else (
        named.max_new_tokens if named else trained_with if isinstance(trained_with, int) else EVAL_MAX_NEW_TOKENS)
    sampled = options.samples > 1
    tools = _tool_settings(options, loaded.recipe)
    with Scorer() as scorer, open_session(**tools) as session:
        sampling = Sampling.for_evaluation(max_new, options.samples, options.temperature, options.top_p,
                                           add_special_tokens=not spec.chat)
        report = evaluate(loaded.model, loaded.tokenizer, items, sampling, scorer, batch_size=options.batch_size,
                          on_progress=on_progress,
                          sampler=lambda tokenizer, prompts, sampling: generate(loaded.model, tokenizer, prompts,
                                                                                sampling, tools=session))
    settings = {
        "model": loaded.source, "data": data_name, "rows": len(rows), "n": len(items), "skipped_rows": examples.skipped,
        "skipped_note": examples.skip_note(),  # each reason with its count and first rows
        "protocol": f"{options.samples} samples, T={options.temperature}, top_p={options.top_p}" if sampled
        else "greedy pass@1",
        "samples": options.samples, "temperature": options.temperature if sampled else 0.0,
        "top_p": options.top_p if sampled else 1.0, "max_new_tokens": max_new, "seed": options.seed,
        "chat": spec.chat, "system_prompt": spec.system_prompt, "template": spec.template,
        **({"chat_template_kwargs": spec.chat_template_kwargs} if spec.chat and spec.chat_template_kwargs else {}),
        "prompt_field": spec.prompt_field, "limit": options.limit,
        **({"tools": tools["tools"], "max_tool_calls": tools["max_calls"], "tool_timeout_s": tools["timeout_s"]}
           if tools["tools"] else {}),
    }
    return Evaluation(report, settings)


def _tool_settings(options: EvalOptions, recipe) -> dict:
    """open_session's arguments: the options' when given, else the run's recipe's, else the recipe's defaults
    (no tool)."""
    grpo = recipe.grpo if recipe is not None else GrpoSpec()
    return {"tools": options.tools if options.tools is not None else list(grpo.tools),
            "max_calls": options.max_tool_calls if options.max_tool_calls is not None else grpo.max_tool_calls,
            "timeout_s": options.tool_timeout_s if options.tool_timeout_s is not None else grpo.tool_timeout_s,
            "memory_mb": grpo.tool_memory_mb}


def _grade_file(options: EvalOptions) -> Evaluation:
    """Grade a predictions file: every row of it (or of its first --limit rows), or none."""
    path = Path(options.predictions)
    if not path.is_file():
        raise UserError(f"predictions file {path} not found.")
    rows, places = read_json_rows(path)  # a line that is not a JSON object refuses the file, with its number
    if not rows:
        raise UserError(f"{path} holds no rows.")
    total = len(rows)
    rows, places = rows[: options.limit], places[: options.limit] if places else None  # None: all
    _same_number_of_completions(rows, places or [f"row {i}" for i in range(1, len(rows) + 1)], path)
    with Scorer() as scorer:
        try:
            report = grade_predictions(rows, scorer, places)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}.") from None
    # `rows` is what the file holds, `n` what was graded: they differ only by --limit
    return Evaluation(report, {"predictions": str(path), "rows": total, "n": len(rows), "limit": options.limit,
                               "protocol": "given completions"})


def _same_number_of_completions(rows: list[dict], places: list[str], path: Path) -> None:
    """Refuse rows with another number of completions than most: pass@k and maj@k are figures over
    k samples of each problem, and a problem with fewer than k cannot be drawn k from."""
    sizes = [_completions(row) for row in rows]
    counts = Counter(size for size in sizes if size)
    if not counts:
        return
    usual = counts.most_common(1)[0][0]
    odd = [f"{where} has {size}" for where, size in zip(places, sizes) if size and size != usual]
    if odd:
        raise UserError(f"{path}: {listed(odd)} completions where the other {counts[usual]} rows have {usual}. Every "
                        "row needs the same number, since pass@k and maj@k are figures over k samples of each "
                        "problem; grade rows with different numbers of samples as separate files.")


def _completions(row: dict) -> int | None:
    """How many completions a row gives; None when it is malformed (grade_predictions names those)."""
    if isinstance(row.get("completions"), list):
        return len(row["completions"])
    return 1 if "completion" in row else None
