"""What a checkpoint holds and where: the files grpo writes into `checkpoints/step-N/`, the step of a directory,
and names that must stay inside the run.

`checkpoints/step-N/` holds the weights in the standard layout (a PEFT adapter, or a full transformers model),
the tokenizer, the optimizer and scheduler state, every RNG state, the data position, and the run's recipe, so
a checkpoint copied on its own still says how to load and prompt the model.
"""

from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "trainer_state.json"  # the step, the data position and the figures resume continues from
RECIPE_FILE = "recipe.yaml"
MANIFEST = "manifest.json"  # written last: {file: size} for everything else in the checkpoint (manifest.py)
CHECKSUMS = "SHA256SUMS"  # written just before it: `<sha256>  <file>` lines for every other file
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng.pt")  # read by resume only


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def step_of(path: Path) -> int | None:
    """N for a directory named step-N, else None."""
    suffix = path.name.removeprefix("step-")
    return int(suffix) if path.name.startswith("step-") and suffix.isdigit() else None


def leads_outside(directory: Path, name: str) -> str | None:
    """Why `name`, read from a file in `directory` as a path inside it, leads out of it (an absolute path, .., a
    link to elsewhere), or None: a run's files name only what the run holds, never another run's weights."""
    target = (directory / name).resolve()
    if target.is_relative_to(directory.resolve()):
        return None
    return f"leads outside {directory} (to {target})"


def read_state(path: Path) -> dict:
    """The checkpoint's trainer_state.json: its step, data position and what resume continues from."""
    return json.loads((path / STATE_FILE).read_text())
