"""Checkpoints: everything a run needs to continue exactly where it stopped.

`checkpoints/step-N/` holds the weights in the standard layout (a PEFT adapter,
or a full transformers model), the tokenizer, the optimizer and scheduler state,
every RNG state, the data position, and the run's recipe, so a checkpoint copied
on its own still says how to load and prompt the model.

Crash safety: a checkpoint is written into a temporary directory, flushed to disk,
and renamed into place only when complete. Its last file is `manifest.json`, the
size of every other file; a checkpoint whose manifest is missing or does not match
(a torn copy, a disk that filled up) is never loaded. Old checkpoints are pruned
(`output.keep_last`) only after the new one is in place, and never one newer than
the new one (a damaged checkpoint that resume skipped is replaced when the run saves
that step again, not kept in the new one's stead). A save that fails (a full disk)
removes its partial directory and leaves the previous checkpoint as it was.

The best checkpoint (`output.keep_best`): `checkpoints/best.json` names the checkpoint with the
highest held-out accuracy (written whole, after that checkpoint); pruning never removes it.

Integrity: just before the manifest, `SHA256SUMS` records the SHA-256 of every other
file, in the format of coreutils' `sha256sum` (so `sha256sum -c SHA256SUMS` checks a
copy by hand); the manifest lists it with its size like any other file. Keeping the
digests out of manifest.json keeps its format, `{file: size}`: an older grpo still
reads these checkpoints (a manifest it could not read would make it take every
checkpoint for a torn one, and --resume start the run over). Two checks:

- `is_complete` (sizes only, no file read) decides what counts as a checkpoint when
  listing them: `latest`, `complete_checkpoints`, and pruning at every save, which
  would otherwise hash every kept checkpoint at every save.
- `verify` (every checksum, and every safetensors header) runs before anything is
  loaded: `locate` (grpo eval, grpo export: all but the optimizer, scheduler and RNG
  states, which they never read), `latest_intact` (resume: every file; skips damaged
  checkpoints to the newest intact one, with a warning naming each), and again in
  `restore_weights` / `restore_training` (free when the same process verified the
  same unchanged files just before; otherwise a damaged checkpoint is refused there).
  A mismatch is a `DamagedCheckpoint` (a UserError) naming the files.

A checkpoint written before checksums (its manifest lists no SHA256SUMS) is loaded
as before: sizes checked, plus the safetensors headers; a same-size change in it
cannot be detected.

Why SHA-256, measured (Python 3.11, OpenSSL 3.0, 2 shared cores of an AMD EPYC with
SHA-NI, a 1 GiB file in the page cache, best of 3): sha256 1.38 GiB/s, sha1 1.50,
blake2b 0.78, md5 0.51, sha512 0.49, blake2s 0.45, sha3_256 0.28; zlib.crc32 1.96
(no cryptographic strength, 32 bits); reading alone 7 GiB/s. With the cores busy
(load 10) sha256 0.57, blake2b 0.33, crc32 1.46. SHA-256 is the fastest sound hash
here but for sha1 (10% faster, broken), and `sha256sum` is on every system. (On CPUs
without SHA-NI, such as Intel before Ice Lake, sha256 is known to run at about half
blake2b's speed; not measured here.) So a 1 GiB file costs ~0.75 s at save (read back
from the page cache) and again at load; files are hashed in parallel threads
(hashlib releases the GIL), which helps when cores are free. The builtin model's LoRA
checkpoint (1.0 MB, 13 files) verifies in 1.8 ms; writing its manifest takes ~55 ms
either way (the fsyncs), the hashing ~1.5 ms of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grpo_cli.errors import UserError, os_error

STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
MANIFEST = "manifest.json"  # written last: {file: size} for everything else in the checkpoint
CHECKSUMS = "SHA256SUMS"  # written just before it: `<sha256>  <file>` lines for every other file
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng.pt")  # read by resume only
BEST_FILE = "best.json"  # in checkpoints/: which checkpoint scored the highest held-out accuracy (keep_best)
_CHUNK = 1 << 20  # bytes read per hash update


class DamagedCheckpoint(UserError):
    """A complete checkpoint (its sizes match) whose contents changed after it was saved."""

    def __init__(self, path: Path, problems: dict[str, str], earlier: Path | None = None):
        self.path, self.problems = path, problems
        checked = (path / CHECKSUMS).exists()
        super().__init__(
            f"the checkpoint {path} is damaged: {self.what()}, so it is not loaded (it changed after it was "
            "saved: a disk, copy or transfer error, or an edit). "
            + (f"Use an earlier checkpoint, such as {earlier}, " if earlier else "Use an earlier checkpoint ")
            + "or restore this one from a good copy"
            + (f"; `sha256sum -c {CHECKSUMS}` in its directory checks every file." if checked else ".")
        )

    def what(self) -> str:
        return "; ".join(f"{name} {why}" for name, why in self.problems.items())


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _sha256s(directory: Path, names: list[str]) -> dict[str, str]:
    """{name: hex SHA-256}, the files hashed in parallel (hashlib releases the GIL)."""
    if not names:
        return {}
    with ThreadPoolExecutor(min(len(names), os.cpu_count() or 1, 8)) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(directory / name), names)))


def _write_manifest(directory: Path) -> None:
    names = [str(f.relative_to(directory)) for f in sorted(directory.rglob("*")) if f.is_file()]
    for name in names:
        _fsync(directory / name)
    digests = _sha256s(directory, names)
    (directory / CHECKSUMS).write_text("".join(f"{digests[name]}  {name}\n" for name in names))
    _fsync(directory / CHECKSUMS)
    files = {name: (directory / name).stat().st_size for name in [*names, CHECKSUMS]}
    (directory / MANIFEST).write_text(json.dumps(files, indent=1))
    _fsync(directory / MANIFEST)
    _fsync(directory)


def _manifest(path: Path) -> dict[str, int] | None:
    """The manifest's {file: size} when every file is there at its size; else None."""
    try:
        files = json.loads((path / MANIFEST).read_text())
        if isinstance(files, dict) and STATE_FILE in files and \
                all((path / n).stat().st_size == size for n, size in files.items()):
            return files
    except (OSError, ValueError, TypeError):
        pass
    return None


