"""Load the policy: tokenizer, weights (full, LoRA, or LoRA over a 4-bit base), and its reference.

The reference policy for the KL term costs nothing with LoRA: it is the same
network with the adapters disabled. A full fine-tune keeps a frozen copy, and
with kl_beta = 0 there is no reference at all.

A run may start from an adapter (model.adapter, say from supervised fine-tuning); the
reference is then the policy it starts from, base plus that adapter, never the bare base:
- adapter_mode continue trains the adapter itself (its own r, alpha, dropout, targets). The
  reference pass swaps a frozen copy of the adapter's starting weights into each LoRA layer
  (`starting_adapter`): the size of the adapter, not of the model, and the layers stay plain
  PEFT LoRA layers for the rollout's fold and `lora_linear`.
- adapter_mode merge merges it into the base weights (`load_start`), and a fresh LoRA (or a
  full fine-tune) trains on top: the base with the adapters disabled is the starting policy.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli.model import adapters
from grpo_cli.model import builtin as builtin_model
from grpo_cli.checkpoint import layout, locating
from grpo_cli.model import gguf as gguf_model
from grpo_cli.model import hub
from grpo_cli.errors import UserError
from grpo_cli.config.recipe import ModelSpec
from grpo_cli.config.recipe import load as load_recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class Policy:
    model: torch.nn.Module  # what the optimizer trains (a PeftModel with LoRA)
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    path: str  # where the base weights were loaded from
    frozen_reference: torch.nn.Module | None  # full fine-tune with KL only
    starting_adapter: list | None = None  # adapter_mode continue with KL: (layer, lora_A, lora_B) frozen as loaded

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @contextlib.contextmanager
    def reference(self):
        """The reference model to run under no_grad: adapters off, or the frozen copy."""
        if self.frozen_reference is not None:
            yield self.frozen_reference
        elif self.starting_adapter is not None:
            with adapters_swapped(self.starting_adapter):
                yield self.model
        elif self.is_lora:
            with adapters_disabled(lora_layers(self.model)):
                yield self.model
        else:
            raise RuntimeError("no reference model: kl_beta is 0")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def lora_layers(model) -> list:
    """The PEFT LoRA layers inside a model (none for a plain transformers model)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def is_plain_lora_linear(layer) -> bool:
    """Whether PEFT's forward of this LoRA layer is base(x) + s * B(A(dropout(x))) with one active
    adapter over a plain nn.Linear: no DoRA, no adapter bias, no other variant, no transposed
    weights. What folding the adapter into the weights, or training it through
    `lora_linear`, relies on."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(layer) is not LoraLinear or len(layer.active_adapters) != 1:
        return False
    adapter = layer.active_adapters[0]
    return (adapter in layer.lora_A and adapter not in getattr(layer, "lora_variant", {})
            and not layer.use_dora.get(adapter, False) and not getattr(layer, "lora_bias", {}).get(adapter, False)
            and not layer.fan_in_fan_out and type(layer.get_base_layer()) is torch.nn.Linear)


@contextlib.contextmanager
def adapters_disabled(layers: list):
    """The LoRA layers' adapters off until exit, as PEFT's `disable_adapter()` does, without its
    model-wide status checks, which cost several times the switch itself (docs/performance.md); the
    reference pass enters this once per micro-batch)."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def frozen_adapter_copies(layers: list) -> list:
    """(layer, lora_A, lora_B): a frozen copy of each LoRA layer's active adapter as it is now."""
    copies = []
    for layer in layers:
        name = layer.active_adapters[0]
        if name not in layer.lora_A or layer.use_dora.get(name, False):
            raise UserError("model.adapter has LoRA on embeddings, or DoRA, which adapter_mode continue cannot keep a "
                            "starting copy of for the KL reference; use adapter_mode: merge, or grpo.kl_beta: 0.")
        copies.append((layer, copy.deepcopy(layer.lora_A[name]).requires_grad_(False),
                       copy.deepcopy(layer.lora_B[name]).requires_grad_(False)))
    return copies


@contextlib.contextmanager
def adapters_swapped(copies: list):
    """Each layer runs its frozen copy (`frozen_adapter_copies`) in place of its trained adapter until exit.
    Modules are swapped, not tensors: the trained parameters, their gradients and optimizer state are untouched."""
    trained = []
    for layer, lora_a, lora_b in copies:
        name = layer.active_adapters[0]
        trained.append((layer, name, layer.lora_A[name], layer.lora_B[name]))
        layer.lora_A[name], layer.lora_B[name] = lora_a, lora_b
    try:
        yield
    finally:
        for layer, name, lora_a, lora_b in trained:
            layer.lora_A[name], layer.lora_B[name] = lora_a, lora_b


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is cuda but no CUDA GPU is visible; use device: auto or cpu.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[choice]


