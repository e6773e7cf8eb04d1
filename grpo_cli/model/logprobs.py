"""Per-token log-probabilities of completions, without the full [batch, length, vocab] logits.

The backbone runs once to hidden states; the output head and log-softmax then run
over chunks of tokens. Under autograd each chunk is checkpointed, so only the
hidden states are kept and a chunk's logits are rebuilt during backward: peak
memory grows with the chunk, not with batch x length x vocabulary.

`micro_batch_logprobs` can also run each distinct prompt once for all its
completions in a micro-batch (`shared_prompts`): the prompt's KV cache (with
autograd) serves the completions, and gradients flow back through it into the
prompt pass. Or once for the whole step (`step_prompts`): every micro-batch
continues from the same prompt pass. Under autograd its keys and values enter the
micro-batches as leaves whose gradients add up over the micro-batches;
`backward_into_prompts` then runs the prompt pass's backward once with the sum
(exact by linearity): one prompt pass a step instead of one per micro-batch, forward
and backward (what that saves: docs/performance.md, "Update").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from grpo_cli.model.calls import (cache_argument, causal_lm, new_cache, position_ids, returned_cache,
                                  uses_logit_postprocessing)

CHUNK_TOKENS = 1024  # most tokens per chunk through the head
# Most logits per chunk (128 MiB in float32): with Qwen2.5's 151936-token vocabulary a chunk is 220
# tokens, so a chunk's few float32 [K, V] temporaries stay under a GiB whatever the vocabulary.
CHUNK_LOGITS = 2**25


def chunk_tokens_for(vocab_size: int) -> int:
    """Tokens per chunk through the head: CHUNK_TOKENS, fewer for a large vocabulary."""
    return max(16, min(CHUNK_TOKENS, CHUNK_LOGITS // vocab_size))


def _scaled_logits(hidden: torch.Tensor, head: torch.nn.Module, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()  # [K, V]
    return logits / temperature if temperature != 1.0 else logits  # no second [K, V] copy at temperature 1


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float,
                    with_entropy: bool, entropy_grad: bool):
    """[K, H] hidden states, [K] targets -> ([K] log-probs, [K] entropies or None) through the head."""
    return from_logits(_scaled_logits(hidden, head, temperature), targets, with_entropy, entropy_grad)


def from_logits(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool, entropy_grad: bool):
    """[..., V] logits -> log-prob of each target [...], and the distribution's entropy [...] if asked.

    Without `entropy_grad` the entropy is a value only. Under the head's chunk checkpoints a
    recomputed branch that backward never reaches keeps its saved [K, V] tensors until the whole
    graph goes: one chunk's worth per chunk, so memory would grow with batch x length x vocabulary."""
    normalizer = logits.logsumexp(-1)  # [...]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normalizer
    if not with_entropy:
        return logp, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = normalizer - (torch.softmax(logits, -1) * logits).sum(-1)  # H = log Z - E_p[logit]
    return logp, entropy


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """log pi(token_t | prefix) for every completion token, at the sampling temperature.

    input_ids, attention_mask: [N, P+C], prompt left-padded to P, completion after it.
    Returns [N, C]; positions past a completion's end hold junk and must be masked.
    """
    return _completion_pass(model, input_ids, attention_mask, prompt_len, temperature, chunk_tokens, False)[0]


def _completion_pass(model, input_ids, attention_mask, prompt_len, temperature, chunk_tokens, with_entropy,
                     entropy_grad=False):
    """(log-probs [N, C], entropies [N, C] or None) for the completions after a P-token prompt."""
    lm = causal_lm(model)
    targets = input_ids[:, prompt_len:]  # [N, C]
    c = targets.shape[1]
    positions = position_ids(attention_mask)  # [N, P+C]
    if uses_logit_postprocessing(model):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
            logits_to_keep=c + 1,
        ).logits[:, :-1].float() / temperature  # [N, C, V]
        return from_logits(logits, targets, with_entropy, entropy_grad)
    hidden = lm.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [N, P+C, H]
    hidden = hidden[:, prompt_len - 1 : -1]  # [N, C, H]: the state that predicts each target
    return _head_logprobs(lm, hidden, targets, temperature, chunk_tokens, with_entropy, entropy_grad)


def _head_logprobs(lm, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, chunk_tokens: int | None,
                   with_entropy: bool = False, entropy_grad: bool = False):
    """[N, C, H] hidden states, [N, C] targets -> ([N, C] log-probs, [N, C] entropies or None),
    chunked (None: `chunk_tokens_for` the vocabulary) and checkpointed. The entropies carry
    gradients only with `entropy_grad`."""
    n, c = targets.shape
    hidden = hidden.reshape(n * c, -1)  # [N*C, H]
    flat_targets = targets.reshape(n * c)  # [N*C]
    head = lm.get_output_embeddings()
    chunk_tokens = chunk_tokens or chunk_tokens_for(head.weight.shape[0])
    pieces = []
    for start in range(0, n * c, chunk_tokens):
        args = (hidden[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens], head, temperature,
                with_entropy, entropy_grad)
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    logp = torch.cat([p[0] for p in pieces]).view(n, c)  # [N, C]
    return logp, torch.cat([p[1] for p in pieces]).view(n, c) if with_entropy else None