def _incomplete(path: Path) -> str:
    """What is missing from an incomplete checkpoint, for messages."""
    try:
        files = json.loads((path / MANIFEST).read_text())
    except OSError:
        return f"no {MANIFEST}"
    except ValueError:
        return f"{MANIFEST} cannot be read"
    if not isinstance(files, dict) or STATE_FILE not in files:
        return f"{MANIFEST} does not list {STATE_FILE}"
    wrong = []
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            wrong.append(f"{name} is missing")
            continue
        if actual != size:
            wrong.append(f"{name} has {actual} bytes, not the {size} of its manifest")
    return "; ".join(wrong[:5]) or "its manifest does not match its files"


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint whose manifest lists files that are all there, at their sizes.

    Reads no file but the manifest: the cheap check for listing checkpoints. `verify` checks contents."""
    return _manifest(path) is not None


def _read_checksums(path: Path) -> dict[str, str]:
    """SHA256SUMS as {file: hex digest}; a line it cannot parse is an error."""
    sums = {}
    for line in (path / CHECKSUMS).read_text().splitlines():
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in " *" else ""  # `sha256sum` writes "<hex>  <name>" ("<hex> *<name>" binary)
        if not sep or not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"unreadable line {line[:80]!r}")
        sums[name] = digest
    return sums


def _safetensors_problem(file: Path) -> str | None:
    """Why the safetensors file cannot be read (its header, offsets and length checked), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt"):
            return None
    except Exception as exc:  # SafetensorError (header, offsets, length), OSError
        return f"is not a readable safetensors file ({exc})"


def _signature(path: Path, files) -> tuple:
    """What changes when any of the checkpoint's files is replaced or written to."""
    stats = [(name, (path / name).stat()) for name in [MANIFEST, *files]]
    return tuple((name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev) for name, s in stats)


_verified: dict[Path, tuple] = {}  # checkpoint -> _signature when this process last verified it


def _earlier(path: Path) -> Path | None:
    """The newest complete checkpoint of the run before `path` (not verified), for messages."""
    step = _step(path)
    older = [p for p in complete_checkpoints(path.parent.parent) if _step(p) < step] if step is not None else []
    return older[-1] if older else None


