"""How far the sampler's log-probs are from the training forward's, and what a correction does to the learning:
one `grpo train` per configuration (dtype x CUDA graphs x grpo.sampler_correction), the same recipe, seed and
steps, then a table of the mismatch columns and the learning curve from each run's metrics.jsonl.

    python scripts/sampler_mismatch.py quickstart --steps 120 --dtype float32 bfloat16 --corrections none tis mask
    python scripts/sampler_mismatch.py smollm2-arithmetic --steps 10 --dtype float32 --set output.eval_every=1000
    python scripts/sampler_mismatch.py quickstart --steps 30 --dtype bfloat16 --graphs on off   # on a GPU

Every figure is printed from the runs' own metrics; the runs stay under --out for `grpo plot`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(recipe: str, out: Path, steps: int, dtype: str, graphs: str, correction: str, extra: list[str]) -> dict:
    run_dir = out / f"{dtype}-graphs_{graphs}-{correction}"
    overrides = [f"train.steps={steps}", f"model.dtype={dtype}", f"grpo.cuda_graphs={graphs == 'on'}",
                 f"grpo.sampler_correction={correction}", f"output.dir={run_dir}", *extra]
    command = [sys.executable, "-m", "grpo_cli", "train", recipe, "--quiet"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{finished.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"name": run_dir.name, "dtype": dtype, "graphs": graphs, "correction": correction, "seconds": seconds,
            "steps": [r for r in rows if "reward_mean" in r], "evals": [r for r in rows if "eval/accuracy" in r]}


def summary(result: dict) -> dict:
    measured = [r for r in result["steps"] if r.get("sampler_kl") is not None]
    column = lambda key: [r[key] for r in measured if r.get(key) is not None]  # noqa: E731
    accuracy = [r["accuracy"] for r in result["steps"]]
    tenth = max(1, len(accuracy) // 10)
    figures = {"run": result["name"], "steps measured": f"{len(measured)}/{len(result['steps'])}",
               "sampler_kl mean": statistics.fmean(column("sampler_kl")) if measured else None,
               "sampler_kl worst step": max(column("sampler_kl")) if measured else None,
               "token k3 max": max(column("sampler_kl_max")) if measured else None,
               "ratio min": min(column("sampler_ratio_min")) if measured else None,
               "ratio max": max(column("sampler_ratio_max")) if measured else None,
               "outside [1/2,2]": statistics.fmean(column("sampler_ratio_outside")) if measured else None,
               "corrected": statistics.fmean(column("sampler_corrected_frac")) if column("sampler_corrected_frac")
               else None,
               "train acc first 10%": statistics.fmean(accuracy[:tenth]),
               "train acc last 10%": statistics.fmean(accuracy[-tenth:]),
               "held-out": " -> ".join(f"{r['eval/accuracy']:.1%}" for r in result["evals"]) or None,
               "seconds": result["seconds"]}
    return figures


def show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a shipped recipe's name or a YAML path")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--graphs", nargs="+", default=["on"], choices=["on", "off"],
                        help="grpo.cuda_graphs (no effect on a CPU)")
    parser.add_argument("--corrections", nargs="+", default=["none"], choices=["none", "tis", "mask"])
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more recipe overrides")
    parser.add_argument("--out", type=Path, default=Path("runs/sampler-mismatch"))
    parser.add_argument("--json", type=Path, help="also write every run's summary and curves here")
    args = parser.parse_args()
    results = []
    for dtype in args.dtype:
        for graphs in args.graphs:
            for correction in args.corrections:
                results.append(run(args.recipe, args.out, args.steps, dtype, graphs, correction, args.extra))
                print(" | ".join(f"{k}: {show(v)}" for k, v in summary(results[-1]).items()), flush=True)
    table = [summary(r) for r in results]
    keys = list(table[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for figures in table:
        print("| " + " | ".join(show(figures[k]) for k in keys) + " |")
    if args.json:
        curves = {r["name"]: {"accuracy": [s["accuracy"] for s in r["steps"]],
                              "sampler_kl": [s.get("sampler_kl") for s in r["steps"]],
                              "evals": [(e["step"], e["eval/accuracy"]) for e in r["evals"]]} for r in results}
        args.json.write_text(json.dumps({"summary": table, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
