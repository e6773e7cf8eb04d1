"""How much room prompts leave in the model's context for the completion.

Training and `grpo validate` ask the same questions here, so they cannot disagree: how long each
prompt is as the rollout encodes it, which prompts leave no room for grpo.max_new_tokens (they
are skipped, and counted), and what `grpo.max_new_tokens: auto` resolves to for these prompts and
this model.
"""

from __future__ import annotations

from dataclasses import replace

from grpo_cli.data import Examples
from grpo_cli.errors import UserError
from grpo_cli.recipe import AUTO_MAX_NEW_TOKENS_CAP, Recipe


def prompt_lengths(examples: Examples, tokenizer, add_special_tokens: bool) -> list[int]:
    """Tokens of each prompt, encoded as the rollout encodes it."""
    encoded = tokenizer([e.prompt for e in examples.items], add_special_tokens=add_special_tokens)
    return [len(ids) for ids in encoded["input_ids"]]


def fit_to_context(examples: Examples, tokenizer, config, max_new_tokens: int,
                   add_special_tokens: bool) -> tuple[Examples, int]:
    """Drop prompts that leave no room for max_new_tokens in the context of the model `config` describes;
    count them. `grpo validate` runs it too (data_check.py), so the two cannot disagree."""
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


def auto_max_new_tokens(longest_prompt: int, context: int | None) -> int:
    """grpo.max_new_tokens: auto: the context left after the longest training prompt, at most
    AUTO_MAX_NEW_TOKENS_CAP (the cap alone when the model's config states no context)."""
    if not context:
        return AUTO_MAX_NEW_TOKENS_CAP
    room = context - longest_prompt
    if room < 1:
        raise UserError(f"grpo.max_new_tokens is auto, the context left after the longest training prompt, but that "
                        f"prompt is {longest_prompt} tokens and the model's context is {context}: nothing is left. "
                        "Set grpo.max_new_tokens to a number (prompts that leave no room for it are skipped), or "
                        "shorten the prompts.")
    return min(AUTO_MAX_NEW_TOKENS_CAP, room)


def resolve_max_new_tokens(recipe: Recipe, examples: Examples, tokenizer, config) -> Recipe:
    """The recipe with grpo.max_new_tokens: auto replaced by its number for these training prompts and this model
    (`config`); a recipe with a number is returned as it is. `grpo validate` resolves it the same way."""
    grpo = recipe.grpo
    if grpo.max_new_tokens != "auto":
        return recipe
    longest = max(prompt_lengths(examples, tokenizer, not recipe.data.chat))
    tokens = auto_max_new_tokens(longest, getattr(config, "max_position_embeddings", None))
    return with_max_new_tokens(recipe, tokens)


def with_max_new_tokens(recipe: Recipe, tokens: int) -> Recipe:
    if recipe.grpo.overlong_buffer >= tokens:
        raise UserError(f"grpo.overlong_buffer ({recipe.grpo.overlong_buffer}) must be shorter than "
                        f"grpo.max_new_tokens, which auto resolved to {tokens}; lower the buffer or set "
                        "grpo.max_new_tokens to a number.")
    return recipe.model_copy(update={"grpo": recipe.grpo.model_copy(update={"max_new_tokens": tokens})})
