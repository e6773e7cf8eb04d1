"""The benchmark scripts run and print their tables (tiny settings; no timing is asserted)."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def run_script(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_runs_a_random_weight_shape_to_full_length(tmp_path):
    figures = tmp_path / "figures.json"
    proc = run_script("scripts/bench.py", "--only", "ours", "--shape", "mini", "--prompts", "2", "--group-size", "2",
                      "--max-new-tokens", "6", "--prompt-tokens", "5", "--warmup", "1", "--steps", "2",
                      "--rounds", "1", "--json", str(figures))
    assert re.search(r"\| median step \(s\) \| \d+\.\d+ \|", proc.stdout)
    summary = json.loads(figures.read_text())["summary"]["ours"]
    assert summary["timed_steps"] == 2 and summary["step_s"] > 0
    # random weights never end early: 2 prompts x 2 completions ran their 6 tokens each
    assert summary["tokens_per_step"] == 2 * 2 * 6
    assert summary["rollout_s"] > 0 and summary["update_s"] > 0


def test_bench_refuses_no_warmup():
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--warmup", "0"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--warmup must be at least 1" in proc.stderr


def test_scaling_prints_one_row_per_doubling():
    proc = run_script("scripts/scaling.py", "--prompts", "1", "--group-size", "2", "--max-new-tokens", "4",
                      "--prompt-tokens", "4", "--steps", "1")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cells = [[c.strip() for c in r.split("|")[1:5]] for r in rows]  # run, shape, G, new tokens
    (label, shape, g, c), others = cells[0], cells[1:]
    assert label == "base" and (g, c) == ("2", "4")  # as asked
    assert rows[0].split("|")[6].strip() == "1.00"  # the base row against itself
    # each other row doubles one dimension of the base (once or twice over) and keeps the others
    doubled = {}
    for label, row_shape, row_g, row_c in others:
        dimension, times = label.rsplit(" x", 1)
        doubled.setdefault(dimension, []).append(int(times))
        expected = {"G": (shape, int(g) * int(times), int(c)), "length": (shape, int(g), int(c) * int(times))}
        if dimension == "model":
            assert row_shape != shape and (int(row_g), int(row_c)) == (int(g), int(c)), label
        else:
            assert (row_shape, int(row_g), int(row_c)) == expected[dimension], label
    assert doubled["G"] == doubled["length"] == [2, 4] and doubled["model"] == [2]


def test_head_memory_prints_one_row_per_case():
    proc = run_script("scripts/head_memory.py", "--tokens", "64", "--hidden", "16", "--vocab", str(2**18))
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4
    assert [int(r[2]) for r in rows] == [1024, 128, 128, 128]  # 2**25 logits / 2**18 words per automatic chunk
    assert all(float(r[3]) >= 0 for r in rows)


def test_gpu_measure_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", "scripts/gpu_measure.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_tool_cost_compares_a_rollout_with_and_without_the_tool(tools_model_path):
    proc = run_script("scripts/tool_cost.py", "--prompts", "2", "--group-size", "8", "--repeats", "1")
    assert "rollout with the tool" in proc.stdout and "rollout without the tool" in proc.stdout
    calls, ran = re.search(r"calls / run in the sandbox\s+(\d+) / (\d+)", proc.stdout).groups()
    assert int(ran) <= int(calls)
