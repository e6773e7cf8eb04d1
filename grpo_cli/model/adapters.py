"""LoRA adapters made elsewhere, or by an earlier grpo run: where one is, which base it is for, and
loading it onto that base.

An adapter is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), found as:
- a plain PEFT directory, or a `grpo export --format adapter`;
- a Hugging Face Trainer checkpoint (TRL's `checkpoint-N/`: the adapter beside trainer_state.json,
  training_args.bin, optimizer.pt, ...): read as the adapter it holds, its training state ignored;
- a grpo checkpoint or run directory (its latest checkpoint) of a LoRA run, verified first;
- a hub id of an adapter repository.

Its base is adapter_config.json's `base_model_name_or_path`. Names of one base differ between tools
(a hub id, a local copy of it, the builtin model's built path), so two names are the same base when
they are equal once local paths are resolved; anything else is refused (`check_base`), with what
to change. When the adapter is loaded (`attach`), a file that cannot be read, weights of the wrong shape, and
tensors that are not the model's LoRA weights one for one are refused, each with its own message.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from grpo_cli.checkpoint import layout, locating, store
from grpo_cli.errors import UserError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT reads, in its order
TRAINER_STATE = "trainer_state.json"  # a Hugging Face Trainer's, when the directory is not a grpo checkpoint


@dataclass(frozen=True, kw_only=True)
class Adapter:
    location: str  # a local directory or a hub id: what PeftModel.from_pretrained loads
    base: str  # adapter_config.json's base_model_name_or_path
    config: dict  # adapter_config.json
    what: str  # for messages: "the PEFT adapter X", "the Trainer checkpoint X (step 40)", ...
    step: int | None  # a Trainer's global_step or a grpo checkpoint's step; None for a plain adapter

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()


def _read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory / CONFIG} cannot be read ({exc}); restore it from the adapter's source.") from None
    if not isinstance(config, dict) or not config.get("base_model_name_or_path"):
        raise UserError(f"{directory / CONFIG} does not name its base model (base_model_name_or_path); "
                        "add it, the model the adapter was trained on.")
    return config


def _trainer_step(directory: Path) -> int | None:
    try:
        step = json.loads((directory / TRAINER_STATE).read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def foreign(directory: Path) -> Adapter | None:
    """The adapter in a directory grpo did not write (a PEFT directory, a Trainer checkpoint), else None."""
    if not (directory / CONFIG).is_file() or locating.is_grpo_checkpoint(directory):
        return None
    config = _read_config(directory)
    step = _trainer_step(directory)
    what = (f"the Trainer checkpoint {directory}" + (f" (step {step})" if step is not None else "")
            if (directory / TRAINER_STATE).exists() else f"the PEFT adapter {directory}")
    return Adapter(location=str(directory), base=config["base_model_name_or_path"], config=config, what=what,
                   step=step)


def of_checkpoint(found: Path) -> Adapter:
    """The adapter a grpo checkpoint of a LoRA run holds (`found` verified by the caller)."""
    step = layout.read_state(found).get("step")
    config = _read_config(found)
    return Adapter(location=str(found), base=config["base_model_name_or_path"], config=config,
                   what=f"the grpo checkpoint {found} (step {step})", step=step)


def find(ref: str) -> Adapter:
    """The adapter `ref` names (model.adapter): a directory of any kind above, or a hub id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        found = locating.locate(path)  # a grpo checkpoint or run: verified; None for anything else
        if found is not None:
            if not (found / CONFIG).is_file():
                raise UserError(f"{ref} is a grpo checkpoint of a full fine-tune, not an adapter; model.adapter "
                                "takes a LoRA adapter. Set model.name to an export of it (grpo export) instead.")
            return of_checkpoint(found)
        adapter = foreign(path)
        if adapter is None:
            raise UserError(f"{ref} holds no LoRA adapter (no {CONFIG} in it); model.adapter takes a PEFT adapter "
                            "directory, a Trainer or grpo checkpoint of a LoRA run, or a hub id of an adapter. A full "
                            "model goes in model.name.")
        return adapter
    if ref.startswith((".", "/", "~")):
        raise UserError(f"model.adapter: the directory {ref} was not found.")
    from grpo_cli.model import hub

    if not hub.in_cache(ref, CONFIG):
        why = hub.unreachable()
        if why is not None:
            raise hub.not_available(ref, why)
    try:
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(ref).to_dict()
    except Exception as exc:
        raise UserError(f"model.adapter {ref!r} is not a local directory, and not a hub adapter that can be read "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from None
    if not config.get("base_model_name_or_path"):
        raise UserError(f"the hub adapter {ref} does not name its base model (base_model_name_or_path).")
    return Adapter(location=ref, base=config["base_model_name_or_path"], config=config,
                   what=f"the hub adapter {ref}", step=None)


def _canonical(name: str) -> str:
    """A model name with local paths resolved (the builtin model to its built directory)."""
    if name.startswith("builtin:"):
        from grpo_cli.model import builtin as builtin_model

        try:
            return str(builtin_model.ensure(name.removeprefix("builtin:")).resolve())
        except KeyError:
            return name
    from grpo_cli.model import gguf as gguf_model

    converted = gguf_model.identity(name)  # a GGUF file, or the directory converted from one: its content's hash
    if converted is not None:
        return converted
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def same_base(a: str, b: str) -> bool:
    return a == b or _canonical(a) == _canonical(b)


def check_base(adapter: Adapter, model_name: str) -> None:
    """Refuse an adapter trained on another base than model.name."""
    if not same_base(adapter.base, model_name):
        raise UserError(
            f"model.adapter is {adapter.what}, trained on {adapter.base!r} (its {CONFIG}'s base_model_name_or_path), "
            f"but model.name is {model_name!r}. Set model.name: {adapter.base}; if {model_name!r} is a copy of that "
            f"model, set base_model_name_or_path in {CONFIG} to it.")


def attach(base_model, adapter: Adapter, trainable: bool):
    """`base_model` with the adapter loaded (PeftModel). Each of these is a UserError saying which it is: a config
    or weights file that cannot be read, weights of the wrong shape, and tensors that are not the model's LoRA
    weights one for one (`checkpoint.store.check_adapter_loaded`)."""
    from peft import PeftModel, set_peft_model_state_dict

    config = _peft_config(adapter)
    weights = _read_weights(adapter)
    try:
        with warnings.catch_warnings():  # of LoRA weights the file lacks: check_adapter_loaded says so, and refuses
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(base_model, adapter.location, is_trainable=trainable, config=config)
    except Exception as exc:  # size mismatch (RuntimeError), target modules not found (ValueError)
        raise UserError(f"{adapter.what} does not fit the base model {adapter.base!r}: {_first_line(exc)}. An "
                        "adapter loads only onto the model it was trained on (same architecture and sizes).") from None
    # from_pretrained does not say which tensors it loaded: it warns of LoRA weights the file lacks, and is silent
    # about tensors whose names match no weight. Loading the same weights again gives PEFT's own account of both.
    store.check_adapter_loaded(model, set_peft_model_state_dict(model, weights), len(weights), adapter.what)
    return model


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _peft_config(adapter: Adapter):
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(adapter.location)
    except Exception as exc:  # a JSON error, an unknown peft_type, a value LoraConfig refuses
        where = Path(adapter.location) / CONFIG if adapter.is_local else f"{CONFIG} of {adapter.location}"
        raise UserError(f"{where} cannot be read as a PEFT adapter config ({_first_line(exc)}): the file is damaged "
                        "or was not written by PEFT. Restore it from the adapter's source.") from None


def _read_weights(adapter: Adapter) -> dict:
    """The adapter's tensors, read as PEFT reads them; a file that cannot be read is a UserError saying so (not
    that the adapter does not fit: nothing was tried on the model yet)."""
    from peft.utils import load_peft_weights

    try:
        return load_peft_weights(adapter.location, device="cpu")
    except Exception as exc:  # SafetensorError (a truncated or garbled file), an unpickling error, no file at all
        files = [Path(adapter.location) / name for name in WEIGHTS] if adapter.is_local else []
        where = next((str(f) for f in files if f.exists()), adapter.location)
        raise UserError(f"the weights of {adapter.what} cannot be read: {where}: {_first_line(exc)}. The file is "
                        "corrupt or incomplete (a copy or download cut short); copy or download it again from the "
                        "adapter's source.") from None

