"""How the answer grader agrees with labelled verdicts, beside math-verify alone: the README's grader table.

    python scripts/grader_check.py [--set tests/data/grader] [--data ../shared/data] [--json out.json]

- The labelled set (tests/data/grader/*.jsonl, provenance per row, see its README): answer
  pairs from other graders' test suites and real model completions with correctness labels.
  Per source: agreement with the labels, false positives (graded right, labelled wrong) and
  false negatives, for grpo's `correctness` rule and for math-verify alone, and the time.
  Rows whose label follows a convention we do not share, or depends on an option of the
  source's grader (its `convention` / `setting` fields), are counted apart, not in the target.
- MATH-500 (tests/data): each reference solution against its own answer, and against the
  next problem's different answer.
- GSM8K: the 5276 labelled model completions of ../shared/data when it is there (100% is the target).

grpo grades as training and `grpo eval --predictions` do: the gold through `gold_answer`, the
response through the scoring pool's `correctness` rule. math-verify alone is what its README
shows: `verify(parse(gold), parse(response))` with its default extraction; a bare answer (a
gold, or a pair's response) without LaTeX delimiters is wrapped in `$...$` as its README does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path

from grpo_cli.rewards.answers import gold_answer
from grpo_cli.rewards.scoring import Scorer

ROOT = Path(__file__).resolve().parents[1]
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed")


def math_verify_alone(response: str, gold: str, kind: str) -> bool:
    from math_verify import parse, verify

    wrap = lambda s: s if _DELIMITED.search(s) else f"${s}$"  # noqa: E731
    try:
        return bool(verify(parse(wrap(gold)), parse(wrap(response) if kind == "pair" else response)))
    except Exception:  # its own timeouts and parse failures: not shown equal
        return False


def load_set(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("*.jsonl")):
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return rows


def in_target(row: dict) -> bool:
    return not row.get("convention") and not row.get("setting")


def figures(verdicts: list[bool], labels: list[bool]) -> dict:
    return {"agree": sum(v == y for v, y in zip(verdicts, labels)),
            "fp": sum(v and not y for v, y in zip(verdicts, labels)),
            "fn": sum(y and not v for v, y in zip(verdicts, labels))}


def check_set(rows: list[dict], scorer: Scorer) -> dict:
    """Per source, for rows in the target and for the rows set apart: both graders' figures."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    report = {}
    for source, members in by_source.items():
        started = time.perf_counter()
        graded = scorer.score(["correctness"], [r["response"] for r in members],
                              [gold_answer(r["gold"]) for r in members])
        ours = [bool(v) for v in graded.column("correctness")]
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        alone = [math_verify_alone(r["response"], r["gold"], r["kind"]) for r in members]
        alone_s = time.perf_counter() - started
        entry = {"kind": ",".join(sorted({r["kind"] for r in members})), "rows": len(members),
                 "grpo_seconds": round(ours_s, 2), "math_verify_seconds": round(alone_s, 2),
                 "grpo_timeouts": int(graded.timeouts)}
        for part, keep in (("target", in_target), ("apart", lambda r: not in_target(r))):
            index = [i for i, r in enumerate(members) if keep(r)]
            labels = [members[i]["label"] for i in index]
            entry[part] = {"n": len(index), "grpo": figures([ours[i] for i in index], labels),
                           "math_verify": figures([alone[i] for i in index], labels)}
        entry["disagreements"] = [
            {"id": r["id"], "label": r["label"], "grpo": o, "math_verify": a, "target": in_target(r),
             "gold": r["gold"], "response": r["response"][-300:]}
            for r, o, a in zip(members, ours, alone) if o != r["label"] or a != r["label"]]
        report[source] = entry
    return report


def print_set(report: dict) -> None:
    print("| source | kind | in target | grpo agree | grpo FP | grpo FN | math-verify agree | math-verify FP "
          "| math-verify FN | set apart (grpo / math-verify agree) | grpo s | math-verify s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for source, entry in report.items():
        target, apart = entry["target"], entry["apart"]
        ours, alone, n = target["grpo"], target["math_verify"], target["n"]
        share = lambda f, total: f"{f['agree']}/{total} ({f['agree'] / total:.1%})" if total else "-"  # noqa: E731
        set_apart = (f"{apart['grpo']['agree']} / {apart['math_verify']['agree']} of {apart['n']}"
                     if apart["n"] else "-")
        print(f"| {source} | {entry['kind']} | {n} | {share(ours, n)} | {ours['fp']} | {ours['fn']} | "
              f"{share(alone, n)} | {alone['fp']} | {alone['fn']} | {set_apart} | "
              f"{entry['grpo_seconds']:.1f} | {entry['math_verify_seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", default=str(ROOT / "tests" / "data" / "grader"), help="the labelled set's folder")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                        help="folder with gsm8k_test_model_solutions.jsonl (skipped when absent)")
    parser.add_argument("--json", help="write every figure and each disagreement here")
    parser.add_argument("--only-set", action="store_true", help="the labelled set only (no MATH-500, no GSM8K)")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print(f"cpu cores: {os.cpu_count()}")
    results: dict = {}
    with Scorer() as scorer:
        scorer.score(["correctness"], ["#### 1"], ["1/2"])  # start the pool before anything is timed
        results["set"] = check_set(load_set(Path(args.set)), scorer)
        print_set(results["set"])
        if not args.only_set:
            math = [json.loads(line) for line in open(ROOT / "tests" / "data" / "math500_test.jsonl")]
            own = scorer.score(["correctness"], [r["solution"] for r in math], [r["answer"] for r in math])
            pairs = [(r["solution"], math[(i + 1) % len(math)]["answer"]) for i, r in enumerate(math)
                     if math[(i + 1) % len(math)]["answer"].strip() != r["answer"].strip()]
            cross = scorer.score(["correctness"], [s for s, _ in pairs], [a for _, a in pairs])
            results["math500"] = {"own": int(own.values.sum()), "n": len(math), "cross": int(cross.values.sum()),
                                  "cross_n": len(pairs)}
            print(f"MATH-500 solutions vs their own answer: {results['math500']['own']}/{len(math)} judged correct")
            print(f"MATH-500 solutions vs another problem's answer: {results['math500']['cross']}/{len(pairs)} "
                  "judged correct")
    gsm_path = Path(args.data) / "gsm8k_test_model_solutions.jsonl"
    if not args.only_set and gsm_path.is_file():
        gsm = [json.loads(line) for line in open(gsm_path)]
        with Scorer() as scorer:  # a fresh pool, so the time includes starting the workers
            started = time.perf_counter()
            graded = scorer.score(["correctness"], [r["completion"] for r in gsm],
                                  [gold_answer(r["answer"]) for r in gsm])
            seconds = time.perf_counter() - started
        agree = sum(bool(v) == r["is_correct"] for v, r in zip(graded.column("correctness"), gsm))
        results["gsm8k"] = {"agree": agree, "n": len(gsm), "seconds": round(seconds, 2), "timeouts": graded.timeouts}
        print(f"GSM8K model completions: agreement with labels {agree}/{len(gsm)} = {agree / len(gsm):.2%}; "
              f"graded in {seconds:.1f} s ({graded.timeouts} timeouts)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
