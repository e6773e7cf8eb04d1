"""Memory of the log-prob head pass (hidden states -> per-token log-probs, forward and backward)
as the chunk and the entropy metric change, for a vocabulary the size of Qwen2.5's.

    python scripts/head_memory.py                     # 2048 tokens, hidden 896, vocabulary 151936
    python scripts/head_memory.py --tokens 512 --vocab 32000

Each configuration runs in its own process on the CPU; the figure is the process's peak
resident set above the resident set just before the pass (Linux: VmHWM after clear_refs),
so it counts every float32 [chunk, vocabulary] temporary the pass holds at once. The head
is frozen, as in LoRA training; the hidden states carry gradients, as in the update.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (label, chunk tokens or None for the automatic chunk, with the entropy, entropy with gradients)
    ("1024-token chunks, entropy with its graph (before)", 1024, True, True),
    ("automatic chunks, entropy with its graph", None, True, True),
    ("automatic chunks, entropy as a value (grpo)", None, True, False),
    ("automatic chunks, no entropy", None, False, False),
]


def status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(args) -> None:
    import torch

    from grpo_cli.model import logprobs

    label, chunk, entropy, entropy_grad = CASES[args.case]
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(1, args.tokens, args.hidden, requires_grad=True)  # [1, T, H]
    targets = torch.randint(0, args.vocab, hidden.shape[:2])

    class Model:  # what _head_logprobs asks of a causal LM
        def get_output_embeddings(self):
            return head

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = status("VmRSS")
    logp, _ = logprobs._head_logprobs(Model(), hidden, targets, 1.0, chunk, entropy, entropy_grad)
    logp.sum().backward()
    tokens = chunk or logprobs.chunk_tokens_for(args.vocab)
    print(f"| {label} | {tokens} | {status('VmHWM') - start:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        return measure(args)
    print(f"\n{args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}; peak resident set above the start\n")
    print("| head pass | tokens per chunk | memory (GiB) |")
    print("| --- | --- | --- |")
    for case in range(len(CASES)):
        proc = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
                               "--vocab", str(args.vocab), "--case", str(case)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        print(proc.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
