"""Held-out accuracy of a GGUF export under llama.cpp: the prompts `grpo eval` gives the merged model, greedy
decoding by llama.cpp's own sampler, graded by `grpo eval --predictions`. Prints the figure and, with --merged,
`grpo eval`'s on a safetensors export of the same checkpoint, side by side.

    grpo export runs/smollm2-arithmetic --out exports/smol-gguf --format gguf --quant f16
    grpo export runs/smollm2-arithmetic --out exports/smol
    python scripts/gguf_heldout.py exports/smol-gguf --merged exports/smol --limit 200

Needs llama-cpp-python (pip install 'grpo-cli[gguf]').
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from grpo_cli.commands.benchmark import EvalOptions, run
from grpo_cli.config.recipe import load
from grpo_cli.data.examples import build_examples, describe, load_rows
from grpo_cli.export.build import RECIPE_COPY
from grpo_cli.model.loading import load_tokenizer, resolve


def llama_cpp_predictions(export_dir: Path, limit: int | None, out: Path) -> tuple[int, float]:
    """Write llama.cpp's greedy completions of the run's held-out prompts to `out` (grpo eval's predictions
    format); (how many, seconds)."""
    from llama_cpp import Llama

    recipe = load(export_dir / RECIPE_COPY)
    tokenizer = load_tokenizer(resolve(recipe.model.name))  # training's: the export's check proved the file's equal
    examples = build_examples(load_rows(recipe.data.eval), recipe.data, tokenizer, describe(recipe.data.eval))
    items = examples.items[:limit]
    path = next(export_dir.glob("*.gguf"))
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=len(os.sched_getaffinity(0)), verbose=False)
    started = time.perf_counter()
    with out.open("w") as handle:
        for item in items:
            ids = tokenizer(item.prompt, add_special_tokens=not recipe.data.chat)["input_ids"]
            text = llm.create_completion(ids, max_tokens=recipe.grpo.max_new_tokens, temperature=0.0)
            completion = text["choices"][0]["text"]
            handle.write(json.dumps({**item.row, "answer": item.answer, "completion": item.prefill + completion})
                         + "\n")
    return len(items), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="a grpo export --format gguf directory")
    parser.add_argument("--merged", type=Path, help="a safetensors export of the same checkpoint, for grpo eval")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--predictions", type=Path, default=Path("gguf_predictions.jsonl"))
    args = parser.parse_args()
    n, seconds = llama_cpp_predictions(args.export, args.limit, args.predictions)
    graded = run(EvalOptions(predictions=str(args.predictions))).results()
    print(f"llama.cpp, {next(args.export.glob('*.gguf')).name}: {graded['accuracy']:.2%} of {n} held-out problems "
          f"(greedy, {seconds:.0f} s); predictions {args.predictions}")
    if args.merged is not None:
        evaluated = run(EvalOptions(model=str(args.merged), limit=args.limit)).results()
        print(f"grpo eval, {args.merged}: {evaluated['accuracy']:.2%} of {evaluated['settings']['n']} "
              f"({evaluated['seconds']:.0f} s); difference {100 * (graded['accuracy'] - evaluated['accuracy']):+.1f} "
              "points")


if __name__ == "__main__":
    main()
