"""What an export format is: the protocol each one implements (`--format NAME`), and the trained model it is
handed. The formats are registered by name in formats.py; verification.py writes, reloads and checks every one
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from grpo_cli.config.recipe import ModelSpec, Recipe


@dataclass
class Trained:
    """The model to export, loaded once, in float32 on the CPU (the merge and the reference are not rounded)."""

    model: torch.nn.Module  # a PeftModel (the LoRA adapter, unmerged) or the fully fine-tuned model
    lora: bool  # whether `model` is a PeftModel
    tokenizer: Any  # as the export ships it: the chat template training used, or none
    base_path: str  # the base model, resolved to a local directory
    base_spec: ModelSpec  # how to load the base in full precision: no 4-bit, no LoRA
    dtype: str  # the output dtype (--dtype, else the recipe's)
    recipe: Recipe | None  # None for an adapter grpo did not train


class ExportFormat(Protocol):
    """One way to write a trained model. An export is: `refuse` before anything is loaded; then, into the hidden
    partial directory, `write` (the tokenizer is written beside it by the caller), `reload` as its users load it,
    and the check of the reloaded model against the trained one at the tolerance of `weights_dtype`."""

    name: str  # what --format takes
    summary: str  # one line: --help, the list an unknown --format is answered with

    def refuse(self, recipe: Recipe | None) -> None:
        """Raise a UserError when this format cannot hold what the run trained (recipe None: an adapter made
        elsewhere). Called before anything is loaded."""

    def weights_dtype(self, trained: Trained) -> str:
        """The dtype of the weights `write` writes: the check allows the rounding to it, no more."""

    def write(self, trained: Trained, directory: Path) -> None:
        """Write the model's files into `directory` (an empty directory but for the tokenizer and the marker).
        May change `trained.model` (merge, cast): its reference outputs were taken before."""

    def reload(self, trained: Trained, directory: Path) -> torch.nn.Module:
        """The export in `directory` loaded as its users will load it, for the check."""

    def label(self, trained: Trained) -> str:
        """What the export is, after "exported step N as a": "bfloat16 model", "LoRA adapter"."""

    def describe(self, trained: Trained) -> str:
        """What the export holds and in which dtype, for the model card: one or more sentences."""

    def loading_code(self, base_path: str) -> str:
        """Python lines, for the model card, that import AutoTokenizer and set `model` to the export loaded from
        "<this dir>" (`base_path`: the base model, for a format that loads on top of it)."""
