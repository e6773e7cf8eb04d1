"""What the code sandbox costs a rollout: start-up, one call, a batch's calls at once, a sympy call.

    python scripts/sandbox_cost.py [--calls 64] [--repeats 20] [--parallel N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from grpo_cli.tools.sandbox import Sandbox


def median_seconds(box: Sandbox, code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outcome = box.run(code)
        times.append(time.perf_counter() - started)
        assert outcome.status == "ok", outcome
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=64, help="calls submitted at once")
    parser.add_argument("--repeats", type=int, default=20, help="calls timed one at a time, for each median")
    parser.add_argument("--parallel", type=int, default=None, help="calls run at once (default: one per CPU)")
    args = parser.parse_args()

    started = time.perf_counter()
    with Sandbox(parallel=args.parallel) as box:
        startup = time.perf_counter() - started
        print(f"server start-up: {startup * 1000:.0f} ms (parallel {box.parallel})")
        for key, value in box.isolation.items():
            print(f"  {key}: {value}")
        box.run("pass")  # the first call after start-up pays for page faults the others do not
        print(f"one trivial call (print(1)), median of {args.repeats}: {median_seconds(box, 'print(1)', args.repeats) * 1000:.1f} ms")
        started = time.perf_counter()
        calls = [box.submit(f"print({i})") for i in range(args.calls)]
        done: dict = {}
        while len(done) < len(calls):
            done.update(box.collect(wait=True))
        wall = time.perf_counter() - started
        assert all(done[c].stdout == f"{i}\n" for i, c in enumerate(calls))
        print(f"{args.calls} trivial calls submitted at once: {wall * 1000:.0f} ms, {args.calls / wall:.0f} calls/s")
        sympy_call = "import sympy; print(sympy.sqrt(8))"
        print(f"{sympy_call}, median of {args.repeats}: {median_seconds(box, sympy_call, args.repeats) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
