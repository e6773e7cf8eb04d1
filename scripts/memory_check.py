"""grpo validate's memory estimate against the peak resident set a few training steps really reach (CPU).

For each configuration: the estimate, as `grpo validate` prints it (the data read, so the longest prompt is
known), and the peak resident set of `grpo train` over a few steps in a child process (its ru_maxrss: the
interpreter and libraries included, as the estimate's 'runtime' line is). Prints a Markdown table.

    python scripts/memory_check.py                      # the quickstart and the real-model recipe, variants
    python scripts/memory_check.py --steps 3 --only smollm2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Every group informative: a rule that tells all completions apart, weighted too little to change what is learnt.
# Without it, a model that gets every completion of a group wrong (most groups, early on) gives steps whose
# update skips those completions (kl_beta 0), and a few steps would not reach the peak a longer run does.
ALL_INFORMATIVE = "rewards=[{rule: correctness}, {rule: length, weight: 0.001}]"
CONFIGS = {  # name -> (recipe, --set overrides)
    "quickstart": ("recipes/quickstart.yaml", []),
    "quickstart G=32, 80 tokens": ("recipes/quickstart.yaml", ["grpo.group_size=32", "grpo.max_new_tokens=80"]),
    "quickstart-tools": ("recipes/quickstart-tools.yaml", []),
    "smollm2": ("recipes/smollm2-arithmetic.yaml", [ALL_INFORMATIVE]),
    "smollm2 G=16, 128 tokens": ("recipes/smollm2-arithmetic.yaml", [ALL_INFORMATIVE, "grpo.group_size=16",
                                                                     "grpo.max_new_tokens=128"]),
    "smollm2 full fine-tune, KL": ("recipes/smollm2-arithmetic.yaml", ["model.lora=null", "grpo.kl_beta=0.04",
                                                                       "train.lr=1e-5"]),
}


def estimated(recipe_path: str, sets: list[str]) -> float:
    """GiB, as grpo validate computes it."""
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.data.check import check_data
    from grpo_cli.commands.estimate import count_parameters, estimate, model_config
    from grpo_cli.data.prompt_room import with_max_new_tokens

    loaded = recipe_module.load(ROOT / recipe_path, overrides=sets)
    config = model_config(loaded)
    checked = check_data(loaded, config, (ROOT / recipe_path).parent)
    loaded = with_max_new_tokens(loaded, checked.max_new_tokens)
    total, trainable = count_parameters(loaded, config)
    return estimate(loaded, config, total, trainable, on_gpu=False, prompt_tokens=checked.longest).total_gib


def measured(recipe_path: str, sets: list[str], steps: int) -> tuple[float, float]:
    """(peak resident GiB, seconds) of `grpo train` for `steps` steps, evaluation at the start included."""
    with tempfile.TemporaryDirectory() as run:
        command = [sys.executable, "-m", "grpo_cli", "train", str(ROOT / recipe_path), "--quiet",
                   "--set", f"train.steps={steps}", "--set", f"output.dir={run}/run",
                   "--set", "data.eval_limit=32", *[part for s in sets for part in ("--set", s)]]
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{child.stderr.read()[-2000:]}")
        return usage.ru_maxrss / 2**20, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", help="configurations whose name contains this")
    args = parser.parse_args()
    print("| configuration | estimate (GiB) | measured peak RSS (GiB) | estimate / measured |")
    print("|---|---|---|---|")
    for name, (recipe_path, sets) in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        guess = estimated(recipe_path, sets)
        peak, seconds = measured(recipe_path, sets, args.steps)
        print(f"| {name} | {guess:.2f} | {peak:.2f} | {guess / peak:.2f} |", flush=True)
    print(f"\n{args.steps} steps each, held-out evaluation on 32 problems at the start; "
          f"{os.cpu_count()} CPUs, torch threads as grpo chooses them.")


if __name__ == "__main__":
    main()
