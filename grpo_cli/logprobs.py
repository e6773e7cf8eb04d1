"""Per-token log-probabilities of completions, without the full [batch, length, vocab] logits.

The backbone runs once to hidden states; the output head and log-softmax then run
over chunks of tokens. Under autograd each chunk is checkpointed, so only the
hidden states are kept and a chunk's logits are rebuilt during backward: peak
memory grows with the chunk, not with batch x length x vocabulary.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024
# Configs whose CausalLM forward changes the logits after the head (Gemma's soft-capping,
# Cohere's and Granite's scaling): for these the plain forward is used so nothing is skipped.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def causal_lm(model):
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [N, T]


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float):
    logits = head(hidden).float() / temperature  # [K, V]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [K]


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """log pi(token_t | prefix) for every completion token, at the sampling temperature.

    input_ids, attention_mask: [N, P+C], prompt left-padded to P, completion after it.
    Returns [N, C]; positions past a completion's end hold junk and must be masked.
    """
    lm = causal_lm(model)
    targets = input_ids[:, prompt_len:]  # [N, C]
    n, c = targets.shape
    positions = position_ids(attention_mask)  # [N, P+C]
    if any(getattr(lm.config, name, None) for name in _LOGIT_POSTPROCESSING):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
            logits_to_keep=c + 1,
        ).logits[:, :-1].float() / temperature  # [N, C, V]
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # [N, C]
    hidden = lm.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [N, P+C, H]
    hidden = hidden[:, prompt_len - 1 : -1].reshape(n * c, -1)  # [N*C, H]: the state that predicts each target
    flat_targets = targets.reshape(n * c)  # [N*C]
    head = lm.get_output_embeddings()
    pieces = []
    for start in range(0, n * c, chunk_tokens):
        args = (hidden[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens], head, temperature)
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    return torch.cat(pieces).view(n, c)  # [N, C]
