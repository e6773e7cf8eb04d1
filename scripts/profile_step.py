"""Where a training step's time goes: one step of a recipe under torch's profiler, by phase and by operator.

Trains the recipe for --steps steps (the earlier ones warm up: allocator, threads, worker processes) and
profiles the last: the rollout (sampling), the reference and old-policy passes when the recipe has them,
and the update. Prints each phase's wall time, the operators that took the most CPU time inside each,
and the rollout's cost per decode step and per generated token.

    python scripts/profile_step.py recipes/smollm2-arithmetic.yaml --steps 3
    python scripts/profile_step.py recipes/quickstart.yaml --set grpo.kl_beta=0
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = {  # grpo_cli.run.train's names -> the label printed
    "sample_step": "rollout",
    "logprobs_no_grad": "reference / old-policy pass",
    "update_policy": "update",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--steps", type=int, default=3, help="steps to train; the last is profiled")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=12, help="operators listed per phase")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.run import train as train_module
    from grpo_cli.run.console import TrainConsole

    walls: dict[str, float] = {}
    profiled = {"on": False, "prof": None, "tokens": 0, "decode_steps": 0}

    def timed(name, function):
        def wrapper(*a, **k):
            if not profiled["on"]:
                return function(*a, **k)
            began = time.perf_counter()
            with record_function(PHASES[name]):
                result = function(*a, **k)
            walls[PHASES[name]] = walls.get(PHASES[name], 0.0) + time.perf_counter() - began
            if name == "sample_step":
                rollout = result.rollout
                profiled["tokens"] = int(rollout.lengths.sum())
                profiled["decode_steps"] = int(rollout.lengths.max())
                profiled["rows"] = int(rollout.lengths.numel())
            return result
        return wrapper

    for name in PHASES:
        setattr(train_module, name, timed(name, getattr(train_module, name)))
    take_step = train_module.take_step

    def last_step_profiled(run, *a, **k):
        if run.step < args.steps:
            return take_step(run, *a, **k)
        profiled["on"] = True
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            result = take_step(run, *a, **k)
        profiled["on"], profiled["prof"] = False, prof
        return result

    train_module.take_step = last_step_profiled
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [*args.sets, f"train.steps={args.steps}", f"output.dir={run_dir}/run", "data.eval=null"]
        loaded = recipe_module.load(args.recipe, overrides=sets)
        train_module.train(loaded, recipe_dir=args.recipe.resolve().parent, console=TrainConsole(quiet=True))

    prof = profiled["prof"]
    print(f"{args.recipe} step {args.steps}, torch threads {torch.get_num_threads()}")
    for label, seconds in walls.items():
        print(f"  {label}: {seconds:.2f} s")
    if profiled["decode_steps"]:
        rollout = walls["rollout"]
        print(f"  rollout: {profiled['rows']} completions, {profiled['tokens']} tokens, "
              f"{profiled['decode_steps']} decode steps: {1000 * rollout / profiled['decode_steps']:.1f} ms a decode "
              f"step, {1000 * rollout / max(1, profiled['tokens']):.2f} ms a generated token")
    events = prof.events()
    for label in walls:
        ranges = [e for e in events if e.name == label]
        if not ranges:
            continue
        start, end = ranges[0].time_range.start, ranges[0].time_range.end
        inside: dict[str, float] = {}
        for event in events:
            if event.name in walls or not (start <= event.time_range.start and event.time_range.end <= end):
                continue
            inside[event.name] = inside.get(event.name, 0.0) + event.self_cpu_time_total
        total = sum(inside.values()) or 1.0
        print(f"\n{label}: operators by self CPU time (all threads)")
        for name, micros in sorted(inside.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {micros / 1e6:8.3f} s  {100 * micros / total:5.1f}%  {name}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
