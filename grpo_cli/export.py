"""`grpo export`: a checkpoint as a standalone model that plain transformers loads.

LoRA adapters are merged in float32 into a full-precision copy of the original
base weights (never into 4-bit ones, where the small delta would be rounded away),
then cast to the output dtype and saved as safetensors with the tokenizer, chat
template and generation config. The export is then verified, not assumed: it is
reloaded and its next-token distributions on fixed prompts must match the adapter
model's and differ from the base model's. A failed check is an error.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli import __version__, checkpoint
from grpo_cli.errors import UserError
from grpo_cli.modeling import DTYPES, load_base, load_tokenizer, resolve
from grpo_cli.recipe import Recipe, dump, load as load_recipe
from grpo_cli.run_log import METRICS, read_jsonl

RECIPE_FILE = "grpo_recipe.yaml"  # the training recipe, so grpo eval prompts the export as it was trained
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


@dataclass(frozen=True)
class ExportCheck:
    vs_adapter: float  # max total variation distance to the unmerged adapter model (float32)
    vs_base: float  # the same to the base model: how much training changed the model
    tolerance: float


@dataclass(frozen=True)
class Exported:
    out: Path
    step: int
    dtype: str
    adapter_only: bool
    check: ExportCheck


def _output_dtype(requested: str | None, recipe: Recipe) -> str:
    """--dtype, else the recipe's dtype; a recipe's 'auto' exports bfloat16, as hub models ship."""
    choice = requested or recipe.model.dtype
    if choice == "auto":
        return "bfloat16"
    if choice not in DTYPES:
        raise UserError(f"--dtype {choice}: use one of {', '.join(DTYPES)}.")
    return choice


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} is not empty; choose another --out or pass --force to replace it.")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


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


def _model_card(recipe: Recipe, state: dict, source: Path, dtype: str, adapter_only: bool, check: ExportCheck,
                run_dir: Path) -> str:
    evals = [r for r in read_jsonl(run_dir / METRICS) if "eval/accuracy" in r and r["step"] <= state["step"]]
    eval_lines = "\n".join(f"| {r['step']} | {r['eval/accuracy']:.1%} | {r.get('eval/n', '')} |" for r in evals)
    what = "a LoRA adapter (PEFT layout)" if adapter_only else (
        "LoRA adapters merged in float32 into the full-precision base weights" if recipe.model.lora else
        "fully fine-tuned weights")
    load = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            "base = AutoModelForCausalLM.from_pretrained(\"<base model>\")\nmodel = PeftModel.from_pretrained(base, \"<this dir>\")"
            if adapter_only else
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this dir>\")\ntokenizer = AutoTokenizer.from_pretrained(\"<this dir>\")")
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

## Use

```python
{load}
```

## Recipe

```yaml
{dump(recipe).rstrip()}
```
"""


def export(ref: str, out: str | Path, dtype: str | None = None, adapter_only: bool = False,
           force: bool = False) -> Exported:
    """Write the checkpoint `ref` (or a run directory's latest) to `out` and verify it."""
    out = Path(out)
    found = checkpoint.locate(Path(ref)) if Path(ref).is_dir() else None
    if found is None:
        raise UserError(f"{ref} is not a grpo run directory or checkpoint (no checkpoints/step-N/ with "
                        f"{checkpoint.STATE_FILE} in it).")
    recipe_path = found / checkpoint.RECIPE_FILE
    run_dir = found.parent.parent
    recipe = load_recipe(recipe_path if recipe_path.exists() else run_dir / "recipe.yaml")
    state = checkpoint.read_state(found)
    out_dtype = _output_dtype(dtype, recipe)
    if adapter_only and recipe.model.lora is None:
        raise UserError("--adapter-only needs a LoRA run; this checkpoint holds fully fine-tuned weights.")
    cpu = torch.device("cpu")
    base_path = resolve(recipe.model.name)
    full_precision = recipe.model.model_copy(update={"load_in_4bit": False, "lora": None})
    # The merge and the reference run in float32 on the CPU: the delta is not rounded before it is added.
    base = load_base(base_path, full_precision, cpu, torch.float32).eval()
    tokenizer = load_tokenizer(str(found))
    base_dist = _distributions(base, tokenizer)
    partial = _prepare_out(out, force)
    if recipe.model.lora is not None:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, str(found)).eval()
        reference = _distributions(adapted, tokenizer)
        if adapter_only:
            adapted.save_pretrained(partial)
            config_path = partial / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = base_path
            config_path.write_text(json.dumps(config, indent=2))
            merged = None
        else:
            merged = adapted.merge_and_unload(safe_merge=True)
    else:
        merged = load_base(str(found), full_precision, cpu, torch.float32).eval()
        reference = _distributions(merged, tokenizer)
    if merged is not None:
        merged.to(DTYPES[out_dtype]).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        if adapter_only:  # adapters keep their training precision; check them as peft users load them
            reloaded = PeftModel.from_pretrained(load_base(base_path, full_precision, cpu, torch.float32), str(partial))
            check = _verify(reloaded, partial, reference, base_dist, "float32", TOLERANCE_FLOOR)
        else:
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(partial, dtype=DTYPES[out_dtype])
            tolerance = _tolerance(base_path, full_precision, out_dtype, base_dist, tokenizer)
            check = _verify(reloaded, partial, reference, base_dist, out_dtype, tolerance)
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / RECIPE_FILE).write_text(dump(recipe))
    (partial / "README.md").write_text(_model_card(recipe, state, found, out_dtype, adapter_only, check, run_dir))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return Exported(out, state["step"], out_dtype, adapter_only, check)
