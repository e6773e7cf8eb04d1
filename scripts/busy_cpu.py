"""The quickstart's step time alone and beside a busy process, with grpo's thread choice and with torch's default.

torch's default is one thread per CPU; grpo's choice counts only the CPUs other processes leave free
(grpo_cli/run/threads.py). Forcing GRPO_NUM_THREADS to the CPU count gives torch's default back. The busy
process is one pure-Python loop (one core), started before the run and stopped after it.

    python scripts/busy_cpu.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_step(steps: int, threads: int | None, busy: bool) -> tuple[float, str]:
    """(median step seconds after the first two, grpo's thread line) of a quickstart run."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRPO_NUM_THREADS", "OMP_NUM_THREADS")}
    if threads is not None:
        env["GRPO_NUM_THREADS"] = str(threads)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as run:
            result = subprocess.run(
                [sys.executable, "-m", "grpo_cli", "train", str(ROOT / "recipes/quickstart.yaml"),
                 "--set", f"train.steps={steps}", "--set", f"output.dir={run}/run", "--set", "data.eval=null"],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            rows = [json.loads(line) for line in open(f"{run}/run/metrics.jsonl")]
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    line = next((l for l in result.stdout.splitlines() if "CPU threads" in l), "")
    times = [r["step_seconds"] for r in rows if "step_seconds" in r][2:]
    return statistics.median(times), line.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    print(f"quickstart, {args.steps} steps, median step time after the first two; {cpus} CPUs\n")
    print("| machine | torch's default threads | grpo's choice | grpo's choice printed |")
    print("| --- | --- | --- | --- |")
    for busy in (False, True):
        default, _ = median_step(args.steps, cpus, busy)
        chosen, line = median_step(args.steps, None, busy)
        where = "beside one busy process" if busy else "alone"
        print(f"| {where} | {default:.3f} s | {chosen:.3f} s | {line} |", flush=True)


if __name__ == "__main__":
    main()
