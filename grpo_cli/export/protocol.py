"""What an export format is: the protocol each one implements (`--format NAME`), the trained model it is
handed, and what its verification reports. The formats are registered by name in formats.py; check.py takes
the trained model's reference outputs, has the format write and verify itself, and turns a failure into an
error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from grpo_cli.config.recipe import ModelSpec, Recipe
from grpo_cli.errors import UserError


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
    name: str = "model"  # the export's name (--out's last part): what a format names its files after
    kept: dict = field(default_factory=dict)  # what a format's `write` keeps for its `verify` (before a merge)

    @property
    def chat(self) -> bool:
        """Whether training prompted through the tokenizer's chat template: the recipe's data.chat; for an adapter
        grpo did not train, whether the tokenizer has a template."""
        if self.recipe is not None:
            return self.recipe.data.chat
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def template_kwargs(self) -> dict:
        """The chat template's variables training set (data.chat_template_kwargs); none for a foreign adapter."""
        return dict(self.recipe.data.chat_template_kwargs) if self.recipe is not None else {}


class Verification(Protocol):
    """What a format's check of its written export found (it passed: a failed check raises)."""

    def summary(self) -> str:
        """One line for the console, after "verified: "."""

    def card_text(self) -> str:
        """The model card's paragraph on how the export was verified and what was measured."""


class ExportFormat(Protocol):
    """One way to write a trained model. An export is: `configure` with the command's format options and
    `refuse` before anything is loaded; then, into the hidden partial directory, `write` (the tokenizer
    included), and `verify` the written files against the trained model's reference outputs."""

    name: str  # what --format takes
    summary: str  # one line: --help, the list an unknown --format is answered with

    def configure(self, options: dict[str, str]) -> ExportFormat:
        """This format with the export's options (`{"quant": "q8_0", "dtype": "bfloat16"}`: only those given);
        a UserError for an option it does not take. Called before anything is loaded."""

    def refuse(self, recipe: Recipe | None) -> None:
        """Raise a UserError when this format cannot hold what the run trained (recipe None: an adapter made
        elsewhere). Called before anything is loaded."""

    def weights_dtype(self, trained: Trained) -> str:
        """The dtype of the weights `write` writes: the check allows the rounding to it, no more."""

    def write(self, trained: Trained, directory: Path) -> None:
        """Write the model's files, and the tokenizer where the format keeps it apart, into `directory` (empty
        but for the transaction's marker). May change `trained.model` (merge, cast): its reference outputs
        were taken before."""

    def verify(self, trained: Trained, directory: Path, reference: torch.Tensor,
               base: torch.Tensor) -> Verification:
        """Load what `write` wrote as its users will and check it against the trained model: `reference` and
        `base` are the trained and the base model's next-token distributions on check.CHECK_PROMPTS
        (check.distributions). A failed check is a UserError."""

    def label(self, trained: Trained) -> str:
        """What the export is, after "exported step N as a": "bfloat16 model", "LoRA adapter"."""

    def describe(self, trained: Trained) -> str:
        """What the export holds and in which dtype, for the model card: one or more sentences."""

    def loading_code(self, base_path: str) -> str:
        """Python lines, for the model card, that set `model` and `tokenizer` to the export loaded with
        transformers from "<this dir>" (`base_path`: the base model, for a format that loads on top of it)."""

    def running(self, trained: Trained) -> str:
        """The model card's section on running the export outside transformers (markdown), or ""."""


def takes_no_options(format_name: str, options: dict[str, str]) -> None:
    """`configure` for a format that takes no options but --dtype (read from `Trained.dtype`): any other given is
    a UserError naming the format."""
    given = ", ".join(f"--{key}" for key in options if key != "dtype")
    if given:
        raise UserError(f"{given} is not an option of --format {format_name} (--quant is --format gguf's).")
