"""LoRA adapters made elsewhere, or by an earlier grpo run: where one is, which base it is for, and
loading it onto that base.

An adapter is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), found as:
- a plain PEFT directory, or a `grpo export --adapter-only`;
- a Hugging Face Trainer checkpoint (TRL's `checkpoint-N/`: the adapter beside trainer_state.json,
  training_args.bin, optimizer.pt, ...): read as the adapter it holds, its training state ignored;
- a grpo checkpoint or run directory (its latest checkpoint) of a LoRA run, verified first;
- a hub id of an adapter repository.

Its base is adapter_config.json's `base_model_name_or_path`. Names of one base differ between tools
(a hub id, a local copy of it, the builtin model's built path), so two names are the same base when
they are equal once local paths are resolved; anything else is refused (`check_base`), with what
to change. Weights of the wrong shape are refused when the adapter is loaded (`attach`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from grpo_cli import checkpoint
from grpo_cli.errors import UserError

CONFIG = "adapter_config.json"
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
    if not (directory / CONFIG).is_file() or checkpoint.is_grpo_checkpoint(directory):
        return None
    config = _read_config(directory)
    step = _trainer_step(directory)
    what = (f"the Trainer checkpoint {directory}" + (f" (step {step})" if step is not None else "")
            if (directory / TRAINER_STATE).exists() else f"the PEFT adapter {directory}")
    return Adapter(location=str(directory), base=config["base_model_name_or_path"], config=config, what=what,
                   step=step)


def find(ref: str) -> Adapter:
    """The adapter `ref` names (model.adapter): a directory of any kind above, or a hub id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        found = checkpoint.locate(path)  # a grpo checkpoint or run: verified; None for anything else
        if found is not None:
            if not (found / CONFIG).is_file():
                raise UserError(f"{ref} is a grpo checkpoint of a full fine-tune, not an adapter; model.adapter "
                                "takes a LoRA adapter. Set model.name to an export of it (grpo export) instead.")
            step = checkpoint.read_state(found).get("step")
            config = _read_config(found)
            return Adapter(location=str(found), base=config["base_model_name_or_path"], config=config,
                           what=f"the grpo checkpoint {found} (step {step})", step=step)
        adapter = foreign(path)
        if adapter is None:
            raise UserError(f"{ref} holds no LoRA adapter (no {CONFIG} in it); model.adapter takes a PEFT adapter "
                            "directory, a Trainer or grpo checkpoint of a LoRA run, or a hub id of an adapter. A full "
                            "model goes in model.name.")
        return adapter
    if ref.startswith((".", "/", "~")):
        raise UserError(f"model.adapter: the directory {ref} was not found.")
    from grpo_cli import hub

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
        from grpo_cli import builtin_model

        try:
            return str(builtin_model.ensure(name.removeprefix("builtin:")).resolve())
        except KeyError:
            return name
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
    """`base_model` with the adapter loaded (PeftModel); an adapter whose weights do not fit is a UserError."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base_model, adapter.location, is_trainable=trainable)
    except Exception as exc:  # size mismatch (RuntimeError), target modules not found (ValueError), a bad file...
        first = str(exc).strip().splitlines()
        raise UserError(f"{adapter.what} does not fit the base model {adapter.base!r}: {type(exc).__name__}: "
                        f"{first[0][:300] if first else ''}. An adapter loads only onto the model it was trained on "
                        "(same architecture and sizes).") from None
