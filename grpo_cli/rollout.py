"""Sampling: G completions for each prompt, packed for the update.

Generation goes through transformers' `generate` (KV cache on, model in eval
mode, no autograd). A completion ends at its first EOS, which is kept and
trained on; everything after it is padding and masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rollout:
    input_ids: torch.Tensor  # [N, P+C] prompt left-padded to P, then the completion
    attention_mask: torch.Tensor  # [N, P+C] 0 on padding on either side
    completion_mask: torch.Tensor  # [N, C] 1 through each completion's first EOS
    prompt_len: int  # P
    texts: list[str]  # decoded completions, special tokens dropped
    truncated: torch.Tensor  # [N] bool: reached max_new_tokens without an EOS

    @property
    def completion_ids(self) -> torch.Tensor:  # [N, C]
        return self.input_ids[:, self.prompt_len :]

    @property
    def lengths(self) -> torch.Tensor:  # [N]
        return self.completion_mask.sum(1)


def eos_token_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None] or [tokenizer.eos_token_id]
    return sorted(set(ids))


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    add_special_tokens: bool = True,
) -> Rollout:
    """`samples_per_prompt` completions for each prompt, consecutive per prompt. N = len(prompts) x samples."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
    eos_ids = eos_token_ids(model, tokenizer)
    # top_k=0 turns off the default top-k=50 filter: we sample from the policy we train.
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        sequences = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples_per_prompt,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **sampling,
        )  # [N, P+C]
    model.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    completion = sequences[:, prompt_len:]  # [N, C]
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=device))  # [N, C]
    ended = is_eos.any(1)  # [N]
    # Keep tokens up to and including the first EOS: cumsum counts EOS seen strictly before t.
    before = is_eos.long().cumsum(1) - is_eos.long()  # [N, C]
    completion_mask = (before == 0).long()  # [N, C]
    prompt_mask = enc["attention_mask"].repeat_interleave(samples_per_prompt, dim=0)  # [N, P]
    texts = tokenizer.batch_decode(completion * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    return Rollout(
        input_ids=sequences,
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_len=prompt_len,
        texts=texts,
        truncated=~ended,
    )
