"""When to warn that the sampler and the trainer disagree (update/sampler_correction.py).

In float32 the rollout's log-probs and the training forward's agree to rounding (k3 KL about 1e-12 a
token, measured in docs/algorithm.md); in 16 bits they do not, and a gap that large makes every update
use tokens drawn from a policy other than the one its gradient assumes. A step whose mean k3 KL is over
SAMPLER_KL_WARN, or whose tokens have importance ratios outside [1/2, 2] more often than
SAMPLER_OUTSIDE_WARN, gets a warning while no correction is on; with one on, a step where the correction
changed more than SAMPLER_CORRECTED_WARN of the tokens does (it is then discarding or capping much of the
signal). Repeated as `Throttle` allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grpo_cli.run.throttle import Throttle

SAMPLER_KL_SHOWN = 1e-6  # the dashboard shows sampler_kl above this: float32 rounding gives ~1e-12
SAMPLER_KL_WARN = 1e-3
SAMPLER_OUTSIDE_WARN = 0.01
SAMPLER_CORRECTED_WARN = 0.05
SAMPLER_WARN_EVERY = 10


@dataclass
class MismatchWatch:
    throttle: Throttle = field(default_factory=lambda: Throttle(SAMPLER_WARN_EVERY))

    def check(self, step: int, row: dict, correction: str) -> str | None:
        """The warning for `step` from its metrics row, or None. `correction`: grpo.sampler_correction."""
        kl, outside = row.get("sampler_kl"), row.get("sampler_ratio_outside")
        if kl is None:
            return None
        figures = (f"mean k3 KL {kl:.1e} per token, {outside:.1%} of tokens with a ratio outside [1/2, 2], "
                   f"ratios {row['sampler_ratio_min']:.3g} to {row['sampler_ratio_max']:.3g}")
        if correction == "none":
            if kl <= SAMPLER_KL_WARN and outside <= SAMPLER_OUTSIDE_WARN:
                return None
            advice = ("The update then learns from tokens drawn by another policy than the one it differentiates. "
                      "Set grpo.sampler_correction: tis (or mask) to weigh each token by how far apart they are, "
                      "or remove the cause: model.dtype: float32, or grpo.cuda_graphs: false to see whether the "
                      "graphs are it.")
        else:
            corrected = row.get("sampler_corrected_frac", 0.0)
            if corrected <= SAMPLER_CORRECTED_WARN:
                return None
            figures += f"; sampler_correction {correction} changed the weight of {corrected:.1%} of them"
            advice = ("So much correction discards (or caps) much of the step's signal. Remove the cause: "
                      "model.dtype: float32, or grpo.cuda_graphs: false to see whether the graphs are it; or widen "
                      "grpo.sampler_ratio_low / sampler_ratio_high.")
        since = self.throttle.due(step)
        if since is None:
            return None
        return f"warning: step {step}: the sampler and the trainer disagree ({figures}){since}. {advice}"
