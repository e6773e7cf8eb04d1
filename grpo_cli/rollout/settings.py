"""`Sampling`: how completions are drawn, one object from the recipe (or grpo eval's options) down to the
decode loops, in place of a dozen loose arguments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Sampling:
    max_new_tokens: int
    samples_per_prompt: int = 1  # consecutive completions per prompt: G in training
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # argmax at every step; temperature and top_p unused
    add_special_tokens: bool = True  # False for chat-templated prompts, whose template placed them already
    engine: str = "fast"  # "fast": shared-prefill decoding (rollout.sampling); "generate": transformers' generate
    fold_lora: bool = True  # the fast engine may fold LoRA into the weights it samples with
    lean: bool = True  # the fast engine may run supported architectures through decoder.LeanDecoder
    cuda_graphs: bool = True  # on a GPU, the lean decoder replays its decode steps as CUDA graphs

    @classmethod
    def for_training(cls, recipe) -> Sampling:
        """A training step's: G samples per prompt at the recipe's temperature and top_p."""
        grpo = recipe.grpo
        return cls(max_new_tokens=grpo.max_new_tokens, samples_per_prompt=grpo.group_size,
                   temperature=grpo.temperature, top_p=grpo.top_p, add_special_tokens=not recipe.data.chat,
                   engine=grpo.engine, cuda_graphs=grpo.cuda_graphs)

    @classmethod
    def for_evaluation(cls, max_new_tokens: int, samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                       add_special_tokens: bool = True) -> Sampling:
        """An evaluation's: greedy for one completion per problem, else `samples` sampled ones."""
        return cls(max_new_tokens=max_new_tokens, samples_per_prompt=samples, temperature=temperature, top_p=top_p,
                   greedy=samples == 1, add_special_tokens=add_special_tokens)
