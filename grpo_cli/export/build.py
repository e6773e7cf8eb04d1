"""`grpo export`: a checkpoint as a standalone model that plain transformers loads.

LoRA adapters are merged in float32 into a full-precision copy of the original
base weights (never into 4-bit ones, where the small delta would be rounded away),
then cast to the output dtype and saved as safetensors with the tokenizer and
generation config. The tokenizer carries the chat template training prompted with, and
none when training used plain-text prompts (data.chat false): a template the model never
saw would only prompt it wrongly. The model card shows the prompt format of training,
with an example, and how to generate with plain transformers. The export is then verified, not assumed: it is
reloaded and its next-token distributions on fixed prompts must match the adapter
model's and differ from the base model's. A failed check is an error.

Nothing is lost to an export. It is written into a hidden `.<out>.partial/` next to
--out and renamed into place only when written and verified; any failure or
interruption (a full disk, Ctrl-C, SIGTERM, a bug) removes that directory before it
propagates, and an earlier export being replaced is moved aside and deleted only once
the new one is in place. --out may not be, contain or lie inside the run or checkpoint
being exported. --force replaces only an earlier export: a directory whose
`grpo_export.json` (written last; it lists every file the export wrote) accounts for
all its files. That marker, rather than the recipe and model card, decides, because a
user may add files to an export or write a model card of their own: a directory with
anything export did not write is refused, even with --force.
"""

from __future__ import annotations

import errno
import json
import os
import pprint
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli import __version__
from grpo_cli.model import adapters
from grpo_cli.checkpoint import store as checkpoint
from grpo_cli.data.examples import load_rows, prompt_fields, render_prompt
from grpo_cli.errors import UserError, os_error
from grpo_cli.model.loading import DTYPES, load_base, load_start, load_tokenizer, resolve
from grpo_cli.config.recipe import ModelSpec, Recipe, dump, load as load_recipe
from grpo_cli.run.log import METRICS, read_jsonl

RECIPE_FILE = "grpo_recipe.yaml"  # the training recipe, so grpo eval prompts the export as it was trained
MARKER = "grpo_export.json"  # what wrote the directory and which files: --force deletes nothing else
CHECK_PROMPTS = [
    "What is 47 + 85?",
    "Solve x^2 - 5x + 6 = 0.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The answer is",
]
# The export must match the unmerged float32 adapter model to within this total-variation distance
# of next-token distributions (at any position of any check prompt), or NOISE_FACTOR times the distance
# that rounding the *base* model to the output dtype causes, whichever is larger: a 16-bit export
# cannot be closer than its own rounding allows.
TOLERANCE_FLOOR = 1e-4
NOISE_FACTOR = 3.0
# The model card's example prompt when the training set's first row is not at hand (a hub dataset).
EXAMPLE_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                    "How many clips did Natalia sell altogether in April and May?")


@dataclass(frozen=True)
class ExportCheck:
    vs_adapter: float  # max total variation distance to the unmerged adapter model (float32)
    vs_base: float  # the same to the base model: how much training changed the model
    tolerance: float


@dataclass(frozen=True)
class Exported:
    out: Path
    step: int | None  # None for an adapter made elsewhere that records no step
    dtype: str
    adapter_only: bool
    check: ExportCheck


def _output_dtype(requested: str | None, recipe: Recipe | None) -> str:
    """--dtype, else the recipe's dtype; a recipe's 'auto' (or no recipe) exports bfloat16, as hub models ship."""
    choice = requested or (recipe.model.dtype if recipe is not None else "auto")
    if choice == "auto":
        return "bfloat16"
    if choice not in DTYPES:
        raise UserError(f"--dtype {choice}: use one of {', '.join(DTYPES)}.")
    return choice


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _refuse_overlap(target: Path, source: Path, run_dir: Path | None) -> None:
    """--out may not hold the source or lie inside it: replacing it would delete the run."""
    what = str(source) if run_dir in (None, source) else f"{source} (in the run {run_dir})"
    for protected in filter(None, (source, run_dir)):
        if _within(protected, target):
            raise UserError(f"--out {target} contains {what}, the source of this export: writing the export there "
                            "would delete it, checkpoints and metrics included. Choose an --out outside it.")
        if _within(target, protected):
            raise UserError(f"--out {target} lies inside {what}, the source of this export: an export is not "
                            "written into a run or checkpoint, where replacing it could delete the run's files. "
                            "Choose an --out outside it.")


