"""Print how the answer grader does on ../shared/data: the figures the README quotes.

    python scripts/grader_check.py [--data ../shared/data]

- MATH-500: each reference solution graded against its own answer (should all pass), and
  against the next problem's answer where the two answers differ (should all fail).
- GSM8K: 5276 real model completions with human-checked is_correct labels: agreement, and
  the wall time of grading them all through the scoring pool (worker start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from grpo_cli.answers import gold_answer
from grpo_cli.scoring import Scorer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    args = parser.parse_args()
    data = Path(args.data)
    math = [json.loads(line) for line in open(data / "math500_test.jsonl")]
    gsm = [json.loads(line) for line in open(data / "gsm8k_test_model_solutions.jsonl")]
    print(f"cpu cores: {os.cpu_count()}")
    with Scorer() as scorer:
        own = scorer.score(["correctness"], [r["solution"] for r in math], [r["answer"] for r in math])
        print(f"MATH-500 solutions vs their own answer: {int(own.values.sum())}/{len(math)} judged correct")
        pairs = [(r["solution"], math[(i + 1) % len(math)]["answer"]) for i, r in enumerate(math)
                 if math[(i + 1) % len(math)]["answer"].strip() != r["answer"].strip()]
        cross = scorer.score(["correctness"], [s for s, _ in pairs], [a for _, a in pairs])
        print(f"MATH-500 solutions vs another problem's answer: {int(cross.values.sum())}/{len(pairs)} judged correct")
    with Scorer() as scorer:  # a fresh pool, so the time includes starting the workers
        started = time.perf_counter()
        graded = scorer.score(["correctness"], [r["completion"] for r in gsm], [gold_answer(r["answer"]) for r in gsm])
        seconds = time.perf_counter() - started
    agree = sum(bool(v) == r["is_correct"] for v, r in zip(graded.column("correctness"), gsm))
    print(f"GSM8K model completions: agreement with labels {agree}/{len(gsm)} = {agree / len(gsm):.2%}; "
          f"graded in {seconds:.1f} s ({graded.timeouts} timeouts)")


if __name__ == "__main__":
    main()
