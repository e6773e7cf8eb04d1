"""Checkpoints: everything a run needs to continue exactly where it stopped.

`checkpoints/step-N/` holds the weights in the standard layout (a PEFT adapter,
or a full transformers model), the tokenizer, the optimizer and scheduler state,
every RNG state, the data position, and the run's recipe, so a checkpoint copied
on its own still says how to load and prompt the model.

Crash safety: a checkpoint is written into a temporary directory, flushed to disk,
and renamed into place only when complete. Its last file is `manifest.json`, the
size of every other file; a checkpoint whose manifest is missing or does not match
(a torn copy, a disk that filled up) is never loaded. Old checkpoints are pruned
(`output.keep_last`) only after the new one is in place. A save that fails (a full
disk) removes its partial directory and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from grpo_cli.errors import UserError

STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
MANIFEST = "manifest.json"  # written last: {file: size} for everything else in the checkpoint


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(directory: Path) -> None:
    files = {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}
    for name in files:
        _fsync(directory / name)
    (directory / MANIFEST).write_text(json.dumps(files, indent=1))
    _fsync(directory / MANIFEST)
    _fsync(directory)


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint whose manifest lists files that are all there, at their sizes."""
    try:
        files = json.loads((path / MANIFEST).read_text())
        return STATE_FILE in files and all((path / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError):
        return False


def save(run_dir: Path, step: int, policy, optimizer_state: dict, scheduler, trainer_state: dict, recipe_yaml: str,
         rng: dict | None = None, keep_last: int | None = None, model_state: dict | None = None) -> Path:
    """Write checkpoint step-`step`.

    optimizer_state: keyed by parameter name (distributed.Parallel.optimizer_state), so it loads
    under any strategy and world size; model_state: the full weights when they are sharded (else
    the policy's own are saved); rng: the RNG state to record, default the current one.
    """
    final = checkpoint_dir(run_dir, step)
    partial = final.with_name(f".{final.name}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
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
        _write_manifest(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync(final.parent)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        previous = latest(run_dir)
        raise UserError(
            f"could not save the checkpoint for step {step} in {final.parent}: {exc.strerror or exc}. "
            + (f"The previous checkpoint, {previous.name}, is intact. " if previous else "")
            + "Free some space (or set output.dir elsewhere) and continue with --resume."
        ) from None
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Every complete checkpoint of the run, oldest first."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and is_complete(path):
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def locate(path: Path) -> Path | None:
    """The checkpoint a user means by `path`: a checkpoint itself, or a run directory's latest.

    None when `path` is neither (a merged model or anything else); an error for a run
    directory that holds no complete checkpoint yet.
    """
    if (path / STATE_FILE).exists() or (path / MANIFEST).exists():
        if not is_complete(path):
            raise UserError(f"{path} is an incomplete checkpoint (its manifest does not match its files); "
                            "use an earlier one.")
        return path
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists():
        found = latest(path)
        if found is None:
            raise UserError(f"{path} is a run directory without a complete checkpoint yet; "
                            "wait for the first save (output.save_every) or pass a model directory.")
        return found
    return None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _load_full_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a full-model checkpoint (one or several safetensors shards) in place."""
    from safetensors.torch import load_file

    loaded: set[str] = set()
    for shard in sorted(path.glob("model*.safetensors")):
        state = load_file(str(shard))
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


def restore_weights(path: Path, policy) -> None:
    """Load the checkpoint's weights into the (not yet sharded) policy."""
    if policy.is_lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(policy.model, load_file(str(path / "adapter_model.safetensors")))
    else:
        _load_full_weights(policy.model, path)


def restore_training(path: Path, parallel, optimizer, scheduler) -> dict:
    """Load optimizer, scheduler and RNG states from `path`; returns its trainer state."""
    parallel.load_optimizer_state(optimizer, torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return read_state(path)
