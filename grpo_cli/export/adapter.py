"""`--format adapter` (alias `--adapter-only`): the LoRA adapter alone, in the standard PEFT layout
(`adapter_model.safetensors`, `adapter_config.json` pointing at the base), for adapter servers and PEFT.

The adapter is saved as PEFT keeps it on the float32 base, in float32 whatever --dtype says, so the check is the
float32 one, through PEFT as its users load it. A full fine-tune has no adapter, and a run that merged its
starting adapter into the base (`model.adapter_mode: merge`) trained its LoRA on a base that exists nowhere as
a model: both are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grpo_cli.config.recipe import Recipe
from grpo_cli.errors import UserError
from grpo_cli.export.check import ExportCheck, check_reloaded
from grpo_cli.export.protocol import ExportFormat, Trained, takes_no_options
from grpo_cli.model.loading import load_base


class AdapterOnly:
    name = "adapter"
    summary = "the LoRA adapter alone, in the PEFT layout, pointing at its base (LoRA runs)"

    def configure(self, options: dict[str, str]) -> ExportFormat:
        takes_no_options(self.name, options)
        return self

    def refuse(self, recipe: Recipe | None) -> None:
        if recipe is None:  # an adapter made elsewhere: an adapter is what it holds
            return
        if recipe.model.lora is None:
            raise UserError(f"--format {self.name} needs a LoRA run; this checkpoint holds fully fine-tuned weights. "
                            "Export the whole model (--format safetensors, the default).")
        if recipe.model.adapter is not None and recipe.model.adapter_mode == "merge":
            raise UserError(f"--format {self.name}: this run trained its LoRA on {recipe.model.name} with "
                            f"model.adapter ({recipe.model.adapter}) merged into it (adapter_mode merge), a base "
                            "that exists nowhere as a model; export it merged (--format safetensors, the default).")

    def weights_dtype(self, trained: Trained) -> str:
        return "float32"

    def write(self, trained: Trained, directory: Path) -> None:
        trained.model.save_pretrained(directory)
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = trained.base_path
        config_path.write_text(json.dumps(config, indent=2))
        trained.tokenizer.save_pretrained(directory)

    def verify(self, trained: Trained, directory: Path, reference: torch.Tensor, base: torch.Tensor) -> ExportCheck:
        return check_reloaded(self._reload(trained, directory), trained, directory, reference, base,
                              self.weights_dtype(trained))

    def _reload(self, trained: Trained, directory: Path) -> torch.nn.Module:
        """The export loaded as its users will load it."""
        from peft import PeftModel

        base = load_base(trained.base_path, trained.base_spec, torch.device("cpu"), torch.float32)
        return PeftModel.from_pretrained(base, str(directory))

    def label(self, trained: Trained) -> str:
        return "LoRA adapter"

    def describe(self, trained: Trained) -> str:
        return (f"a LoRA adapter (PEFT layout) on the base its adapter_config.json names, saved as "
                f"{self.weights_dtype(trained)} (as PEFT keeps its weights; --dtype is for merged models).")

    def loading_code(self, base_path: str) -> str:
        return ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base_path!r})\n"
                "model = PeftModel.from_pretrained(base, \"<this dir>\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"<this dir>\")\n")

    def running(self, trained: Trained) -> str:
        return ""


ADAPTER = AdapterOnly()
