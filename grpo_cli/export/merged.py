"""`--format safetensors`, the default: a standalone model that plain transformers loads.

LoRA adapters are merged in float32 into a full-precision copy of the original base weights (never into 4-bit
ones, where the small delta would be rounded away), then cast to the output dtype and saved as safetensors with
the generation config. A full fine-tune's weights are re-saved in the output dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpo_cli.config.recipe import Recipe
from grpo_cli.export.check import ExportCheck, check_reloaded
from grpo_cli.export.protocol import ExportFormat, Trained, takes_no_options
from grpo_cli.model.loading import DTYPES


class MergedModel:
    name = "safetensors"
    summary = "the model with its LoRA adapters merged in, as safetensors plain transformers loads (the default)"

    def configure(self, options: dict[str, str]) -> ExportFormat:
        takes_no_options(self.name, options)
        return self

    def refuse(self, recipe: Recipe | None) -> None:
        return None  # any run, LoRA or full, and any adapter

    def weights_dtype(self, trained: Trained) -> str:
        return trained.dtype

    def write(self, trained: Trained, directory: Path) -> None:
        model = trained.model.merge_and_unload(safe_merge=True) if trained.lora else trained.model
        model.to(DTYPES[trained.dtype]).save_pretrained(directory)
        trained.tokenizer.save_pretrained(directory)

    def verify(self, trained: Trained, directory: Path, reference: torch.Tensor, base: torch.Tensor) -> ExportCheck:
        return check_reloaded(self._reload(trained, directory), trained, directory, reference, base,
                              self.weights_dtype(trained))

    def _reload(self, trained: Trained, directory: Path) -> torch.nn.Module:
        """The export loaded as its users will load it."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[trained.dtype])

    def label(self, trained: Trained) -> str:
        return f"{trained.dtype} model"

    def describe(self, trained: Trained) -> str:
        what = ("LoRA adapters merged in float32 into the full-precision base weights" if trained.lora else
                "fully fine-tuned weights")
        four_bit = trained.recipe is not None and trained.recipe.model.load_in_4bit
        return f"{what}, saved as {trained.dtype}." + (
            "\nThe base was trained in 4-bit (nf4); the adapters were merged into its original full-precision "
            "weights." if four_bit else "")

    def loading_code(self, base_path: str) -> str:
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"<this dir>\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"<this dir>\")\n")

    def running(self, trained: Trained) -> str:
        return ""


SAFETENSORS = MergedModel()
