"""Writing an export and checking it: the one path every format takes, so none is assumed to work.

The trained model's next-token distributions on fixed prompts are taken first; the format writes the export
and verifies it. The formats that transformers reloads (safetensors, adapter) share `check_reloaded`: the
reloaded model's distributions must match the trained model's and differ from the base model's. A failed
check is a UserError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli.errors import UserError
from grpo_cli.export.protocol import ExportFormat, Trained, Verification
from grpo_cli.model.loading import DTYPES, load_base

CHECK_PROMPTS = [
    "What is 47 + 85?",
    "Solve x^2 - 5x + 6 = 0.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The answer is",
]
# The export must match the unmerged float32 adapter model to within this total-variation distance
# of next-token distributions (at any position of any check prompt), or NOISE_FACTOR times the distance
# that rounding the *base* model to the output dtype causes, whichever is larger: a 16-bit export
# cannot be closer than its own rounding allows.
TOLERANCE_FLOOR = 1e-4
NOISE_FACTOR = 3.0


@dataclass(frozen=True)
class ExportCheck:
    vs_adapter: float  # max total variation distance to the unmerged adapter model (float32)
    vs_base: float  # the same to the base model: how much training changed the model
    tolerance: float

    def summary(self) -> str:
        return (f"next-token distributions within {self.vs_adapter:.1e} of the adapter model (allowed "
                f"{self.tolerance:.1e}), {self.vs_base:.2e} from the base")

    def card_text(self) -> str:
        return f"""Verified after writing: on {len(CHECK_PROMPTS)} fixed prompts the next-token distributions of this
export differ from the unmerged float32 adapter model's by at most {self.vs_adapter:.2e} (total
variation; allowed {self.tolerance:.1e}), and from the base model's by {self.vs_base:.2e}."""


def distributions(model, tokenizer) -> torch.Tensor:
    """Next-token probabilities at every position of the check prompts, in float32. [P, T, V] ragged -> [sum T, V]"""
    rows = []
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
            rows.append(model(input_ids=ids).logits[0].float().softmax(-1).cpu())  # [T, V]
    return torch.cat(rows)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Max over positions of the total variation distance 0.5 * sum |p - q|."""
    return (0.5 * (p - q).abs().sum(-1)).max().item()


def _tolerance(trained: Trained, dtype: str, base_dist: torch.Tensor) -> float:
    if dtype == "float32":
        return TOLERANCE_FLOOR
    rounded = load_base(trained.base_path, trained.base_spec, torch.device("cpu"), DTYPES[dtype]).eval()
    noise = tv(distributions(rounded, trained.tokenizer), base_dist)
    del rounded
    return max(TOLERANCE_FLOOR, NOISE_FACTOR * noise)


def check_reloaded(reloaded, trained: Trained, out: Path, reference: torch.Tensor, base: torch.Tensor,
                    dtype: str) -> ExportCheck:
    """The export reloaded from `out` (weights in `dtype`) must match the adapter model and differ from the base,
    or it is an error."""
    from transformers import AutoTokenizer

    tolerance = _tolerance(trained, dtype, base)
    got = distributions(reloaded.eval(), AutoTokenizer.from_pretrained(out))
    check = ExportCheck(tv(got, reference), tv(got, base), tolerance)
    if check.vs_adapter > check.tolerance:
        raise UserError(f"the export does not reproduce the trained model: its next-token distributions differ "
                        f"from the adapter model's by {check.vs_adapter:.2e} (total variation), more than the "
                        f"{check.tolerance:.1e} allowed in {dtype}. Nothing was written; try --dtype float32.")
    if check.vs_base <= check.tolerance:
        raise UserError(f"the export is indistinguishable from the base model (total variation {check.vs_base:.2e}"
                        f" <= {check.tolerance:.1e} in {dtype}): this checkpoint changed the model too little to "
                        "verify, or its adapter is empty. Nothing was written; export in float32 (--dtype float32) "
                        "or export a later checkpoint.")
    return check


def write_and_check(fmt: ExportFormat, trained: Trained, base_dist: torch.Tensor, directory: Path) -> Verification:
    """Write `trained` into `directory` in format `fmt` and have the format verify what it wrote against the
    trained model (and `base_dist`, the base model's distributions, taken before any adapter was attached)."""
    reference = distributions(trained.model, trained.tokenizer)  # before `write`, which may merge or cast it
    fmt.write(trained, directory)
    return fmt.verify(trained, directory, reference, base_dist)
