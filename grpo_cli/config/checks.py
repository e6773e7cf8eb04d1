"""Settings that are each valid but do not fit together: a micro-batch that does not divide the step, a 4-bit
base without LoRA, tools without the fast engine, a rule listed twice, ...; checked once every key is.
"""

from __future__ import annotations

import inspect

from grpo_cli.config.schema import Recipe
from grpo_cli.update.loss import LOSSES


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


def cross_field_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """(path, message) for settings that are each valid but do not fit together."""
    problems = []
    grpo = recipe.grpo
    micro = grpo.micro_batch_size
    if micro is not None and recipe.completions_per_step % micro:
        problems.append((
            ("grpo", "micro_batch_size"),
            f"{micro} does not divide the step's {recipe.completions_per_step} completions "
            f"(prompts_per_step {grpo.prompts_per_step} x group_size {grpo.group_size}); "
            f"use a divisor such as {_largest_divisor_at_most(recipe.completions_per_step, micro)}",
        ))
    if recipe.model.load_in_4bit and recipe.model.lora is None:
        problems.append((
            ("model", "load_in_4bit"),
            "a 4-bit base cannot be trained directly; set model.lora (QLoRA) or load_in_4bit: false",
        ))
    if recipe.model.adapter is not None and recipe.model.adapter_mode == "continue" and recipe.model.lora is None:
        problems.append((
            ("model", "adapter_mode"),
            "continue trains model.adapter itself, a LoRA, so model.lora cannot be null; use adapter_mode: merge "
            "to merge the adapter into the base and fine-tune every weight",
        ))
    if recipe.model.adapter is not None and recipe.model.adapter_mode == "merge" and recipe.model.load_in_4bit:
        problems.append((
            ("model", "adapter_mode"),
            "merge into a 4-bit base would round the adapter away; use adapter_mode: continue (QLoRA on the "
            "adapter) or load_in_4bit: false",
        ))
    if grpo.tools and grpo.engine != "fast":
        problems.append((("grpo", "engine"), "grpo.tools needs the fast engine: transformers' generate (plain) "
                         "cannot pause a completion while its code runs; use engine: fast"))
    keys = [r.key for r in recipe.rewards]
    for index, key in enumerate(keys):
        if key in keys[:index]:
            problems.append((("rewards", index, "rule"), f"{key} is listed twice; give each rule one weight "
                             "(or two python rules different names)"))
    if grpo.max_new_tokens != "auto" and grpo.overlong_buffer >= grpo.max_new_tokens:  # auto: checked when resolved
        problems.append((("grpo", "overlong_buffer"), f"{grpo.overlong_buffer} must be shorter than "
                         f"grpo.max_new_tokens ({grpo.max_new_tokens})"))
    if grpo.sampler_correction != "none" and "weights" not in inspect.signature(LOSSES[grpo.loss]).parameters:
        problems.append((("grpo", "sampler_correction"), f"the loss {grpo.loss!r} takes no `weights` argument, "
                         "so the correction cannot weigh its terms; give it one (docs/extending.md, losses) or set "
                         "sampler_correction: none"))
    return problems