def verify(path: Path, reuse: bool = False, training_state: bool = True) -> None:
    """Check the checkpoint before loading it: complete, every file at its recorded SHA-256 (when
    SHA256SUMS was written), every safetensors header readable. Raises a UserError (a
    `DamagedCheckpoint` naming the files for changed contents).

    reuse: skip the work when this process verified the same files (same sizes, times, inodes).
    training_state: False to leave out what only resume reads (TRAINING_STATE): grpo eval and
    export, for which the optimizer state would be most of the hashing in a full fine-tune."""
    files = _manifest(path)
    if files is None:
        raise UserError(f"{path} is an incomplete checkpoint ({_incomplete(path)}: a torn copy, or a save that "
                        "did not finish); use an earlier one.")
    signature = _signature(path, files)
    key = path.resolve()
    if reuse and _verified.get(key) == signature:
        return
    # a manifest names only the checkpoint's own files: one elsewhere would be loaded (and checksummed) in their place
    problems = {name: outside for name in files if (outside := _outside(path, name))}
    if CHECKSUMS in files:
        try:
            expected = _read_checksums(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise DamagedCheckpoint(path, {CHECKSUMS: f"cannot be read ({exc})"}, _earlier(path)) from None
        names = [name for name in files if name != CHECKSUMS and name not in problems and
                 (training_state or name not in TRAINING_STATE)]
        actual = _sha256s(path, [name for name in names if name in expected])
        for name in names:
            if name not in expected:
                problems[name] = f"has no checksum in {CHECKSUMS}"
            elif actual[name] != expected[name]:
                problems[name] = "does not match the checksum (SHA-256) recorded when the checkpoint was saved"
    for name in files:
        if name.endswith(".safetensors") and name not in problems:
            problem = _safetensors_problem(path / name)
            if problem:
                problems[name] = problem
    if problems:
        _verified.pop(key, None)
        raise DamagedCheckpoint(path, problems, _earlier(path))
    if training_state:
        _verified[key] = signature


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
    except BaseException as exc:  # nothing half-written is left, whatever stopped the save
        shutil.rmtree(partial, ignore_errors=True)
        error = os_error(exc)
        if error is None:
            raise
        before = [p for p in complete_checkpoints(run_dir) if _step(p) < step]
        previous = before[-1] if before else None
        raise UserError(
            f"could not save the checkpoint for step {step} in {final.parent}: {error.strerror or error}. "
            + (f"The previous checkpoint, {previous.name}, is intact. " if previous else "")
            + "Free some space (or set output.dir elsewhere) and continue with --resume."
        ) from None
    prune(run_dir, step, keep_last)
    return final


def prune(run_dir: Path, step: int, keep_last: int | None) -> None:
    """Keep step-`step` and the keep_last - 1 complete checkpoints before it, and the best (never pruned).

    A newer one can only be a damaged checkpoint that resume skipped: left for a later save of its step
    to replace, never kept instead of this one."""
    if not keep_last:
        return
    marked = read_best(run_dir)
    best = marked["step"] if marked else None
    older = [p for p in complete_checkpoints(run_dir) if _step(p) < step and _step(p) != best]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def best_file(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / BEST_FILE


def read_best(run_dir: Path) -> dict | None:
    """The run's best-checkpoint marker, {"step", "checkpoint", "accuracy", "n"}, or None when there is none.

    A marker that cannot be read, or names anything but its step's checkpoint in this run's checkpoints/, is a
    UserError: read as none, pruning would delete the best checkpoint and --best would say there is none; a name
    leading elsewhere (an absolute path, .., a link) would load another run's weights as this run's best."""
    marker = best_file(run_dir)
    try:
        marked = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise _bad_marker(marker, f"cannot be read ({exc})") from None
    problem = _best_problem(run_dir, marked)
    if problem:
        raise _bad_marker(marker, problem)
    return marked


def _best_problem(run_dir: Path, marked) -> str | None:
    """What is wrong with a best.json's contents (as `mark_best` writes them), or None."""
    fields = {"step": int, "checkpoint": str, "accuracy": (int, float), "n": int}
    if not isinstance(marked, dict) or any(not isinstance(marked.get(key), kind) or isinstance(marked.get(key), bool)
                                           for key, kind in fields.items()):
        return 'is not a marker as grpo writes it ({"step": N, "checkpoint": "step-N", "accuracy": A, "n": M})'
    named, expected = marked["checkpoint"], checkpoint_dir(run_dir, marked["step"]).name
    if named != expected:
        return f"names the checkpoint {named!r}, not its step's {expected!r} in {run_dir / 'checkpoints'}"
    return _outside(run_dir / "checkpoints", named)


def _bad_marker(marker: Path, problem: str) -> UserError:
    return UserError(f"{marker} {problem}. grpo writes it whole, naming a checkpoint of this run, so something else "
                     "changed it. Delete it: a resumed run marks its best again at its next held-out evaluation; "
                     "meanwhile pass the checkpoint itself (checkpoints/step-N; eval/accuracy in metrics.jsonl says "
                     "which scored best) instead of --best.")


def _outside(directory: Path, name: str) -> str | None:
    """Why `name`, read from a file in `directory` as a path inside it, leads out of it (an absolute path, .., a
    link to elsewhere), or None: a run's files name only what the run holds, never another run's weights."""
    target = (directory / name).resolve()
    if target.is_relative_to(directory.resolve()):
        return None
    return f"leads outside {directory} (to {target})"


def mark_best(run_dir: Path, step: int, accuracy: float, n: int, keep_last: int | None) -> None:
    """Record step-`step` (saved already) as the run's best, then prune the previous best if keep_last
    no longer keeps it. Written whole (a temporary file renamed), so a reader never sees half of it."""
    marker = best_file(run_dir)
    partial = marker.with_name(f".{BEST_FILE}.partial")
    partial.write_text(json.dumps({"step": step, "checkpoint": checkpoint_dir(run_dir, step).name,
                                   "accuracy": accuracy, "n": n}, indent=1))
    _fsync(partial)
    os.replace(partial, marker)
    _fsync(marker.parent)
    prune(run_dir, step, keep_last)  # the same set the save of `step` kept, less the previous best


def forget_best(run_dir: Path) -> None:
    best_file(run_dir).unlink(missing_ok=True)


def _step(path: Path) -> int | None:
    suffix = path.name.removeprefix("step-")
    return int(suffix) if path.name.startswith("step-") and suffix.isdigit() else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Every complete checkpoint of the run (sizes checked, contents not), oldest first. A link among them to a
    checkpoint elsewhere is a UserError: resuming, evaluating or pruning it would use another run's files."""
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        step = _step(path)
        if step is not None and is_complete(path):
            outside = _outside(path.parent, path.name)
            if outside:
                raise UserError(f"{path} {outside}: a run's checkpoints are its own directories, not links to "
                                "others'. Move that checkpoint into the run, or remove the link.")
            found.append((step, path))
    return [path for _, path in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Contents not checked: see latest_intact."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from: the newest complete one whose contents verify, or None when
    the run has no complete checkpoint.

    Each newer damaged one is skipped with a warning (one paragraph, passed to `warn`) naming it and
    its damaged files; it is left in place (a later save of its step replaces it). When every complete
    checkpoint is damaged, a UserError: starting over would silently drop the run's progress."""
    damaged: list[DamagedCheckpoint] = []
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            verify(path)
        except DamagedCheckpoint as exc:
            damaged.append(exc)
            continue
        for exc in damaged:
            warn(f"warning: skipped the damaged checkpoint {exc.path}: {exc.what()}. Resuming from {path.name}, "
                 f"the newest intact checkpoint, instead; {exc.path.name} is left in place (a later save of that "
                 "step replaces it).")
        return path
    if damaged:
        raise UserError(
            f"every checkpoint in {run_dir / 'checkpoints'} is damaged, so there is nothing to resume from: "
            + "; ".join(f"{exc.path.name}: {exc.what()}" for exc in damaged)
            + ". Restore one from a good copy, or train into a new output.dir."
        )
    return None


def is_grpo_checkpoint(path: Path) -> bool:
    """Whether `path` is one of our checkpoints (complete or torn), by what only grpo writes into one:
    its manifest, or (a copy torn before the manifest arrived) its recipe beside its trainer state.

    trainer_state.json alone does not tell: a Hugging Face Trainer's checkpoint (TRL's) has one too,
    and is read as the adapter or model it holds (`modeling.load_for_inference`, `export`)."""
    return (path / MANIFEST).exists() or ((path / STATE_FILE).exists() and (path / RECIPE_FILE).exists())


def locate(path: Path) -> Path | None:
    """The checkpoint a user means by `path`: a checkpoint itself, or a run directory's latest,
    verified for grpo eval and export (all but TRAINING_STATE, which they do not read). A damaged one
    is refused, not replaced by an earlier one: the user asked for this one.

    None when `path` is neither (a merged model, a PEFT adapter, a Trainer checkpoint or anything
    else); an error for a run directory that holds no complete checkpoint yet.
    """
    if is_grpo_checkpoint(path):
        verify(path, training_state=False)
        return path
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists():
        found = latest(path)
        if found is None:
            raise UserError(f"{path} is a run directory without a complete checkpoint yet; "
                            "wait for the first save (output.save_every) or pass a model directory.")
        verify(found, training_state=False)
        return found
    return None


def locate_best(path: Path) -> Path:
    """The run directory's best checkpoint (--best), verified as `locate` does; a UserError that says
    why when the run has none."""
    if (path / STATE_FILE).exists() or (path / MANIFEST).exists():
        raise UserError(f"{path} is a checkpoint; --best takes the run directory it belongs to "
                        f"({path.parent.parent}), or drop --best to use this checkpoint.")
    if not ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists()):
        raise UserError(f"{path} is not a grpo run directory; --best takes one (the output.dir of a training run).")
    marked = read_best(path)
    if marked is None:
        raise UserError(
            f"{path} has no best checkpoint: it is marked when output.keep_best is true (the default) and a "
            "held-out evaluation (data.eval, every output.eval_every steps and at the end) ran after a training "
            f"step. Drop --best to use the latest checkpoint, or pass a checkpoint such as {path}/checkpoints/step-N.")
    found = path / "checkpoints" / marked["checkpoint"]
    if not is_complete(found):
        raise UserError(f"the best checkpoint of {path}, {marked['checkpoint']}, is missing or incomplete "
                        f"({_incomplete(found) if found.is_dir() else 'no such directory'}); drop --best to use "
                        "the latest checkpoint.")
    verify(found, training_state=False)
    return found


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


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
    from grpo_cli.errors import listed

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