def can_share_prompts(model) -> bool:
    """Whether prompts may run once for all their completions (`shared_prompts`): that needs a KV
    cache under autograd, so not with activation checkpointing (transformers turns the cache off
    there) nor with logit post-processing."""
    lm = causal_lm(model)
    checkpointing = getattr(lm, "is_activation_checkpointing", None)  # transformers >= 5.2x; the old name warns
    if checkpointing is None:
        checkpointing = getattr(lm, "is_gradient_checkpointing", False)
    return not checkpointing and not uses_logit_postprocessing(model)


@dataclass(kw_only=True)
class PromptStates:
    """Prompts run once: what their completions continue from."""

    keys: list[torch.Tensor]  # per layer [B, kv_heads, P, d]
    values: list[torch.Tensor]  # per layer [B, kv_heads, P, d]
    last: torch.Tensor  # [B, H] the last prompt token's state: it predicts the first completion token
    mask: torch.Tensor  # [B, P] left padding 0

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.last]


def prompt_states(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptStates:
    """One pass over [B, P] left-padded prompts, keeping each layer's keys and values."""
    out = causal_lm(model).base_model(input_ids=prompt_ids, attention_mask=prompt_mask,
                                      position_ids=position_ids(prompt_mask), use_cache=True,
                                      **{cache_argument(model): new_cache(model)})
    cache = returned_cache(out)
    return PromptStates(keys=[layer.keys for layer in cache.layers], values=[layer.values for layer in cache.layers],
                        last=out.last_hidden_state[:, -1], mask=prompt_mask)


def step_prompts(model, rollout) -> PromptStates:
    """Every distinct prompt of a rollout (one per group) run once, for all micro-batches."""
    step = slice(None, None, rollout.group_size)
    return prompt_states(model, rollout.input_ids[step, : rollout.prompt_len],
                         rollout.attention_mask[step, : rollout.prompt_len])


def as_leaves(states: PromptStates) -> PromptStates:
    """The same values cut from the prompt pass's graph, each gathering the gradient the
    micro-batches send it (see `backward_into_prompts`)."""
    leaf = lambda t: t.detach().requires_grad_(t.requires_grad)  # noqa: E731
    return PromptStates(keys=[leaf(k) for k in states.keys], values=[leaf(v) for v in states.values],
                        last=leaf(states.last), mask=states.mask)


def backward_into_prompts(states: PromptStates, leaves: PromptStates) -> None:
    """The prompt pass's backward, once, with the gradients all micro-batches gave its leaves."""
    pairs = [(t, leaf.grad) for t, leaf in zip(states.tensors(), leaves.tensors()) if leaf.grad is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def micro_batch_logprobs(model, micro, temperature: float = 1.0, shared_prompts: bool = True,
                         chunk_tokens: int | None = None, with_entropy: bool = False,
                         prompts: PromptStates | None = None, entropy_grad: bool = False):
    """([n, c] log-probs, [n, c] entropies or None) of a `batching.MicroBatch`'s completions.

    `prompts`: the step's prompts, already run (`step_prompts`), continued from. Otherwise with
    `shared_prompts` each distinct prompt of the micro-batch runs once and its KV cache serves all
    of its completions; without, every row runs prompt and completion."""
    if prompts is None and (not shared_prompts or micro.prompt_ids.shape[0] == micro.completion_ids.shape[0]):
        return _completion_pass(model, micro.input_ids, micro.attention_mask, micro.prompt_len, temperature,
                                chunk_tokens, with_entropy, entropy_grad)
    lm = causal_lm(model)
    if prompts is None:
        prompts, rows = prompt_states(model, micro.prompt_ids, micro.prompt_mask), micro.prompt_index  # [u, ...]
    else:
        rows = micro.groups
    cache = new_cache(model)
    for layer, (keys, values) in enumerate(zip(prompts.keys, prompts.values)):
        cache.update(keys[rows], values[rows], layer)  # each completion gets its prompt's keys and values
    prompt_mask = prompts.mask[rows]  # [n, p]
    steps = torch.arange(micro.completion_ids.shape[1], device=micro.completion_ids.device)
    completion = lm.base_model(input_ids=micro.completion_ids,
                               attention_mask=torch.cat([prompt_mask, micro.completion_mask], dim=1),
                               position_ids=prompt_mask.sum(1)[:, None] + steps[None], use_cache=True,
                               **{cache_argument(model): cache}).last_hidden_state  # [n, c, H]
    hidden = torch.cat([prompts.last[rows, None], completion[:, :-1]], dim=1)  # [n, c, H]
    return _head_logprobs(lm, hidden, micro.completion_ids, temperature, chunk_tokens, with_entropy, entropy_grad)
