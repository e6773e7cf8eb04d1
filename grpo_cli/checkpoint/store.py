"""Saving a run's state as checkpoint step-N, and restoring it: everything a run needs to continue exactly where
it stopped (what a checkpoint holds: layout.py).

Crash safety: a checkpoint is written with atomic.write_directory, into a hidden `.step-N.partial`, flushed to
the disk and renamed into place only when complete. Its last file is `manifest.json` (manifest.py); a checkpoint
whose manifest is missing or does not match (a torn copy, a disk that filled up) is never loaded. Old
checkpoints are pruned (retention.py) only after the new one is in place. A save that fails (a full disk)
removes its partial directory and leaves the previous checkpoint as it was.

Restoring verifies the checkpoint first (verification.py), free when this process has just verified the same
unchanged files.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from grpo_cli import atomic
from grpo_cli.checkpoint.layout import RECIPE_FILE, STATE_FILE, checkpoint_dir, read_state, step_of
from grpo_cli.checkpoint.manifest import complete_checkpoints, write_manifest
from grpo_cli.checkpoint.retention import prune
from grpo_cli.checkpoint.verification import DamagedCheckpoint, verify
from grpo_cli.errors import UserError, listed, os_error


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, policy, optimizer_state: dict, scheduler, trainer_state: dict, recipe_yaml: str,
         rng: dict | None = None, keep_last: int | None = None, model_state: dict | None = None) -> Path:
    """Write checkpoint step-`step`, then prune to `keep_last`.

    optimizer_state: keyed by parameter name (distributed.Parallel.optimizer_state), so it loads
    under any strategy and world size; model_state: the full weights when they are sharded (else
    the policy's own are saved); rng: the RNG state to record, default the current one.
    """
    final = checkpoint_dir(run_dir, step)
    try:
        with atomic.write_directory(final) as partial:  # nothing half-written is left, whatever stops the save
            if model_state is None:
                policy.model.save_pretrained(partial)
            else:
                policy.model.save_pretrained(partial, state_dict=model_state)
            policy.tokenizer.save_pretrained(partial)
            torch.save(optimizer_state, partial / "optimizer.pt")
            torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            torch.save(rng if rng is not None else rng_state(), partial / "rng.pt")
            (partial / RECIPE_FILE).write_text(recipe_yaml)
            state = {"step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **trainer_state}
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
            write_manifest(partial)  # the last files: the checkpoint is complete once they are written
    except BaseException as exc:
        error = os_error(exc)
        if error is None:
            raise
        before = [p for p in complete_checkpoints(run_dir) if step_of(p) < step]
        previous = before[-1] if before else None
        raise UserError(
            f"could not save the checkpoint for step {step} in {final.parent}: {error.strerror or error}. "
            + (f"The previous checkpoint, {previous.name}, is intact. " if previous else "")
            + "Free some space (or set output.dir elsewhere) and continue with --resume."
        ) from None
    prune(run_dir, step, keep_last)
    return final


def _load_safetensors(file: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError (header, offsets, length), OSError
        raise DamagedCheckpoint(file.parent, {file.name: f"is not a readable safetensors file ({exc})"}) from None


def _torch_load(file: Path, weights_only: bool):
    try:
        return torch.load(file, weights_only=weights_only)
    except Exception as exc:  # a damaged zip or pickle: RuntimeError, UnpicklingError, EOFError, ...
        raise DamagedCheckpoint(file.parent, {file.name: f"cannot be read ({type(exc).__name__}: {exc})"}) from None


def _load_full_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a full-model checkpoint (one or several safetensors shards) in place."""
    loaded: set[str] = set()
    for shard in sorted(path.glob("model*.safetensors")):
        state = _load_safetensors(shard)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"{shard} holds weights this model does not have: {result.unexpected_keys[:5]}")
        loaded.update(state)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[name].data_ptr() for name in loaded if name in params}
    # A tied weight (lm_head sharing the embedding) is saved once under one of its names.
    missing = [name for name, p in params.items() if name not in loaded and p.data_ptr() not in loaded_ptrs]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks weights: {missing[:5]}")


def check_adapter_loaded(model, result, tensors: int, what: str) -> None:
    """Refuse an adapter unless every one of its `tensors` went into the PeftModel `model` and every LoRA weight of
    the model came from it; `result` is PEFT's load result (set_peft_model_state_dict's). PEFT loads by name and
    passes over a name it does not know, so an adapter whose names match nothing would run as the bare base."""
    adapter_name = f".{model.active_adapter}."
    unmatched = list(result.unexpected_keys)
    # named as in the file: PEFT puts the adapter's name into a weight's name as it loads it
    unloaded = [key.replace(adapter_name, ".") for key in result.missing_keys if "lora_" in key and adapter_name in key]
    if not unmatched and not unloaded:
        return
    problems = ([f"{len(unmatched)} of its {tensors} tensors match no weight of the model ({listed(unmatched)})"]
                if unmatched else [])
    problems += [f"the model has {len(unloaded)} LoRA weights it holds no tensor for, which would keep their "
                 f"initial values ({listed(unloaded)})"] if unloaded else []
    raise UserError(f"{what} does not load whole: {'; '.join(problems)}. It would run as another model than the "
                    "one trained, so it is refused. Use the adapter trained on this base model; an adapter's tensors "
                    "are named as PEFT's save_pretrained writes them (base_model.model.<module>.lora_A.weight), so "
                    "one renamed or written by another tool must be converted to those names.")


def restore_weights(path: Path, policy) -> None:
    """Load the checkpoint's weights into the (not yet sharded) policy, after `verify`."""
    verify(path, reuse=True)
    if policy.is_lora:
        from peft import set_peft_model_state_dict

        weights = _load_safetensors(path / "adapter_model.safetensors")
        check_adapter_loaded(policy.model, set_peft_model_state_dict(policy.model, weights), len(weights),
                             f"the adapter of the checkpoint {path}")
    else:
        _load_full_weights(policy.model, path)


def restore_training(path: Path, parallel, optimizer, scheduler) -> dict:
    """Load optimizer, scheduler and RNG states from `path` (after `verify`); returns its trainer state."""
    verify(path, reuse=True)
    parallel.load_optimizer_state(optimizer, _torch_load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(_torch_load(path / "scheduler.pt", weights_only=True))
    set_rng_state(_torch_load(path / "rng.pt", weights_only=False))
    return read_state(path)
