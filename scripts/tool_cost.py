"""What the code tool costs a rollout: the same prompts sampled with the tool and without it, alternately.

    python scripts/tool_cost.py [--model builtin:tiny-math-tools | runs/quickstart-tools] [--repeats 5]

Without the tool the model still writes its python blocks; they stay text and decoding goes on. With
it, each closed block pauses its row, runs in the sandbox, and its output block is appended to the row's
KV cache. Prints medians over the repeats: rollout seconds, calls, calls that ran (identical code in a
rollout runs once), time the calls ran, time the loop waited for them, and the appends (prefills).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grpo_cli.data import builtin_task
from grpo_cli.rollout import sampling as rollout_module
from grpo_cli.model.loading import load_for_inference
from grpo_cli.rollout.settings import Sampling
from grpo_cli.rollout.with_tools import ToolSession, ToolSettings


class TimedAppends:
    """The stepper, with its appends (the outputs' prefills) counted and timed."""

    def __init__(self, inner):
        self.inner, self.count, self.seconds = inner, 0, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def append(self, tokens, valid):
        started = time.perf_counter()
        out = self.inner.append(tokens, valid)
        self.seconds += time.perf_counter() - started
        self.count += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-math-tools", help="builtin model, run directory or checkpoint")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the lean decoder's CUDA graphs, with tool calls)")
    args = parser.parse_args()
    loaded = load_for_inference(args.model, args.device, None)
    prompts = [p.question for p in builtin_task.train_split()[: args.prompts]]
    appends: list[TimedAppends] = []
    original = rollout_module.decode_with_tools

    def timed(stepper, *rest):
        appends.append(TimedAppends(stepper))
        return original(appends[-1], *rest)

    rollout_module.decode_with_tools = timed
    figures: dict[str, list[float]] = {k: [] for k in ("text", "tools", "calls", "ran", "run_s", "wait_s",
                                                       "appends", "append_s", "tool_use")}
    with ToolSession(ToolSettings()) as session:
        for repeat in range(args.repeats):
            for mode in ("text", "tools"):
                torch.manual_seed(repeat)
                started = time.perf_counter()
                sampling = Sampling(max_new_tokens=args.max_new_tokens, samples_per_prompt=args.group_size)
                out = rollout_module.generate(loaded.model, loaded.tokenizer, prompts, sampling,
                                              tools=session if mode == "tools" else None)
                figures[mode].append(time.perf_counter() - started)
                if mode == "tools":
                    use = out.tool_use
                    figures["calls"].append(float(use.calls.sum()))
                    figures["ran"].append(float((use.seconds > 0).sum()))
                    figures["run_s"].append(float(use.seconds.sum()))
                    figures["wait_s"].append(use.waited_seconds)
                    figures["appends"].append(appends[-1].count)
                    figures["append_s"].append(appends[-1].seconds)
                    figures["tool_use"].append(float((use.calls > 0).float().mean()))
    median = {k: statistics.median(v) for k, v in figures.items()}
    rows = args.prompts * args.group_size
    print(f"model {args.model} on {args.device}, {args.prompts} prompts x {args.group_size} samples, max_new_tokens "
          f"{args.max_new_tokens}, medians of {args.repeats}")
    print(f"  rollout without the tool        {median['text']:.3f} s")
    print(f"  rollout with the tool           {median['tools']:.3f} s  ({median['tools'] / median['text']:.2f}x)")
    print(f"  completions that ran code       {median['tool_use']:.0%} of {rows}")
    print(f"  calls / run in the sandbox      {median['calls']:.0f} / {median['ran']:.0f} "
          "(identical code in a rollout runs once)")
    print(f"  sandbox time, summed over calls {median['run_s']:.3f} s")
    print(f"  decode loop waiting for calls   {median['wait_s']:.3f} s")
    print(f"  output appends (prefills)       {median['appends']:.0f}, {median['append_s']:.3f} s in all")


if __name__ == "__main__":
    main()
