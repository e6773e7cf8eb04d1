"""`Decoded`: what a decode loop hands back to `rollout.generate`, whichever loop it was (the shared-prefill
loop, the one with the code tool, or transformers' `generate`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Decoded:
    tokens: torch.Tensor  # [N, C] completion tokens, padding after each row's end
    # [N, C] float32: log-prob of each drawn token under the distribution it was drawn from (the logits the
    # decoder computed, after temperature and top-p); 0 where nothing was drawn at random (padding, tool
    # output, greedy decoding)
    sampler_logp: torch.Tensor
    tool_mask: torch.Tensor | None = None  # [N, C] True on tool output; None without a tool
    tool_use: object | None = None  # with_tools.ToolUse, with a tool
