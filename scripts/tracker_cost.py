"""What each tracker costs a training step: the quickstart (fewer steps) trained once without trackers and
once per tracker, each in a process of its own, all offline or local (W&B offline, MLflow's SQLite store in
the run directory, Trackio's store in a temporary directory, TensorBoard's event files).

For each run it prints the median step time (metrics.jsonl's step_seconds: the step's phases), the time spent
inside the tracker's calls per step (timed around the sink, which is where it costs the loop), its start and
finish, and the whole run's wall time. The per-step cost is compared with the median step time of the run
without trackers. Trackers that work in a thread or process of their own (W&B's service, MLflow's
asynchronous logging, Trackio's sender) also compete for the CPU: the median step time beside the baseline's
shows that part.

    python scripts/tracker_cost.py [--steps 40] [--trackers tensorboard,wandb,mlflow,trackio] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(tracker: str, steps: int, out: Path) -> dict:
    """In this process: the quickstart with `tracker` ("none": no tracker), the sink's calls timed."""
    from grpo_cli.config import catalog
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.run import log as run_log
    from grpo_cli.run.console import TrainConsole
    from grpo_cli.run.log import read_jsonl
    from grpo_cli.run.train import train

    spent: dict[str, float] = {}  # method -> seconds inside the tracker's calls (the JSONL files' left out)
    each = run_log.RunLog._each

    def timed(self, method, *args):
        sinks = self.sinks
        try:
            for name, sink in sinks.items():
                self.sinks = {name: sink}
                started = time.perf_counter()
                each(self, method, *args)
                if name != "jsonl":
                    spent[method] = spent.get(method, 0.0) + time.perf_counter() - started
        finally:
            self.sinks = sinks

    run_log.RunLog._each = timed
    run_dir = out / tracker
    overrides = [f"train.steps={steps}", f"output.dir={run_dir}", f"output.report_to=[{'' if tracker == 'none' else tracker}]",
                 f"output.eval_every={steps}", f"output.save_every={steps}", "output.project=grpo-tracker-cost"]
    recipe = recipe_module.load(catalog.resolve(Path("quickstart")), overrides)
    started = time.perf_counter()
    train(recipe, console=TrainConsole(quiet=True))
    wall = time.perf_counter() - started
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "step_seconds" in r]
    return {"tracker": tracker, "steps": len(rows), "wall": wall,
            "median_step": statistics.median(r["step_seconds"] for r in rows[1:]),  # the first warms up
            "per_step": (spent.get("log_metrics", 0.0) + spent.get("log_samples", 0.0)) / len(rows),
            "start": spent.get("start", 0.0), "finish": spent.get("finish", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trackers", default="tensorboard,wandb,mlflow,trackio")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.steps, Path(args.out))))
        return
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="grpo-tracker-cost-") as scratch:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "TRACKIO_DIR": str(Path(scratch) / "trackio"), "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        for repeat in range(args.repeats):
            for tracker in ["none", *args.trackers.split(",")]:
                out = Path(scratch) / f"r{repeat}"
                done = subprocess.run([sys.executable, __file__, "--one", tracker, "--steps", str(args.steps),
                                       "--out", str(out)], env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{tracker}: {done.stderr[-2000:]}")
                results.setdefault(tracker, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["median_step"] for r in results["none"])
    print(f"quickstart, {args.steps} steps, {args.repeats} run(s) each; cost per step against the median step "
          f"without trackers ({base:.3f} s)")
    print(f"{'tracker':12} {'median step s':>14} {'in the tracker, s/step':>23} {'share':>7} {'start s':>8} "
          f"{'finish s':>9} {'run wall s':>11}")
    for tracker, runs in results.items():
        median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        print(f"{tracker:12} {median('median_step'):14.3f} {median('per_step'):23.4f} "
              f"{median('per_step') / base:7.2%} {median('start'):8.2f} {median('finish'):9.2f} "
              f"{median('wall'):11.1f}")


if __name__ == "__main__":
    main()
