"""`grpo validate`'s look at the data: what training would refuse (a field the recipe names that the
rows lack, no prompt that fits the model's context) and what it would skip, read with the model's
tokenizer and config but no weights. The checks are the training set-up's own (data.load_examples,
prompt_room.fit_to_context), so validate and train cannot disagree.

Nothing is downloaded for it: a hub model whose tokenizer, or a hub dataset, is not in the local
cache skips the check (`Skipped`, saying why); training downloads them as usual.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from grpo_cli.data import examples as data
from grpo_cli.model import hub
from grpo_cli.data.examples import Examples
from grpo_cli.errors import UserError
from grpo_cli.data.prompt_room import fit_to_context, prompt_lengths, resolve_max_new_tokens
from grpo_cli.config.recipe import DatasetRef, Recipe


class Skipped(Exception):
    """The data check could not run without downloading something; the message says what."""


@dataclass(frozen=True, kw_only=True)
class DataCheck:
    train: Examples  # the training prompts data/examples.py keeps (its skips counted in it)
    longest: int  # tokens of the longest training prompt
    context: int | None  # the model's context in tokens; None when its config does not say
    max_new_tokens: int  # grpo.max_new_tokens, auto resolved
    auto: bool  # the recipe said auto
    too_long: int  # training prompts that leave less than max_new_tokens of the context: training skips them
    eval: Examples | None  # the held-out prompts, when the recipe names a set


def check_data(recipe: Recipe, config, recipe_dir: Path | None) -> DataCheck:
    """Read the training (and held-out) set as training would. A UserError for what training would refuse;
    Skipped when the tokenizer or a dataset is not on this machine. `config`: the model's, or None."""
    tokenizer = tokenizer_for(recipe.model.name)
    train = _examples(recipe.data.train, recipe, tokenizer, recipe_dir)
    eval_set = _examples(recipe.data.eval, recipe, tokenizer, recipe_dir) if recipe.data.eval is not None else None
    add_special_tokens = not recipe.data.chat
    max_new_tokens = resolve_max_new_tokens(recipe, train, tokenizer, config).grpo.max_new_tokens
    _, too_long = fit_to_context(train, tokenizer, config, max_new_tokens, add_special_tokens)  # none fits: refused
    return DataCheck(train=train, longest=max(prompt_lengths(train, tokenizer, add_special_tokens)),
                     context=getattr(config, "max_position_embeddings", None), max_new_tokens=max_new_tokens,
                     auto=recipe.grpo.max_new_tokens == "auto", too_long=too_long, eval=eval_set)


def tokenizer_for(name: str):
    """The tokenizer training would load for model.name, from this machine only."""
    if name.startswith("builtin:"):
        from grpo_cli.model import builtin as builtin_model

        return builtin_model.build_tokenizer()  # the one the builtin model is saved with, without building the model
    from grpo_cli.model.loading import load_tokenizer, resolve

    path = resolve(name)
    if not Path(path).exists() and not hub.in_cache(path, "tokenizer_config.json"):
        raise Skipped(f"the tokenizer of {path} is not in the local Hugging Face cache, and validate downloads "
                      "nothing (train will)")
    return load_tokenizer(path, local_files_only=True)


def _examples(ref: DatasetRef, recipe: Recipe, tokenizer, recipe_dir: Path | None) -> Examples:
    with _cache_only():
        if data.is_hub(ref, recipe_dir):
            try:
                data.read_rows(ref, recipe_dir)
            except UserError:
                raise Skipped(f"hub dataset {data.describe(ref)} is not in the local cache, and validate downloads "
                              "nothing (train will)") from None
        return data.load_examples(ref, recipe.data, tokenizer, recipe_dir)


@contextlib.contextmanager
def _cache_only():
    """`datasets` reads hub datasets from its cache only, as with HF_HUB_OFFLINE=1 (read at each load)."""
    import datasets

    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was