def resolve(name: str, progress=None) -> str:
    """A loadable path or hub id for model.name; builds the builtin model, or converts a GGUF file, on first use."""
    if gguf_model.is_gguf(name):
        return str(gguf_model.ensure(name, progress))
    if name.startswith("builtin:"):
        try:
            return str(builtin_model.ensure(name.removeprefix("builtin:"), progress=progress))
        except KeyError:
            raise UserError(f"unknown builtin model {name!r}; the builtin models are "
                            f"{', '.join('builtin:' + n for n in builtin_model.VARIANTS)}.") from None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a model directory (no config.json in it).")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise UserError(f"model directory {name} not found.")
    return name  # a hub id


def load_tokenizer(path: str, local_files_only: bool = False):
    """`local_files_only`: a hub model's tokenizer from the local cache only (`grpo validate` downloads nothing)."""
    from transformers import AutoTokenizer

    if not Path(path).exists() and not local_files_only:
        hub.require(path)  # the first file a hub model needs: offline and not cached, say so at once
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    except Exception as exc:
        raise UserError(_load_failure("tokenizer", path, exc)) from None
    if tokenizer.pad_token is None:
        # Padding positions are masked everywhere, so reusing EOS as the pad token is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends to the right end of every prompt
    return tokenizer


def _load_failure(what: str, path: str, exc: Exception) -> str:
    return (
        f"could not load the {what} for {path!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
        "model.name must be builtin:tiny-math, a local model directory, a GGUF file, or a hub id that is reachable "
        "(or already in the hub cache with HF_HUB_OFFLINE=1)."
    )