def _not_an_export(directory: Path) -> str | None:
    """Why --force may not replace `directory`, or None when it holds only what an export wrote."""
    try:
        written = set(json.loads((directory / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no {MARKER}, which grpo export writes into every export"
    # A symlink counts as a file: rmtree would remove the link itself, which export did not write.
    others = sorted(f.relative_to(directory).as_posix() for f in directory.rglob("*")
                    if (f.is_symlink() or not f.is_dir()) and f.relative_to(directory).as_posix() not in written)
    if others:
        return f"it holds files grpo export did not write: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
    return None


def _refuse_out(out: Path, target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} is a file; export writes a directory and never replaces a file. "
                        "Choose another --out.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    reason = _not_an_export(target)
    if reason:
        raise UserError(f"--out {out} is not empty and not an earlier grpo export ({reason}); --force replaces only "
                        "an earlier export, so choose another --out, or empty it yourself.")
    if not force:
        raise UserError(f"--out {out} is not empty: it holds an earlier export. Pass --force to replace it, or choose "
                        "another --out.")


def _hidden(target: Path, what: str) -> Path:
    return target.with_name(f".{target.name}.{what}")


def _writer(partial: Path) -> int | None:
    """The process still writing `partial` (another export to the same --out), or None when it is gone."""
    try:
        pid = json.loads((partial / MARKER).read_text())["pid"]
        if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
            return None
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return pid  # exists, under another user
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


def _clear_leftovers(target: Path) -> None:
    """What an export killed outright (SIGKILL) left beside --out; anything else there is refused, never removed."""
    partial, aside = _hidden(target, "partial"), _hidden(target, "replaced")
    writer = _writer(partial)
    if writer is not None:
        raise UserError(f"another grpo export (process {writer}) is writing {target}; wait for it to finish, or "
                        f"if no export is running, delete {partial}.")
    if aside.is_dir() and (aside / MARKER).exists() and not target.exists():
        aside.rename(target)  # killed between the two renames of _finish: the earlier export goes back
    for leftover in (partial, aside):
        ours = leftover.is_dir() and not leftover.is_symlink() and (
            (leftover / MARKER).exists() or not any(leftover.iterdir()))
        if ours:
            shutil.rmtree(leftover)
        elif os.path.lexists(leftover):
            raise UserError(f"{leftover} is in the way: export writes there before the final rename, and it was "
                            "not left by grpo export. Move it away or choose another --out.")


def _start(target: Path) -> Path:
    partial = _hidden(target, "partial")
    partial.mkdir(parents=True)
    # Marked at once, so that a later export knows a leftover as its own, and whether its writer still runs.
    (partial / MARKER).write_text(json.dumps({"written_by": "grpo export", "pid": os.getpid()}))
    return partial


def _finish(partial: Path, target: Path, source: Path, step: int | None) -> None:
    files = sorted(f.relative_to(partial).as_posix() for f in partial.rglob("*") if f.is_file() and f.name != MARKER)
    (partial / MARKER).write_text(json.dumps({"written_by": "grpo export", "grpo_version": __version__,
                                              "source": str(source), "step": step, "files": files}, indent=1))
    # The only way the export appears. An earlier one is moved aside, not deleted, until the new one is in place.
    aside = _hidden(target, "replaced")
    if target.exists():
        target.rename(aside)
    partial.rename(target)
    shutil.rmtree(aside, ignore_errors=True)


def _discard(target: Path) -> None:
    """Undo a failed or interrupted export: no hidden directory stays, and an earlier export is put back."""
    shutil.rmtree(_hidden(target, "partial"), ignore_errors=True)
    aside = _hidden(target, "replaced")
    if aside.exists():
        if target.exists():  # the new export is in place already; the earlier one is done with
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(target)


def _write_failed(error: OSError, out: Path, kept: str) -> UserError:
    hint = ("free some space or choose another --out" if error.errno in (errno.ENOSPC, errno.EDQUOT) else
            "choose a writable --out" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
            "choose another --out")
    return UserError(f"could not write the export to {out}: {error.strerror or error}; {kept}. To export, {hint}.")


def _distributions(model, tokenizer) -> torch.Tensor:
    """Next-token probabilities at every position of the check prompts, in float32. [P, T, V] ragged -> [sum T, V]"""
    rows = []
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
            rows.append(model(input_ids=ids).logits[0].float().softmax(-1).cpu())  # [T, V]
    return torch.cat(rows)


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Max over positions of the total variation distance 0.5 * sum |p - q|."""
    return (0.5 * (p - q).abs().sum(-1)).max().item()


def _tolerance(base_path: str, spec, dtype: str, base_dist: torch.Tensor, tokenizer) -> float:
    if dtype == "float32":
        return TOLERANCE_FLOOR
    rounded = load_base(base_path, spec, torch.device("cpu"), DTYPES[dtype]).eval()
    noise = _tv(_distributions(rounded, tokenizer), base_dist)
    del rounded
    return max(TOLERANCE_FLOOR, NOISE_FACTOR * noise)


def _verify(reloaded, out: Path, reference: torch.Tensor, base: torch.Tensor, dtype: str,
            tolerance: float) -> ExportCheck:
    """The reloaded export must match the adapter model and differ from the base, or it is an error."""
    from transformers import AutoTokenizer

    got = _distributions(reloaded.eval(), AutoTokenizer.from_pretrained(out))
    check = ExportCheck(_tv(got, reference), _tv(got, base), tolerance)
    if check.vs_adapter > check.tolerance:
        raise UserError(f"the export does not reproduce the trained model: its next-token distributions differ "
                        f"from the adapter model's by {check.vs_adapter:.2e} (total variation), more than the "
                        f"{check.tolerance:.1e} allowed in {dtype}. Nothing was written; try --dtype float32.")
    if check.vs_base <= check.tolerance:
        raise UserError(f"the export is indistinguishable from the base model (total variation {check.vs_base:.2e}"
                        f" <= {check.tolerance:.1e} in {dtype}): this checkpoint changed the model too little to "
                        "verify, or its adapter is empty. Nothing was written; export in float32 (--dtype float32) "
                        "or export a later checkpoint.")
    return check


def trained_chat_template(recipe: Recipe, tokenizer):
    """The chat template training prompted with: the tokenizer's when data.chat is true, else None (plain prompts)."""
    return getattr(tokenizer, "chat_template", None) if recipe.data.chat else None


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


def prompting(recipe: Recipe, tokenizer, adapter_only: bool, base_path: str) -> str:
    """The model card's sections on prompting the model exactly as training did, and on generating with it."""
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
    load = (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base_path!r})\n"
            "model = PeftModel.from_pretrained(base, \"<this dir>\")\n"
            if adapter_only else
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this dir>\")\n")
    generate = (f"{load}tokenizer = AutoTokenizer.from_pretrained(\"<this dir>\")\n{make}\n"
                f"output = model.generate(**inputs, max_new_tokens={recipe.grpo.max_new_tokens}, do_sample=False)\n"
                "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
    return f"""## How to prompt it

{how}

## Use

Greedy decoding, as held-out accuracy was measured (training sampled at temperature
{recipe.grpo.temperature}), with the completion length training allowed.

{_fence(generate, "python")}"""


def _model_card(recipe: Recipe, state: dict, source: Path, dtype: str, adapter_only: bool, check: ExportCheck,
                run_dir: Path, tokenizer, base_path: str) -> str:
    evals = [r for r in read_jsonl(run_dir / METRICS) if "eval/accuracy" in r and r["step"] <= state["step"]]
    eval_lines = "\n".join(f"| {r['step']} | {r['eval/accuracy']:.1%} | {r.get('eval/n', '')} |" for r in evals)
    what = "a LoRA adapter (PEFT layout)" if adapter_only else (
        "LoRA adapters merged in float32 into the full-precision base weights" if recipe.model.lora else
        "fully fine-tuned weights")
    return f"""# GRPO fine-tune of {recipe.model.name}

Made with grpo {__version__} on {time.strftime('%Y-%m-%d')} from `{source}` (step {state['step']} of
{recipe.train.steps}): {what}, saved as {dtype}.
{'The base was trained in 4-bit (nf4); the adapters were merged into its original full-precision weights.' if recipe.model.load_in_4bit and not adapter_only else ''}

Verified after writing: on {len(CHECK_PROMPTS)} fixed prompts the next-token distributions of this
export differ from the unmerged float32 adapter model's by at most {check.vs_adapter:.2e} (total
variation; allowed {check.tolerance:.1e}), and from the base model's by {check.vs_base:.2e}.

## Held-out accuracy recorded by the run

| step | accuracy | problems |
| --- | --- | --- |
{eval_lines or '| - | no evaluation recorded | |'}

{prompting(recipe, tokenizer, adapter_only, base_path)}

## Recipe

{_fence(dump(recipe).rstrip(), "yaml")}
"""


def export(ref: str, out: str | Path, dtype: str | None = None, adapter_only: bool = False,
           force: bool = False, best: bool = False) -> Exported:
    """Write the checkpoint `ref` (or a run directory's latest, or with `best` its best) to `out` and verify it."""
    out = Path(out)
    if best:
        found = checkpoint.locate_best(Path(ref))
    else:
        found = checkpoint.locate(Path(ref)) if Path(ref).is_dir() else None
    foreign = adapters.foreign(Path(ref)) if found is None and not best and Path(ref).is_dir() else None
    if found is None and foreign is None:
        raise UserError(f"{ref} is not a grpo run directory or checkpoint (no checkpoints/step-N/ with "
                        f"{checkpoint.MANIFEST} in it), nor a PEFT adapter or Trainer checkpoint ({adapters.CONFIG}).")
    if foreign is not None:  # made elsewhere (TRL, peft): no recipe, no run
        found, recipe, state, run_dir = Path(ref), None, {"step": foreign.step}, None
    else:
        recipe_path = found / checkpoint.RECIPE_FILE
        run_dir = found.parent.parent
        recipe = load_recipe(recipe_path if recipe_path.exists() else run_dir / "recipe.yaml")
        state = checkpoint.read_state(found)
    out_dtype = _output_dtype(dtype, recipe)
    if adapter_only and recipe is not None and recipe.model.lora is None:
        raise UserError("--adapter-only needs a LoRA run; this checkpoint holds fully fine-tuned weights.")
    merged_start = recipe is not None and recipe.model.adapter is not None and recipe.model.adapter_mode == "merge"
    if adapter_only and merged_start:
        raise UserError(f"--adapter-only: this run trained its LoRA on {recipe.model.name} with model.adapter "
                        f"({recipe.model.adapter}) merged into it (adapter_mode merge), a base that exists nowhere "
                        "as a model; export it merged (without --adapter-only).")
    target = out.resolve()  # where the checks and renames act, whatever symlinks or '.' --out goes through
    # a checkpoint copied alone, or an adapter made elsewhere, has no run around it
    in_run = run_dir.resolve() if recipe is not None and found.parent.name == "checkpoints" else None
    _refuse_overlap(target, Path(ref).resolve(), in_run)
    try:
        _clear_leftovers(target)
        _refuse_out(out, target, force)
    except OSError as exc:
        raise _write_failed(exc, out, "nothing was changed") from None
    # After the checks --out is absent, empty or an earlier export: what a failure must leave as it was.
    kept = "the earlier export there is as it was" if target.is_dir() and any(target.iterdir()) else \
        "nothing was left there"
    try:
        partial = _start(target)  # first: an --out that cannot be written fails before minutes of loading
        check = (_write(found, recipe, state, out_dtype, adapter_only, partial, run_dir) if foreign is None else
                 _write_foreign(foreign, out_dtype, adapter_only, partial))
        _finish(partial, target, found, state["step"])
    except BaseException as exc:  # Ctrl-C and SIGTERM too: nothing half-written or hidden may stay
        _discard(target)
        error = os_error(exc)
        if error is not None:
            raise _write_failed(error, out, kept) from None
        raise
    return Exported(out, state["step"], out_dtype, adapter_only, check)


def _write(found: Path, recipe: Recipe, state: dict, out_dtype: str, adapter_only: bool, partial: Path,
           run_dir: Path) -> ExportCheck:
    """Merge (or copy) the checkpoint into `partial`, verify it there and add the recipe and model card."""
    cpu = torch.device("cpu")
    base_path = resolve(recipe.model.name)
    full_precision = recipe.model.model_copy(update={"load_in_4bit": False, "lora": None})
    # The merge and the reference run in float32 on the CPU: the delta is not rounded before it is added.
    base = load_start(base_path, full_precision, cpu, torch.float32).eval()  # model.adapter merged, if it was
    tokenizer = load_tokenizer(str(found))
    tokenizer.chat_template = trained_chat_template(recipe, tokenizer)  # none when training prompted in plain text
    base_dist = _distributions(base, tokenizer)
    if recipe.model.lora is not None:
        adapted = adapters.attach(base, adapters.of_checkpoint(found), trainable=False).eval()
        check = _save_adapted(adapted, base_path, full_precision, tokenizer, base_dist, out_dtype, adapter_only,
                              partial)
    else:
        from transformers import AutoModelForCausalLM

        merged = load_base(str(found), full_precision, cpu, torch.float32).eval()
        reference = _distributions(merged, tokenizer)
        merged.to(DTYPES[out_dtype]).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        reloaded = AutoModelForCausalLM.from_pretrained(partial, dtype=DTYPES[out_dtype])
        tolerance = _tolerance(base_path, full_precision, out_dtype, base_dist, tokenizer)
        check = _verify(reloaded, partial, reference, base_dist, out_dtype, tolerance)
    (partial / RECIPE_FILE).write_text(dump(recipe))
    (partial / "README.md").write_text(_model_card(recipe, state, found, out_dtype, adapter_only, check, run_dir,
                                                   tokenizer, base_path))
    return check


def _save_adapted(adapted, base_path: str, full_precision, tokenizer, base_dist: torch.Tensor, out_dtype: str,
                  adapter_only: bool, partial: Path) -> ExportCheck:
    """Save the float32 adapter model (a PeftModel on the CPU) into `partial`, merged or as the adapter alone
    pointing at `base_path`, with the tokenizer; reload it and verify it against the adapter model."""
    from peft import PeftModel

    reference = _distributions(adapted, tokenizer)
    if adapter_only:
        adapted.save_pretrained(partial)
        config_path = partial / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_path
        config_path.write_text(json.dumps(config, indent=2))
    else:
        adapted.merge_and_unload(safe_merge=True).to(DTYPES[out_dtype]).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if adapter_only:  # adapters keep their training precision; check them as peft users load them
        cpu = torch.device("cpu")
        reloaded = PeftModel.from_pretrained(load_base(base_path, full_precision, cpu, torch.float32), str(partial))
        return _verify(reloaded, partial, reference, base_dist, "float32", TOLERANCE_FLOOR)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(partial, dtype=DTYPES[out_dtype])
    tolerance = _tolerance(base_path, full_precision, out_dtype, base_dist, tokenizer)
    return _verify(reloaded, partial, reference, base_dist, out_dtype, tolerance)


def _write_foreign(adapter: adapters.Adapter, out_dtype: str, adapter_only: bool, partial: Path) -> ExportCheck:
    """An adapter made elsewhere (a PEFT directory, a Trainer checkpoint) merged into its base, or copied,
    verified as a grpo checkpoint's is. Its tokenizer (chat template included) is kept as it is: how it
    was prompted in training is not recorded, so the card says so rather than guess."""
    cpu = torch.device("cpu")
    base_path = resolve(adapter.base)
    full_precision = ModelSpec(name=adapter.base, dtype="float32", lora=None)
    base = load_base(base_path, full_precision, cpu, torch.float32).eval()
    own_tokenizer = (Path(adapter.location) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(adapter.location if own_tokenizer else base_path)
    base_dist = _distributions(base, tokenizer)
    adapted = adapters.attach(base, adapter, trainable=False).eval()
    check = _save_adapted(adapted, base_path, full_precision, tokenizer, base_dist, out_dtype, adapter_only, partial)
    what = ("the LoRA adapter (PEFT layout) in its own dtype" if adapter_only else
            f"the LoRA adapter merged in float32 into the base, saved as {out_dtype}")
    tokenizer_of = "the adapter's own" if own_tokenizer else "the base model's"
    (partial / "README.md").write_text(f"""# {Path(adapter.location).name}: a LoRA adapter on {adapter.base}

Exported with grpo {__version__} on {time.strftime('%Y-%m-%d')} from {adapter.what}: {what}.
The tokenizer is {tokenizer_of}, chat template included. Prompt the model as it was trained:
grpo did not train this adapter and does not know its prompt format.

Verified after writing: on {len(CHECK_PROMPTS)} fixed prompts the next-token distributions of this
export differ from the unmerged float32 adapter model's by at most {check.vs_adapter:.2e} (total
variation; allowed {check.tolerance:.1e}), and from the base model's by {check.vs_base:.2e}.
""")
    return check
