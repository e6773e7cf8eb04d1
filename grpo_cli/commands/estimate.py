"""`grpo validate`: what a recipe will train and roughly how much memory it needs, without training.

Parameters are counted on a model built on PyTorch's meta device (no memory, no
weights read; only the config is needed). The memory figure is an estimate from
standard formulas, not a measurement: weights at their dtype (nf4: half a byte a
weight), fp32 adapters, gradients and AdamW moments for what trains, a frozen copy
for a full fine-tune with KL, then the larger of the rollout's KV cache and the
update's activations (about 34 bytes x hidden size per token and layer in 16 bits,
2 with activation checkpointing) plus one chunk of logits, and on the CPU the interpreter and
libraries. Prompts are as long as the longest training prompt when the data was read. Measured
on the CPU against the peak resident set it came within 1.5x for every configuration in
docs/performance.md (scripts/memory_check.py); on a GPU the same formulas give torch's allocated
peak, allocator slack not included, not measured yet.

A hub model's config is read from the local Hugging Face cache when it is there, without
the network; otherwise the hub is asked once, briefly, whether it answers (model/hub.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli.model import hub
from grpo_cli.update.batching import AUTO_TOKENS
from grpo_cli.model.logprobs import chunk_tokens_for
from grpo_cli.config.recipe import AUTO_MAX_NEW_TOKENS_CAP, Recipe

ASSUMED_PROMPT_TOKENS = 256  # the recipe does not know its prompts' length; a GSM8K chat prompt is ~150-250
# On the CPU the peak is the process's resident set, which also holds the interpreter and the libraries:
# importing torch, transformers, peft and grpo's training modules takes about this much (measured on Linux x86-64,
# torch 2.13 CPU). A GPU's figure is torch's allocated memory, which holds none of it.
CPU_RUNTIME_GIB = 0.4
GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    total_params: int
    trainable_params: int
    parts: dict[str, float]  # GiB by what holds them

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values())


def model_config(recipe: Recipe):
    from grpo_cli.model import builtin as builtin_model

    if recipe.model.name.startswith("builtin:"):
        return builtin_model.build_config(builtin_model.build_tokenizer())
    from grpo_cli.model.loading import resolve

    path = resolve(recipe.model.name)
    return hub_config(path) if not Path(path).exists() else _auto_config(path)


def _auto_config(name: str, **options):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, **options)


def hub_config(name: str):
    """The config of hub model `name`: from the local cache when it is there (no network), else from the hub
    when it answers; else a UserError saying what to do."""
    try:
        return _auto_config(name, local_files_only=True)
    except Exception:  # not in the cache (or unreadable there): the hub may have it
        pass
    why = hub.unreachable()
    if why is not None:
        raise hub.not_available(name, why)
    return _auto_config(name)


def count_parameters(recipe: Recipe, config) -> tuple[int, int]:
    """(all parameters, trainable ones) of the policy the recipe builds, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        if recipe.model.lora is None:
            return total, total
        from peft import LoraConfig, get_peft_model

        lora = recipe.model.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                                                 use_dora=lora.use_dora, task_type="CAUSAL_LM"))
        return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def quantized_parameters(config) -> int:
    """Parameters bitsandbytes stores in 4 bits: the linear layers', not the embeddings, the output
    head (left in 16 bits) or the norms. Counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def estimate(recipe: Recipe, config, total: int, trainable: int, on_gpu: bool = True,
             prompt_tokens: int | None = None) -> Estimate:
    """`prompt_tokens`: the longest training prompt when the data was read (grpo validate reads it), else
    ASSUMED_PROMPT_TOKENS."""
    spec, grpo = recipe.model, recipe.grpo
    width = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2 if on_gpu else 4}[spec.dtype]
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    four_bit = quantized_parameters(config) if spec.load_in_4bit else 0
    parts = {"weights": (four_bit * 0.5 + (total - four_bit) * width) / GIB}
    # fp32 adapters and their gradients, or gradients at the weights' width; AdamW's two fp32 moments
    trained_bytes = (4 + 4) if spec.lora is not None else width
    parts["training state (grads, AdamW)"] = trainable * (trained_bytes + 8) / GIB
    if spec.lora is None and grpo.kl_beta > 0:
        parts["frozen reference copy"] = total * width / GIB
    prompt, completion = prompt_tokens or ASSUMED_PROMPT_TOKENS, grpo.max_new_tokens
    if completion == "auto":  # not resolved (the data was not read): as train would for prompts of the assumed length
        context = getattr(config, "max_position_embeddings", None)
        completion = min(AUTO_MAX_NEW_TOKENS_CAP, max(context - prompt, 1)) if context else AUTO_MAX_NEW_TOKENS_CAP
    completions = recipe.completions_per_step
    kv_tokens = grpo.prompts_per_step * prompt + completions * completion if grpo.engine == "fast" \
        else completions * (prompt + completion)
    kv_cache = 2 * layers * kv_heads * head_dim * kv_tokens * width / GIB
    if grpo.engine == "fast" and recipe.distributed.strategy != "fsdp":
        # the step's prompts run once and every micro-batch continues from them (logprobs.can_share_prompts);
        # their activations stay until the one backward into them
        rows = completions if grpo.micro_batch_size is None else grpo.micro_batch_size
        pass_tokens = grpo.prompts_per_step * prompt + min(AUTO_TOKENS, rows * completion)
    else:
        pass_tokens = min(AUTO_TOKENS, completions * (prompt + completion)) if grpo.micro_batch_size is None \
            else grpo.micro_batch_size * (prompt + completion)
    per_token_layer = (2 if spec.gradient_checkpointing else 34) * hidden * width / 2
    activations = pass_tokens * layers * per_token_layer / GIB
    logits = 3 * chunk_tokens_for(config.vocab_size) * config.vocab_size * 4 / GIB
    if not on_gpu:
        parts["Python, torch and libraries (CPU resident set)"] = CPU_RUNTIME_GIB
    if kv_cache > activations + logits:
        parts["rollout KV cache (largest phase)"] = kv_cache
    else:
        parts["update activations + a chunk of logits (largest phase)"] = activations + logits
    return Estimate(total, trainable, parts)