def load_base(path: str, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if not Path(path).exists():
        hub.require(path)

    kwargs: dict = {"dtype": dtype}
    if spec.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as exc:
        raise UserError(f"4-bit loading needs bitsandbytes: {exc}") from None
    except Exception as exc:
        raise UserError(_load_failure("model", path, exc)) from None
    if not spec.load_in_4bit:
        model.to(device)
    elif device.type == "cpu":
        _keep_4bit_trainable_on_cpu(model)
    return model


def _keep_4bit_trainable_on_cpu(model) -> None:
    """bitsandbytes repacks a 4-bit layer for fast CPU inference the first time it runs in
    eval mode (our rollouts do), and the repacked kernel has no backward: later training
    passes would then backpropagate through it silently wrong. Keep the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_start(path: str, spec: ModelSpec, device: torch.device, dtype: torch.dtype, progress=None):
    """The weights a run's LoRA (or full fine-tune) trains on: the base, with model.adapter merged into it
    under adapter_mode merge. What training, eval and export of such a run load."""
    model = load_base(path, spec, device, dtype)
    if spec.adapter is None or spec.adapter_mode != "merge":
        return model
    adapter = adapters.find(spec.adapter)
    adapters.check_base(adapter, spec.name)
    if progress:
        progress(f"merging {adapter.what} into the base weights (model.adapter_mode merge)")
    return adapters.attach(model, adapter, trainable=False).merge_and_unload(safe_merge=True)


def _lora_differences(lora, adapter: adapters.Adapter) -> list[str]:
    """The model.lora values the recipe sets that differ from the adapter's own, for the warning."""
    theirs = {"r": adapter.config.get("r"), "alpha": adapter.config.get("lora_alpha"),
              "dropout": adapter.config.get("lora_dropout"), "use_rslora": adapter.config.get("use_rslora"),
              "use_dora": adapter.config.get("use_dora")}
    differ = [f"{key} {getattr(lora, key)} (the adapter's: {value})" for key, value in theirs.items()
              if key in lora.model_fields_set and value is not None and getattr(lora, key) != value]
    targets = adapter.config.get("target_modules")
    if "target_modules" in lora.model_fields_set and isinstance(lora.target_modules, list) and \
            isinstance(targets, (list, set, tuple)) and set(lora.target_modules) != set(targets):
        differ.append(f"target_modules {lora.target_modules} (the adapter's: {sorted(targets)})")
    return differ


def load_policy(spec: ModelSpec, kl_beta: float, progress=None, device: torch.device | None = None) -> Policy:
    """The policy as the recipe describes it, on `device` (default: model.device's choice)."""
    device = device or pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    path = resolve(spec.name, progress)
    tokenizer = load_tokenizer(path)
    continued = None  # the adapter adapter_mode continue trains
    if spec.adapter is not None and spec.adapter_mode == "continue":
        continued = adapters.find(spec.adapter)
        adapters.check_base(continued, spec.name)
    model = load_start(path, spec, device, dtype, progress)
    model.config.use_cache = False  # training forwards; generation turns the cache on itself
    if spec.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    frozen_reference = None
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if spec.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
        if spec.gradient_checkpointing:
            model.enable_input_require_grads()
        if continued is not None:
            if progress:
                progress(f"starting from {continued.what}, trained on as it is (model.adapter_mode continue); "
                         "the KL is measured to it as loaded")
            differences = _lora_differences(spec.lora, continued)
            if progress and differences:
                progress(f"warning: model.lora sets {'; '.join(differences)}: adapter_mode continue trains "
                         f"{continued.what} as it is, with its own settings, so these are not used. Remove them, or "
                         "use adapter_mode: merge to train a fresh LoRA with them on top of the adapter.")
            model = adapters.attach(model, continued, trainable=True)
        else:
            config = LoraConfig(
                r=spec.lora.r,
                lora_alpha=spec.lora.alpha,
                lora_dropout=spec.lora.dropout,
                target_modules=spec.lora.target_modules,
                use_rslora=spec.lora.use_rslora,
                use_dora=spec.lora.use_dora,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, config)
    elif kl_beta > 0:
        frozen_reference = copy.deepcopy(model).eval().requires_grad_(False)
    # continue: the reference is the adapter as loaded (restore_weights, on resume, changes only the trained one)
    starting_adapter = frozen_adapter_copies(lora_layers(model)) if continued is not None and kl_beta > 0 else None
    return Policy(model=model, tokenizer=tokenizer, device=device, dtype=dtype, path=path,
                  frozen_reference=frozen_reference, starting_adapter=starting_adapter)


@dataclass(kw_only=True)
class Inference:
    """A model ready to generate, and the recipe it was trained with when there is one."""

    model: torch.nn.Module
    tokenizer: object
    recipe: object | None  # Recipe of the run a checkpoint came from
    source: str  # what was loaded, for reports


def load_for_inference(ref: str, device: str = "auto", dtype: str | None = None, progress=None,
                       best: bool = False) -> Inference:
    """A model in eval mode from a run directory (its latest checkpoint, or with `best` its best), a
    checkpoint, a PEFT adapter directory (or a Trainer's checkpoint holding one), a model directory, a hub
    id or a builtin name."""
    target = pick_device(device)
    path = Path(ref).expanduser()
    if best:
        found = locating.locate_best(path)
    else:
        found = locating.locate(path) if path.is_dir() else None
    if found is not None:
        recipe_path = found / layout.RECIPE_FILE
        recipe = load_recipe(recipe_path if recipe_path.exists() else found.parent.parent / "recipe.yaml")
        spec = recipe.model.model_copy(update={"dtype": dtype or recipe.model.dtype})
        if spec.lora is not None:
            model = _with_adapter(spec.name, found, spec, target, progress)
        else:
            model = load_base(str(found), spec, target, pick_dtype(spec.dtype, target))
        source = f"{found} (step {layout.read_state(found)['step']})"
        return Inference(model=model.eval(), tokenizer=load_tokenizer(str(found)), recipe=recipe, source=source)
    spec = ModelSpec(name=ref, dtype=dtype or "auto", lora=None)
    # a grpo export carries its training recipe: prompt it the way it was trained
    exported_recipe = path / "grpo_recipe.yaml"
    recipe = load_recipe(exported_recipe) if exported_recipe.exists() else None
    adapter = adapters.foreign(path) if path.is_dir() else None  # a PEFT adapter, a Trainer (TRL) checkpoint
    if adapter is not None:
        base = load_base(resolve(adapter.base, progress), spec, target, pick_dtype(spec.dtype, target))
        model = adapters.attach(base, adapter, trainable=False)
        tokenizer_from = str(path) if (path / "tokenizer_config.json").exists() else resolve(adapter.base, progress)
        return Inference(model=model.eval(), tokenizer=load_tokenizer(tokenizer_from), recipe=recipe,
                         source=str(path) + (f" (step {adapter.step})" if adapter.step is not None else ""))
    resolved = resolve(ref, progress)
    model = load_base(resolved, spec, target, pick_dtype(spec.dtype, target))
    return Inference(model=model.eval(), tokenizer=load_tokenizer(resolved), recipe=recipe, source=ref)


def _with_adapter(base_name: str, adapter_dir: Path, spec: ModelSpec, device: torch.device, progress):
    base = load_start(resolve(base_name, progress), spec, device, pick_dtype(spec.dtype, device), progress)
    return adapters.attach(base, adapters.of_checkpoint(adapter_dir), trainable=False)
