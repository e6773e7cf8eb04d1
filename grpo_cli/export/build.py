"""`grpo export`: a checkpoint written as a model others load, verified after writing.

The source is a grpo checkpoint (or a run directory's latest, or with --best its best), or an adapter grpo did
not train (a PEFT directory, a Trainer checkpoint). It is loaded once, in float32 on the CPU, with the tokenizer
the export ships: it carries the chat template training prompted with, and none when training used plain-text
prompts (data.chat false), since a template the model never saw would only prompt it wrongly. The chosen format
(formats.py: the merged model by default, or the adapter alone) writes it into the export's directory
(transaction.py), where it is reloaded and checked (check.py); the recipe and the model card (card.py) go beside
it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli.checkpoint.layout import MANIFEST, RECIPE_FILE, read_state
from grpo_cli.checkpoint.locating import locate, locate_best
from grpo_cli.config.recipe import ModelSpec, Recipe, dump, load as load_recipe
from grpo_cli.errors import UserError
from grpo_cli.export import card
from grpo_cli.export.check import distributions, write_and_check
from grpo_cli.export.formats import DEFAULT, format_named
from grpo_cli.export.protocol import Trained, Verification
from grpo_cli.export.transaction import export_directory
from grpo_cli.model import adapters
from grpo_cli.model.loading import DTYPES, load_base, load_start, load_tokenizer, resolve

RECIPE_COPY = "grpo_recipe.yaml"  # the training recipe, so grpo eval prompts the export as it was trained


@dataclass(frozen=True)
class Exported:
    out: Path
    step: int | None  # None for an adapter made elsewhere that records no step
    dtype: str  # of the weights written
    format: str  # the format's name (--format)
    label: str  # what was written, for "exported step N as a ...": "bfloat16 model", "LoRA adapter"
    check: Verification  # what the format's verification measured


def _output_dtype(requested: str | None, recipe: Recipe | None) -> str:
    """--dtype, else the recipe's dtype; a recipe's 'auto' (or no recipe) exports bfloat16, as hub models ship."""
    choice = requested or (recipe.model.dtype if recipe is not None else "auto")
    if choice == "auto":
        return "bfloat16"
    if choice not in DTYPES:
        raise UserError(f"--dtype {choice}: use one of {', '.join(DTYPES)}.")
    return choice


def trained_chat_template(recipe: Recipe, tokenizer):
    """The chat template training prompted with: the tokenizer's when data.chat is true, else None (plain prompts)."""
    return getattr(tokenizer, "chat_template", None) if recipe.data.chat else None


def export(ref: str, out: str | Path, dtype: str | None = None, format: str | None = None, force: bool = False,
           best: bool = False, quant: str | None = None, verifier: str | None = None) -> Exported:
    """Write the checkpoint `ref` (or a run directory's latest, or with `best` its best) to `out` in the export
    format named `format` (formats.FORMATS; None: formats.DEFAULT) and verify it. `quant`, `verifier`: the
    format's options (GGUF's), None where not given."""
    options = {key: value for key, value in (("quant", quant), ("verifier", verifier), ("dtype", dtype))
               if value is not None}
    export_format = format_named(format or DEFAULT).configure(options)
    out = Path(out)
    if best:
        found = locate_best(Path(ref))
    else:
        found = locate(Path(ref)) if Path(ref).is_dir() else None
    foreign = adapters.foreign(Path(ref)) if found is None and not best and Path(ref).is_dir() else None
    if found is None and foreign is None:
        raise UserError(f"{ref} is not a grpo run directory or checkpoint (no checkpoints/step-N/ with "
                        f"{MANIFEST} in it), nor a PEFT adapter or Trainer checkpoint ({adapters.CONFIG}).")
    if foreign is not None:  # made elsewhere (TRL, peft): no recipe, no run
        found, recipe, state, run_dir = Path(ref), None, {"step": foreign.step}, None
    else:
        recipe_path = found / RECIPE_FILE
        run_dir = found.parent.parent
        recipe = load_recipe(recipe_path if recipe_path.exists() else run_dir / "recipe.yaml")
        state = read_state(found)
    out_dtype = _output_dtype(dtype, recipe)
    export_format.refuse(recipe)
    # a checkpoint copied alone, or an adapter made elsewhere, has no run around it
    in_run = run_dir.resolve() if recipe is not None and found.parent.name == "checkpoints" else None
    with export_directory(out, force, Path(ref), in_run, found, state["step"]) as partial:
        if foreign is None:
            trained, base_dist = _load_checkpoint(found, recipe, out_dtype, out.name)
            check = write_and_check(export_format, trained, base_dist, partial)
            (partial / RECIPE_COPY).write_text(dump(recipe))
            (partial / "README.md").write_text(card.model_card(export_format, trained, check, state, found, run_dir))
        else:
            trained, base_dist, own_tokenizer = _load_foreign(foreign, out_dtype, out.name)
            check = write_and_check(export_format, trained, base_dist, partial)
            (partial / "README.md").write_text(card.foreign_card(export_format, trained, check, foreign.location,
                                                                 foreign.base, foreign.what, own_tokenizer))
    return Exported(out, state["step"], export_format.weights_dtype(trained), export_format.name,
                    export_format.label(trained), check)


def _load_checkpoint(found: Path, recipe: Recipe, out_dtype: str, name: str) -> tuple[Trained, torch.Tensor]:
    """The grpo checkpoint's model (its adapter on the full-precision base, or its full weights) and the base
    model's check distributions."""
    cpu = torch.device("cpu")
    base_path = resolve(recipe.model.name)
    full_precision = recipe.model.model_copy(update={"load_in_4bit": False, "lora": None})
    base = load_start(base_path, full_precision, cpu, torch.float32).eval()  # model.adapter merged, if it was
    tokenizer = load_tokenizer(str(found))
    tokenizer.chat_template = trained_chat_template(recipe, tokenizer)  # none when training prompted in plain text
    base_dist = distributions(base, tokenizer)
    lora = recipe.model.lora is not None
    if lora:
        model = adapters.attach(base, adapters.of_checkpoint(found), trainable=False).eval()
    else:
        del base
        model = load_base(str(found), full_precision, cpu, torch.float32).eval()
    return Trained(model, lora, tokenizer, base_path, full_precision, out_dtype, recipe, name), base_dist


def _load_foreign(adapter: adapters.Adapter, out_dtype: str, name: str) -> tuple[Trained, torch.Tensor, bool]:
    """An adapter made elsewhere on its base, the base model's check distributions, and whether the tokenizer is
    the adapter's own. Its tokenizer (chat template included) is kept as it is: how it was prompted in training
    is not recorded."""
    cpu = torch.device("cpu")
    base_path = resolve(adapter.base)
    full_precision = ModelSpec(name=adapter.base, dtype="float32", lora=None)
    base = load_base(base_path, full_precision, cpu, torch.float32).eval()
    own_tokenizer = (Path(adapter.location) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(adapter.location if own_tokenizer else base_path)
    base_dist = distributions(base, tokenizer)
    model = adapters.attach(base, adapter, trainable=False).eval()
    trained = Trained(model, True, tokenizer, base_path, full_precision, out_dtype, None, name)
    return trained, base_dist, own_tokenizer
