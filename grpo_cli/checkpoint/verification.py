"""Verifying a checkpoint before anything is loaded from it: complete, every file at the SHA-256 recorded when it
was saved, every safetensors header readable.

`verify` runs in `locate` (grpo eval, grpo export: all but the optimizer, scheduler and RNG states, which they
never read), in `latest_intact` (resume: every file; damaged checkpoints are skipped to the newest intact one,
with a warning naming each), and again in `restore_weights` / `restore_training` (free when the same process
verified the same unchanged files just before; otherwise a damaged checkpoint is refused there). A mismatch is a
`DamagedCheckpoint` (a UserError) naming the files.

A checkpoint written before checksums (its manifest lists no SHA256SUMS) is loaded as before: sizes checked,
plus the safetensors headers; a same-size change in it cannot be detected.
"""

from __future__ import annotations

from pathlib import Path

from grpo_cli.checkpoint.layout import CHECKSUMS, MANIFEST, TRAINING_STATE, leads_outside, step_of
from grpo_cli.checkpoint.manifest import complete_checkpoints, read_checksums, read_manifest, sha256s, why_incomplete
from grpo_cli.errors import UserError


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
    step = step_of(path)
    older = [p for p in complete_checkpoints(path.parent.parent) if step_of(p) < step] if step is not None else []
    return older[-1] if older else None


def verify(path: Path, reuse: bool = False, training_state: bool = True) -> None:
    """Check the checkpoint before loading it: complete, every file at its recorded SHA-256 (when
    SHA256SUMS was written), every safetensors header readable. Raises a UserError (a
    `DamagedCheckpoint` naming the files for changed contents).

    reuse: skip the work when this process verified the same files (same sizes, times, inodes).
    training_state: False to leave out what only resume reads (TRAINING_STATE): grpo eval and
    export, for which the optimizer state would be most of the hashing in a full fine-tune."""
    files = read_manifest(path)
    if files is None:
        raise UserError(f"{path} is an incomplete checkpoint ({why_incomplete(path)}: a torn copy, or a save that "
                        "did not finish); use an earlier one.")
    signature = _signature(path, files)
    key = path.resolve()
    if reuse and _verified.get(key) == signature:
        return
    # a manifest names only the checkpoint's own files: one elsewhere would be loaded (and checksummed) in their place
    problems = {name: outside for name in files if (outside := leads_outside(path, name))}
    if CHECKSUMS in files:
        try:
            expected = read_checksums(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise DamagedCheckpoint(path, {CHECKSUMS: f"cannot be read ({exc})"}, _earlier(path)) from None
        names = [name for name in files if name != CHECKSUMS and name not in problems and
                 (training_state or name not in TRAINING_STATE)]
        actual = sha256s(path, [name for name in names if name in expected])
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
