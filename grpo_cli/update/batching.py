"""Micro-batches for the update: completions grouped by length, each batch trimmed to its own padding.

A rollout pads every completion to the longest one and every prompt to the
longest prompt. Run as one batch, a step whose completions are 10 to 40 tokens
long spends most of its forward and backward on padding. Sorting completions by
length and cutting the sorted list where lengths drop (or where the row or token
cap is reached) keeps each micro-batch nearly rectangular; the loss is a sum over
completions, so the order changes nothing but float rounding.

Each micro-batch also keeps its distinct prompts apart from the completions, so
the update can run a prompt once for all of its completions in the batch, or once
for the whole step (`logprobs.micro_batch_logprobs`, `logprobs.step_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_cli.rollout.sampling import Rollout

AUTO_TOKENS = 16384  # padded tokens per pass when the recipe sets no micro_batch_size
SPREAD = 0.75  # a micro-batch's shortest sequence is at least this fraction of its longest


@dataclass(frozen=True)
class MicroBatch:
    rows: torch.Tensor  # [n] indices into the rollout's completions
    prompt_ids: torch.Tensor  # [u, p] the distinct prompts of these rows, left-padded to the longest here
    prompt_mask: torch.Tensor  # [u, p]
    prompt_index: torch.Tensor  # [n] which of the u prompts each row continues
    groups: torch.Tensor  # [n] which of the step's prompts each row continues (its group)
    completion_ids: torch.Tensor  # [n, c] trimmed to the longest completion here
    completion_mask: torch.Tensor  # [n, c] the completion's tokens, tool output included (attended)
    action_mask: torch.Tensor  # [n, c] those the model chose: the loss's and the entropy's (Rollout.action_mask)
    sampler_logp: torch.Tensor | None = None  # [n, c] the log-probs the sampler drew them with (Rollout.sampler_logp)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:  # [n, p+c]
        return torch.cat([self.prompt_ids[self.prompt_index], self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [n, p+c]
        return torch.cat([self.prompt_mask[self.prompt_index], self.completion_mask], dim=1)


def plan(lengths: list[int], max_rows: int | None = None, max_tokens: int | None = None,
         spread: float | None = None) -> list[list[int]]:
    """Row indices per micro-batch. With `spread`, longest first, and a new batch starts when the
    next sequence is shorter than `spread` x the batch's longest; without, rows stay in order.
    Either way a batch holds at most `max_rows` rows and `max_tokens` padded tokens (None: no
    limit). Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if spread else range(len(lengths))
    batches: list[list[int]] = []
    for index in order:
        if batches:
            current = batches[-1]
            longest = max(lengths[current[0]], lengths[index])
            fits = (max_rows is None or len(current) < max_rows) and (
                max_tokens is None or (len(current) + 1) * longest <= max_tokens)
            if fits and (not spread or lengths[index] >= spread * longest):
                current.append(index)
                continue
        batches.append([index])
    return batches


def split(rollout: Rollout, max_rows: int | None = None, max_tokens: int | None = None,
          spread: float | None = None, only: list[int] | None = None) -> list[MicroBatch]:
    """The rollout cut into micro-batches (see `plan`), each trimmed of columns that are padding in
    all its rows. The defaults give the plain path: rows in order, `max_rows` at a time. `only`: these
    rows of the rollout and no others (None: all)."""
    prompt_lengths = rollout.attention_mask[:, : rollout.prompt_len].sum(1)  # [N]
    # planned on completion lengths (they vary most), counted with the longest prompt for the token cap
    totals = (rollout.lengths + rollout.prompt_len).tolist()
    chosen = list(range(len(totals))) if only is None else list(only)
    batches = []
    for planned in plan([totals[i] for i in chosen], max_rows, max_tokens, spread):
        indices = [chosen[i] for i in planned]
        rows = torch.tensor(indices, device=rollout.input_ids.device)
        groups, prompt_index = torch.unique(rows // rollout.group_size, return_inverse=True)  # [u], [n]
        first_rows = groups * rollout.group_size  # [u] a row holding each prompt
        p = int(prompt_lengths[rows].max())
        c = int(rollout.lengths[rows].max())
        batches.append(MicroBatch(
            rows=rows,
            prompt_ids=rollout.input_ids[first_rows, rollout.prompt_len - p : rollout.prompt_len],
            prompt_mask=rollout.attention_mask[first_rows, rollout.prompt_len - p : rollout.prompt_len],
            prompt_index=prompt_index,
            groups=rows // rollout.group_size,
            completion_ids=rollout.completion_ids[rows, :c],
            completion_mask=rollout.completion_mask[rows, :c],
            action_mask=rollout.action_mask[rows, :c],
            sampler_logp=None if rollout.sampler_logp is None else rollout.sampler_logp[rows, :c],
        ))
    return batches
