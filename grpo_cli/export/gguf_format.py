"""`--format gguf`: the merged model as one GGUF file, `<name>-<quant>.gguf`, with an Ollama Modelfile beside it,
for llama.cpp, Ollama and LM Studio; verified by llama.cpp itself where llama-cpp-python is installed
(gguf_verify.py).

The LoRA adapters are merged in float32, as for safetensors, and the file is written from the float32 weights
by gguf-py (gguf_file.py): f32, f16, bf16 and the legacy quants q8_0 to q4_0 directly; the K-quants
(KQUANTS) by llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`) from an f16 file written
first and then removed, so they need llama-cpp-python. Nothing is downloaded.

The tokenizer's pre-tokenizer name (tokenizer.ggml.pre, which tells llama.cpp how to split text before BPE)
is the source file's when the run started from a GGUF file (the same tokenizer), else read from the
tokenizer's own pre-tokenizer, else the family's usual one; the verification's token check is what proves
the choice.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli.config.recipe import Recipe
from grpo_cli.errors import UserError
from grpo_cli.export.check import CHECK_PROMPTS
from grpo_cli.export.gguf_file import QUANTS, check_architecture, write_gguf
from grpo_cli.export.gguf_verify import (GgufCheck, check_verifier, llama_cpp_version, prompted, rendered,
                                          verify_gguf)
from grpo_cli.export.gguf_vocab import Vocabulary, read_vocabulary
from grpo_cli.export.modelfile import MODELFILE, modelfile
from grpo_cli.export.protocol import ExportFormat, Trained

DEFAULT_QUANT = "f16"
KQUANTS = {"q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # --quant -> llama.cpp's file type, made by its quantizer
ALL_QUANTS = [*QUANTS, *KQUANTS]
# the pre-tokenizer by the shape of tokenizer.json's, then by model family (llama.cpp's names)
FAMILY_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe", "mistral": "tekken"}


def pre_tokenizer(recipe: Recipe | None, vocabulary: Vocabulary, model_type: str) -> str:
    """llama.cpp's name for how the tokenizer read as `vocabulary` splits text before BPE (see the module's
    docstring); "default" for a SentencePiece-style vocabulary, which llama.cpp does not pre-tokenize."""
    if vocabulary.model == "llama":
        return "default"
    if recipe is not None:
        from grpo_cli.model import gguf as gguf_model

        if gguf_model.is_gguf(recipe.model.name):
            import gguf

            field = gguf.GGUFReader(gguf_model.locate(recipe.model.name)).fields.get("tokenizer.ggml.pre")
            if field is not None:
                return str(field.contents())
    state = vocabulary.state.get("pre_tokenizer") or {}
    parts = state.get("pretokenizers", [state])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds[:1] == ["Digits"] and parts[0].get("individual_digits"):
        return "smollm"
    pattern = next((p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"), "")
    if "\\p{N}{1,3}" in pattern:
        return "llama-bpe"
    if "\\p{N}| ?[^\\s\\p{L}\\p{N}]+" in pattern:
        return "qwen2"
    return FAMILY_PRE.get(model_type, "default")


def _quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantizer: the f16 file `source` as `quant` (a K-quant) at `target`."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANTS[quant])
    with suppress_stdout_stderr(disable=False):  # a line per tensor whose rows do not fit a K-quant's blocks
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0:
        raise UserError(f"llama.cpp's quantizer failed to write {quant} (code {code}).")


@dataclass(frozen=True)
class GgufFile:
    quant: str = DEFAULT_QUANT
    verifier: str = "auto"
    name = "gguf"
    summary = ("the merged model as one GGUF file with an Ollama Modelfile, for llama.cpp, Ollama and LM Studio "
               f"(--quant {', '.join(ALL_QUANTS)}; default {DEFAULT_QUANT})")

    def configure(self, options: dict[str, str]) -> ExportFormat:
        if "dtype" in options:
            raise UserError(f"--dtype is for --format safetensors; a GGUF file's type is --quant "
                            f"({', '.join(ALL_QUANTS)}).")
        unknown = sorted(set(options) - {"quant", "verifier"})
        if unknown:
            raise UserError(f"--{unknown[0]} is not an option of --format gguf (it takes --quant and --verifier).")
        quant = options.get("quant", DEFAULT_QUANT).lower()
        verifier = options.get("verifier", "auto")
        if quant not in ALL_QUANTS:
            raise UserError(f"--quant {quant}: GGUF export writes {', '.join(ALL_QUANTS)}.")
        check_verifier(verifier)
        if quant in KQUANTS and llama_cpp_version() is None:
            raise UserError(f"--quant {quant} is made by llama.cpp's own quantizer, which needs llama-cpp-python: pip "
                            f"install 'grpo-cli[gguf]', or choose one of {', '.join(QUANTS)}.")
        return GgufFile(quant, verifier)

    def refuse(self, recipe: Recipe | None) -> None:
        if recipe is not None and recipe.model.name.startswith("builtin:"):
            raise UserError(f"--format gguf: {recipe.model.name}'s character-level tokenizer has no GGUF form (GGUF "
                            "carries SentencePiece, byte-level BPE, WordPiece and Unigram vocabularies, and grpo "
                            "writes byte-level BPE). Export it as safetensors (the default format).")

    def weights_dtype(self, trained: Trained) -> str:
        return self.quant

    def file_name(self, trained: Trained) -> str:
        return f"{trained.name}-{self.quant}.gguf"

    def write(self, trained: Trained, directory: Path) -> None:
        # the refusals (architecture, tokenizer) before the check's generations
        check_architecture(trained.model.config)
        vocabulary = read_vocabulary(trained.tokenizer, prompt=rendered(trained, CHECK_PROMPTS[0]))
        pre = pre_tokenizer(trained.recipe, vocabulary, trained.model.config.model_type)
        # the base's side too, while the adapter can be disabled
        trained.kept.update(prompted=prompted(trained), vocabulary=vocabulary)
        model = trained.model.merge_and_unload(safe_merge=True) if trained.lora else trained.model
        trained.model = model.float().eval()  # the verification's reference: the merged float32 model
        path = directory / self.file_name(trained)
        if self.quant in QUANTS:
            write_gguf(trained.model, trained.tokenizer, path, self.quant, trained.name, pre, vocabulary)
        else:
            f16 = directory / f".{trained.name}-f16.gguf"
            write_gguf(trained.model, trained.tokenizer, f16, "f16", trained.name, pre, vocabulary)
            try:
                _quantize(f16, path, self.quant)
            finally:
                f16.unlink(missing_ok=True)
        (directory / MODELFILE).write_text(modelfile(path.name, trained))

    def verify(self, trained: Trained, directory: Path, reference: torch.Tensor, base: torch.Tensor) -> GgufCheck:
        return verify_gguf(trained, directory / self.file_name(trained), self.quant, self.verifier, reference, base,
                           trained.kept["prompted"])

    def label(self, trained: Trained) -> str:
        return f"{self.quant} GGUF file"

    def describe(self, trained: Trained) -> str:
        what = "LoRA adapters merged in float32 into the full-precision base weights" if trained.lora else \
            "fully fine-tuned weights"
        made = "llama.cpp's quantizer, from an f16 file" if self.quant in KQUANTS else "gguf-py"
        return (f"{what}, written by {made} as one GGUF file, `{self.file_name(trained)}` ({self.quant}: "
                "norms and other 1-D tensors stay f32), carrying the tokenizer, its special tokens and the chat "
                f"template training used; `{MODELFILE}` for Ollama beside it.")

    def loading_code(self, base_path: str) -> str:
        return ("from pathlib import Path\n\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                "# transformers reads GGUF too (dequantized to float32)\n"
                "gguf_file = next(Path(\"<this dir>\").glob(\"*.gguf\")).name\n"
                "model = AutoModelForCausalLM.from_pretrained(\"<this dir>\", gguf_file=gguf_file)\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"<this dir>\", gguf_file=gguf_file)\n")

    def running(self, trained: Trained) -> str:
        file = self.file_name(trained)
        return f"""
## Run it with llama.cpp or Ollama

```bash
ollama create {trained.name} -f {MODELFILE}     # the Modelfile: the template, stop tokens and system prompt
ollama run {trained.name}
llama-cli -m {file} --jinja                      # llama.cpp, with the file's own chat template
```

```python
from llama_cpp import Llama

llm = Llama(model_path="{file}")
print(llm.create_chat_completion(messages=[...], temperature=0)["choices"][0]["message"]["content"])
```
"""


GGUF = GgufFile()
