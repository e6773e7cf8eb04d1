"""How grpo's step time and peak memory grow as the group size, the completion length and the
model size double, from one base configuration. Prints one table with each figure's ratio to
the base row.

    python scripts/scaling.py                       # CPU: the random-weight `mini` shape
    python scripts/scaling.py --shape qwen2.5-0.5b --group-size 8 --max-new-tokens 256 \\
        --prompts 8 --prompt-tokens 83             # the GPU configuration of scripts/bench.py

Each row is one `scripts/bench.py --only ours` run (its own process, same seed). The
random-weight shapes almost never emit EOS, so every completion runs to max_new_tokens and
doubling the length doubles the generated tokens. "Model x2" is the shape's -x2 variant
(twice the layers) where one exists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOUBLED_MODEL = {"mini": "mini-x2", "qwen2.5-0.5b": "qwen2.5-1.5b"}


def measure(args, shape: str, group_size: int, max_new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, str(HERE / "bench.py"), "--only", "ours", "--shape", shape,
                   "--prompts", str(args.prompts), "--group-size", str(group_size),
                   "--max-new-tokens", str(max_new_tokens), "--prompt-tokens", str(args.prompt_tokens),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--rounds", "1", "--json", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())["summary"]["ours"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mini", choices=sorted(DOUBLED_MODEL))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    g, c = args.group_size, args.max_new_tokens
    rows = [("base", args.shape, g, c), ("G x2", args.shape, 2 * g, c), ("G x4", args.shape, 4 * g, c),
            ("length x2", args.shape, g, 2 * c), ("length x4", args.shape, g, 4 * c),
            ("model x2", DOUBLED_MODEL[args.shape], g, c)]
    results = []
    for label, shape, group_size, length in rows:
        figures = measure(args, shape, group_size, length)
        results.append((label, shape, group_size, length, figures))
        print(f"{label} done", file=sys.stderr, flush=True)

    base = results[0][4]
    cpu = base["memory_kind"] == "CPU resident"
    # On the CPU the resident set is mostly libraries, and glibc keeps freed blocks (grpo_cli/run/allocator.py):
    # both the process's peak and what the timed steps added above the warm-up's peak are shown.
    columns = [("peak_gib", "peak (GiB)")] + ([("step_gib", "added by timed steps (GiB)")] if cpu else [])
    print(f"\n{args.prompts} prompts of {args.prompt_tokens} tokens per step; device: {base['device']}; memory: "
          f"{'peak resident set of the process' if cpu else 'peak GPU allocated'}\n")
    header = "".join(f" {title} | x base |" for _, title in columns)
    print(f"| run | shape | G | new tokens | step (s) | x base | rollout (s) | update (s) |{header}")
    print("|" + " --- |" * (8 + 2 * len(columns)))
    for label, shape, group_size, length, f in results:
        memory = "".join(f" {f[key]:.3f} | {f[key] / base[key]:.2f} |" for key, _ in columns)
        print(f"| {label} | {shape} | {group_size} | {length} | {f['step_s']:.3f} | {f['step_s'] / base['step_s']:.2f} | "
              f"{f['rollout_s']:.3f} | {f['update_s']:.3f} |{memory}")


if __name__ == "__main__":
    main()
