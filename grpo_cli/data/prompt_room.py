"""How much room prompts leave in the model's context for the completion.

Training and `grpo validate` ask the same questions here, so they cannot disagree: how long each
prompt is as the rollout encodes it, which prompts leave no room for grpo.max_new_tokens (they
are skipped, and counted), and what `grpo.max_new_tokens: auto` resolves to for these prompts and
this model (never less than MIN_AUTO_MAX_NEW_TOKENS: the prompts that would leave less are the ones skipped).
"""

from __future__ import annotations

from dataclasses import replace

from grpo_cli.data.examples import Examples
from grpo_cli.errors import UserError
from grpo_cli.config.recipe import AUTO_MAX_NEW_TOKENS_CAP, MIN_AUTO_MAX_NEW_TOKENS, Recipe


def prompt_lengths(examples: Examples, tokenizer, add_special_tokens: bool) -> list[int]:
    """Tokens of each prompt, encoded as the rollout encodes it."""
    encoded = tokenizer([e.prompt for e in examples.items], add_special_tokens=add_special_tokens)
    return [len(ids) for ids in encoded["input_ids"]]


def fit_to_context(examples: Examples, tokenizer, config, max_new_tokens: int,
                   add_special_tokens: bool) -> tuple[Examples, int]:
    """Drop prompts that leave no room for max_new_tokens in the context of the model `config` describes;
    count them. `grpo validate` runs it too (data/check.py), so the two cannot disagree."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return examples, 0
    lengths = prompt_lengths(examples, tokenizer, add_special_tokens)
    kept = [e for e, n in zip(examples.items, lengths) if n + max_new_tokens <= limit]
    if not kept:
        raise UserError(
            f"every prompt of {examples.name} is too long: the longest is {max(lengths)} tokens and "
            f"grpo.max_new_tokens is {max_new_tokens}, but the model's context is {limit} tokens."
        )
    return replace(examples, items=kept), len(examples.items) - len(kept)


def auto_max_new_tokens(lengths: list[int], context: int | None) -> int:
    """grpo.max_new_tokens: auto for training prompts of these `lengths`: the context left after the longest prompt
    that leaves at least MIN_AUTO_MAX_NEW_TOKENS, at most AUTO_MAX_NEW_TOKENS_CAP (the cap alone when the model's
    config states no context). Longer prompts are skipped and counted (`fit_to_context`), as for a number: one
    prompt that nearly fills the context would otherwise leave every completion a few tokens, all cut off."""
    if not context:
        return AUTO_MAX_NEW_TOKENS_CAP
    fitting = [n for n in lengths if context - n >= MIN_AUTO_MAX_NEW_TOKENS]
    if not fitting:
        shortest = min(lengths)
        raise UserError(
            f"grpo.max_new_tokens is auto, which leaves a completion at least {MIN_AUTO_MAX_NEW_TOKENS} tokens of the "
            f"model's {context}-token context, but no training prompt leaves that: the shortest is {shortest} tokens. "
            + (f"Set grpo.max_new_tokens to a number, at most {context - shortest} (prompts that leave no room for it "
               "are skipped), shorten the prompts, or use a model with a longer context." if shortest < context else
               "Shorten the prompts, or use a model with a longer context."))
    return min(AUTO_MAX_NEW_TOKENS_CAP, context - max(fitting))


def resolve_max_new_tokens(recipe: Recipe, examples: Examples, tokenizer, config) -> Recipe:
    """The recipe with grpo.max_new_tokens: auto replaced by its number for these training prompts and this model
    (`config`); a recipe with a number is returned as it is. `grpo validate` resolves it the same way."""
    grpo = recipe.grpo
    if grpo.max_new_tokens != "auto":
        return recipe
    lengths = prompt_lengths(examples, tokenizer, not recipe.data.chat)
    tokens = auto_max_new_tokens(lengths, getattr(config, "max_position_embeddings", None))
    return with_max_new_tokens(recipe, tokens)


def with_max_new_tokens(recipe: Recipe, tokens: int) -> Recipe:
    if recipe.grpo.overlong_buffer >= tokens:
        raise UserError(f"grpo.overlong_buffer ({recipe.grpo.overlong_buffer}) must be shorter than "
                        f"grpo.max_new_tokens, which auto resolved to {tokens}; lower the buffer or set "
                        "grpo.max_new_tokens to a number.")
    return recipe.model_copy(update={"grpo": recipe.grpo.model_copy(update={"max_new_tokens": tokens})})
