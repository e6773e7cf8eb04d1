"""When to warn that completions are being cut off at grpo.max_new_tokens.

A completion cut off at the cap rarely holds an answer: it scores nothing and teaches little. A cap
that cuts off most completions is the commonest silent failure of GRPO runs, so a step where more than
TRUNCATION_WARN_FRAC of the completions hit it gets a warning, repeated at most every
TRUNCATION_WARN_EVERY steps while it goes on."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpo_cli.run.throttle import Throttle

TRUNCATION_WARN_FRAC = 0.10
TRUNCATION_WARN_EVERY = 10  # steps at least between two such warnings while it goes on


@dataclass
class TruncationWatch:
    """Whether a step's truncation is worth a warning: over TRUNCATION_WARN_FRAC, as often as `Throttle` allows."""

    throttle: Throttle = field(default_factory=lambda: Throttle(TRUNCATION_WARN_EVERY))

    def check(self, step: int, truncated: torch.Tensor, max_new_tokens: int) -> str | None:
        """The warning for `step`, or None. truncated: [N_all] 1.0 where a completion (any process's) hit the cap."""
        cut, total = int(truncated.sum().item()), truncated.numel()
        if total == 0 or cut <= TRUNCATION_WARN_FRAC * total:
            return None
        since = self.throttle.due(step)
        if since is None:
            return None
        return (f"warning: step {step}: {cut} of {total} completions ({cut / total:.0%}) hit grpo.max_new_tokens "
                f"({max_new_tokens}) before ending{since}: a cut-off completion rarely holds an answer, so it scores "
                "nothing and teaches little. Raise grpo.max_new_tokens, or shorten the completions: the rules that "
                "reward long answers, or the prompt (data.template, data.system_prompt) that asks for them.")
