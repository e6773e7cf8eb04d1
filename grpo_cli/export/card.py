"""The model card an export carries as its README.md: what it is and where it came from, the check's figures,
the held-out accuracy the run recorded, how to prompt it exactly as training did (with an example), and a
transformers snippet that loads it and generates (the tests run it).

An adapter grpo did not train gets a shorter card: how it was prompted in training is not recorded, so the card
says so rather than guess.
"""

from __future__ import annotations

import pprint
import re
import time
from pathlib import Path

from grpo_cli import __version__
from grpo_cli.config.recipe import Recipe, dump
from grpo_cli.data.examples import load_rows, prompt_fields, render_prompt
from grpo_cli.errors import UserError
from grpo_cli.export.protocol import ExportFormat, Trained, Verification
from grpo_cli.run.log import METRICS, read_jsonl

# The model card's example prompt when the training set's first row is not at hand (a hub dataset).
EXAMPLE_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                    "How many clips did Natalia sell altogether in April and May?")


def _example_row(recipe: Recipe) -> tuple[dict, str]:
    """A row to show the prompt format with, and where it is from: the first usable row of the training set
    when that is a builtin set or a local file, else a made-up one (a hub set is not fetched for a card)."""
    spec = recipe.data
    fields = prompt_fields(spec)
    ref = spec.train
    if isinstance(ref, str) and (ref.startswith("builtin:") or Path(ref).is_file()):
        try:
            for row in load_rows(ref):
                if all(row.get(f) is not None and str(row.get(f)).strip() for f in fields):
                    return row, f"the first problem of the training set, {ref}"
        except UserError:
            pass
    return {f: EXAMPLE_QUESTION if f == spec.prompt_field else f"<{f}>" for f in fields}, "a made-up problem"


def _fence(text: str, language: str = "text") -> str:
    """`text` verbatim in a code block whose fence no run of backticks inside it can close."""
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{ticks}{language}\n{text}\n{ticks}"


def prompting(recipe: Recipe, tokenizer, export_format: ExportFormat, base_path: str) -> str:
    """The model card's sections on prompting the model exactly as training did, and on generating with it
    (the export loaded as `export_format` loads, on the base `base_path` where it needs one)."""
    spec = recipe.data
    row, origin = _example_row(recipe)
    text = spec.template.format(**row) if spec.template is not None else str(row[spec.prompt_field])
    prompt = render_prompt(row, spec, tokenizer)
    written = ("data.template, the format string below, filled in with the problem's fields"
               if spec.template is not None else f"the problem's `{spec.prompt_field}` field as it is, nothing added "
               "around it")
    blocks = f"The format string (data.template):\n\n{_fence(spec.template)}\n\n" if spec.template is not None else ""
    if spec.chat:
        messages = ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []) + \
                   [{"role": "user", "content": text}]
        if spec.system_prompt:
            blocks += f"The system message (data.system_prompt):\n\n{_fence(spec.system_prompt)}\n\n"
        system = ("before it, the system message below (data.system_prompt): the chat template does not add it by "
                  "itself, so pass it" if spec.system_prompt else "no system message (data.system_prompt was empty)")
        # the template's variables (data.chat_template_kwargs) as keyword arguments: enable_thinking=True
        arguments = "".join(f", {key}={value!r}" for key, value in spec.chat_template_kwargs.items())
        variables = (f" and the template's variables set as training set them (`{arguments.removeprefix(', ')}`)"
                     if arguments else "")
        how = f"""It was trained on chat prompts, built as follows:

- the user message: {written};
- {system};
- the messages rendered by the chat template this tokenizer carries (the one training used), with
  the assistant's turn opened (`add_generation_prompt=True`){variables}, then tokenized without adding
  special tokens.

{blocks}For example ({origin}), the messages

{_fence(pprint.pformat(messages, width=100, sort_dicts=False), "python")}

render to exactly this prompt, the model's completion following it:

{_fence(prompt)}"""
        make = (f"messages = {pprint.pformat(messages, width=100, sort_dicts=False)}\n"
                "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True"
                f"{arguments})\n"
                "inputs = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens=False)")
    else:
        how = f"""It was trained on plain-text prompts, not chat messages, so this tokenizer carries no chat
template: the base model's was left out, since the model never saw it in training and
`apply_chat_template` would prompt it in a format it was not trained on. Prompt it as training
did, with plain text the model continues: each prompt was {written}.

{blocks}For example ({origin}), a prompt exactly as the model saw it:

{_fence(prompt)}"""
        make = f"prompt = {prompt!r}\ninputs = tokenizer(prompt, return_tensors=\"pt\")"
    load = export_format.loading_code(base_path)
    generate = (f"{load}{make}\n"
                f"output = model.generate(**inputs, max_new_tokens={recipe.grpo.max_new_tokens}, do_sample=False)\n"
                "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
    return f"""## How to prompt it

{how}

## Use

Greedy decoding, as held-out accuracy was measured (training sampled at temperature
{recipe.grpo.temperature}), with the completion length training allowed.

{_fence(generate, "python")}"""


def model_card(export_format: ExportFormat, trained: Trained, check: Verification, state: dict, source: Path,
               run_dir: Path) -> str:
    """The card of an export of the grpo checkpoint `source` (its trainer `state`) of the run in `run_dir`."""
    recipe = trained.recipe
    evals = [r for r in read_jsonl(run_dir / METRICS) if "eval/accuracy" in r and r["step"] <= state["step"]]
    eval_lines = "\n".join(f"| {r['step']} | {r['eval/accuracy']:.1%} | {r.get('eval/n', '')} |" for r in evals)
    return f"""# GRPO fine-tune of {recipe.model.name}

Made with grpo {__version__} on {time.strftime('%Y-%m-%d')} from `{source}` (step {state['step']} of
{recipe.train.steps}): {export_format.describe(trained)}

{check.card_text()}

## Held-out accuracy recorded by the run

| step | accuracy | problems |
| --- | --- | --- |
{eval_lines or '| - | no evaluation recorded | |'}

{prompting(recipe, trained.tokenizer, export_format, trained.base_path)}
{export_format.running(trained)}
## Recipe

{_fence(dump(recipe).rstrip(), "yaml")}
"""


def foreign_card(export_format: ExportFormat, trained: Trained, check: Verification, location: str, base: str,
                 what: str, own_tokenizer: bool) -> str:
    """The card of an export of an adapter grpo did not train: `what` it is ("the PEFT adapter X"), at
    `location`, on `base`; its tokenizer its own or the base model's."""
    tokenizer_of = "the adapter's own" if own_tokenizer else "the base model's"
    return f"""# {Path(location).name}: a LoRA adapter on {base}

Exported with grpo {__version__} on {time.strftime('%Y-%m-%d')} from {what}: {export_format.describe(trained)}
The tokenizer is {tokenizer_of}, chat template included. Prompt the model as it was trained:
grpo did not train this adapter and does not know its prompt format.

{check.card_text()}
"""
