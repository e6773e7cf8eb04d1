"""A transformers causal LM written as one GGUF file with gguf-py (its writer, tensor-name maps and
quantizers), the file llama.cpp, Ollama and LM Studio read.

Covered: the families the fast decoder knows (Llama, SmolLM2 among them, and Mistral, which GGUF calls
llama; Qwen2/2.5; Qwen3), with a BPE tokenizer, byte-level or SentencePiece-style (gguf_vocab.py). The
tensor types are those gguf-py itself quantizes (QUANTS); the K-quants (q4_k_m...) need llama.cpp's own
quantizer. What the file carries besides the weights: the tokenizer's tokens, their types and merges, the
special tokens (BOS, EOS, padding), whether a BOS is added, and the chat template.

Two conventions of llama.cpp's own converter are kept, since llama.cpp expects them: Llama-family query and
key projections are stored with their rows permuted for its rotary layout (readers such as transformers undo
it), and one-dimensional tensors (norms, biases) stay float32 whatever the type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grpo_cli.errors import UserError
from grpo_cli.export.gguf_vocab import Vocabulary, read_vocabulary, write_vocabulary


@dataclass(frozen=True)
class Quant:
    tensor: str  # gguf.GGMLQuantizationType's name for 2-D weights
    file_type: str  # gguf.LlamaFileType's name, what the header says the file mostly is


QUANTS = {
    "f32": Quant("F32", "ALL_F32"),
    "f16": Quant("F16", "MOSTLY_F16"),
    "bf16": Quant("BF16", "MOSTLY_BF16"),
    "q8_0": Quant("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": Quant("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": Quant("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": Quant("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": Quant("Q4_0", "MOSTLY_Q4_0"),
}

# transformers' model_type -> (gguf's MODEL_ARCH name, whether q and k are permuted for llama.cpp's rope)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False),
                 "qwen3": ("QWEN3", False)}


def check_quant(quant: str) -> Quant:
    if quant not in QUANTS:
        raise UserError(f"unknown GGUF type {quant!r}: choose one of {', '.join(QUANTS)}. The K-quants (q4_k_m, "
                        "q5_k_m, q6_k...) are made by llama.cpp's own quantizer from an f16 export.")
    return QUANTS[quant]


def check_architecture(config) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"a {model_type} model has no GGUF mapping here: GGUF export covers "
                        f"{', '.join(sorted(ARCHITECTURES))}.")
    return ARCHITECTURES[model_type]


def _permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """A query or key projection's rows in llama.cpp's rotary order: per head, the two halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(model, tokenizer, path: Path, quant: str, name: str, pre: str,
               vocabulary: Vocabulary | None = None) -> None:
    """Write `model` (a transformers causal LM, float weights) and `tokenizer` to the GGUF file `path`, 2-D
    weights as `quant` (QUANTS; a weight whose rows do not split into the type's blocks stays f16, as in
    llama.cpp's converter). `pre`: llama.cpp's name for the tokenizer's pre-tokenizer (tokenizer.ggml.pre).
    The file is written in place: the export's directory transaction is what makes it whole or absent."""
    import gguf

    chosen = check_quant(quant)
    arch_name, permute = check_architecture(model.config)
    vocabulary = vocabulary or read_vocabulary(tokenizer)  # all refusals before the file is opened
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    config = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, chosen.file_type))
    write_vocabulary(writer, vocabulary, tokenizer, config.vocab_size, pre)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensor_type = getattr(gguf.GGMLQuantizationType, chosen.tensor)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # llama.cpp uses token_embd as the output when there is no output.weight
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{hf_name}: no GGUF name for this tensor of a {config.model_type} model.")
        data = tensor.detach().float().cpu().numpy()
        if permute and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permuted(data, heads)
        elif permute and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permuted(data, kv_heads)
        encoded, options = _encoded(data, tensor_type)
        writer.add_tensor(gguf_name, encoded, **options)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _encoded(data: np.ndarray, tensor_type) -> tuple[np.ndarray, dict]:
    """(array, add_tensor's keyword arguments) for a tensor stored as `tensor_type`."""
    import gguf

    if data.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), {}
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), {}
    block = gguf.GGML_QUANT_SIZES[tensor_type][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), {}
    return gguf.quants.quantize(data, tensor_type), {"raw_dtype": tensor_type}
