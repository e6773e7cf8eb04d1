"""The CLI through Typer's runner and as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, TEST_DATA, small_recipe
from grpo_cli import __version__
from grpo_cli.cli import app
from grpo_cli.run.guard import Terminated

runner = CliRunner()


def write_recipe(tmp_path, **sections):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tmp_path / "run", **sections)))
    return path


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_lists_train_with_an_example():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "grpo train recipes/quickstart.yaml" in result.output


def test_recipe_errors_exit_2_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo:\n  kl_bta: 0.1\n")
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "kl_bta: unknown key. Did you mean 'kl_beta'?" in result.output
    assert "Traceback" not in result.output


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_unknown_model_is_a_clear_error(tmp_path, tiny_model_path):
    path = write_recipe(tmp_path, model={"name": "./no/such/model"})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "model directory ./no/such/model not found" in result.output


def test_train_through_the_runner_with_overrides(tmp_path, tiny_model_path):
    path = write_recipe(tmp_path)
    result = runner.invoke(app, ["train", str(path), "--set", "train.steps=1", "--set", "output.eval_every=1"])
    assert result.exit_code == 0, result.output
    assert "done: 1 steps" in result.output and "held-out accuracy" in result.output
    assert "(best: step-1, " in result.output  # output.keep_best: the only evaluation after a step
    # running again into the same directory needs --resume
    again = runner.invoke(app, ["train", str(path), "--set", "train.steps=2"])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, ["train", str(path), "--set", "train.steps=2", "--resume"])
    assert resumed.exit_code == 0 and "done: 2 steps" in resumed.output


def test_train_as_a_subprocess(tmp_path, tiny_model_path):
    path = write_recipe(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "train", str(path), "--set", "train.steps=2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "step 2/2" in result.stdout and "done: 2 steps" in result.stdout
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json").exists()


def test_subprocess_reports_user_errors_with_exit_code(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("grpo: {group_size: 1}\n")
    result = subprocess.run([sys.executable, "-m", "grpo_cli", "train", str(path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 2
    assert "grpo.group_size" in result.stderr and "Traceback" not in result.stderr


def test_the_grpo_console_script_is_installed():
    script = Path(sys.executable).parent / "grpo"
    assert script.exists(), "pip install -e . puts the grpo command next to python"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and __version__ in result.stdout


def test_eval_through_the_runner(tmp_path, tiny_model_path):
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", "--model", "builtin:tiny-math", "--data", "builtin:arithmetic-test",
                                 "--limit", "5", "--max-new-tokens", "40", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy (pass@1)" in result.output
    results = json.loads(out.read_text())
    assert results["n"] == 5 and len(results["items"]) == 5


def test_eval_with_the_tool_as_a_subprocess(tmp_path, tools_model_path):
    """grpo eval --tools python: the same protocol, the model's code run in the sandbox; the results say how
    often it ran code, and every transcript that did holds the output the sandbox gave."""
    out = tmp_path / "results.json"
    common = ["--model", "builtin:tiny-math-tools", "--data", "builtin:arithmetic-test", "--limit", "24",
              "--samples", "4", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "96", "--tool-timeout", "3"]
    result = subprocess.run([sys.executable, "-m", "grpo_cli", "eval", *common, "--tools", "python", "--output", str(out)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["settings"]["tools"] == ["python"] and results["settings"]["max_tool_calls"] == 4
    assert results["settings"]["tool_timeout_s"] == 3.0
    assert 0 < results["tool_use_frac"] < 1 and "completions that ran code" in result.stdout
    transcripts = [c for item in results["items"] for c in item["completions"] if "```output" in c]
    assert transcripts and all(c.count("```output") <= 4 for c in transcripts)
    without = runner.invoke(app, ["eval", *common, "--tools", "none", "--output", str(tmp_path / "plain.json")])
    assert without.exit_code == 0, without.output
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "tools" not in plain["settings"] and "tool_use_frac" not in plain
    assert not any("```output" in c for item in plain["items"] for c in item["completions"])


def test_eval_refuses_an_unknown_tool():
    result = runner.invoke(app, ["eval", "--model", "builtin:tiny-math", "--data", "builtin:arithmetic-test",
                                 "--tools", "bash"])
    assert result.exit_code == 2 and "python" in result.output


def test_eval_predictions_as_a_subprocess(tmp_path):
    out = tmp_path / "r.json"
    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "eval", "--predictions", str(TEST_DATA / "gsm8k_test_model_solutions_1000.jsonl"),
         "--limit", "200", "--output", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["n"] == 200


def test_eval_mistakes_exit_2(tmp_path):
    result = runner.invoke(app, ["eval", "--data", "gsm8k"])
    assert result.exit_code == 2 and "--model" in result.output


def test_eval_chat_template_kwarg_needs_key_equals_value():
    result = runner.invoke(app, ["eval", "--model", "builtin:tiny-math", "--chat-template-kwarg", "enable_thinking"])
    assert result.exit_code == 2 and "--chat-template-kwarg enable_thinking: expected KEY=VALUE" in result.output


@pytest.mark.parametrize("option, value, message", [
    ("--max-tool-calls", "0", "greater than or equal to 1, as is the recipe's grpo.max_tool_calls"),
    ("--max-tool-calls", "-1", "greater than or equal to 1, as is the recipe's grpo.max_tool_calls"),
    ("--tool-timeout", "0", "greater than or equal to 0.1, as is the recipe's grpo.tool_timeout_s"),
    ("--tool-timeout", "-1", "greater than or equal to 0.1, as is the recipe's grpo.tool_timeout_s"),
    ("--tool-timeout", "0.001", "greater than or equal to 0.1, as is the recipe's grpo.tool_timeout_s"),
    ("--max-new-tokens", "0", "must be at least 1"),
    ("--limit", "0", "greater than 0, as is the recipe's data.eval_limit"),
    ("--limit", "-1", "greater than 0, as is the recipe's data.eval_limit"),
    ("--batch-size", "0", "must be at least 1"),
    ("--top-p", "0", "greater than 0, as is the recipe's grpo.top_p"),
])
def test_eval_refuses_option_values_no_evaluation_can_use(option, value, message, tiny_model_path):
    """0 and -1 used to pass: 0 silently meant the default (`x or default`), -1 tool calls or seconds refused or
    timed out every call, and --limit -1 dropped the last problem."""
    result = runner.invoke(app, ["eval", "--model", "builtin:tiny-math", "--data", "builtin:arithmetic-test",
                                 "--limit", "1", "--max-new-tokens", "4", "--tools", "python", option, value])
    assert result.exit_code == 2, result.output
    assert f"{option} {value}: " in result.output and message in " ".join(result.output.split())


def test_eval_refuses_a_chat_template_kwarg_grpo_passes_itself(tiny_model_path):
    result = runner.invoke(app, ["eval", "--model", "builtin:tiny-math", "--data", "builtin:arithmetic-test", "--chat",
                                 "--limit", "1", "--chat-template-kwarg", "add_generation_prompt=false"])
    assert result.exit_code == 2, result.output
    assert "--chat-template-kwarg: add_generation_prompt is not a variable of the chat template" in result.output


def test_validate_refuses_a_chat_template_kwarg_grpo_passes_itself(tmp_path):
    path = write_recipe(tmp_path, data={"chat": True, "chat_template_kwargs": {"messages": []}})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "data.chat_template_kwargs: messages is not a variable of the chat template" in result.output


def test_score_through_the_runner(tmp_path):
    rows = tmp_path / "c.jsonl"
    rows.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "4",
                                "completions": ["2+2=4. #### 4", "#### 5"]}) + "\n")
    out = tmp_path / "s.json"
    result = runner.invoke(app, ["score", str(ROOT / "recipes" / "quickstart.yaml"), str(rows), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "advantage" in result.output
    groups = json.loads(out.read_text())
    assert groups[0]["completions"][0]["total"] == pytest.approx(1.2)


def test_score_missing_file(tmp_path):
    result = runner.invoke(app, ["score", str(ROOT / "recipes" / "quickstart.yaml"), str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "not found" in result.output


def test_export_through_the_runner_and_as_a_subprocess(tmp_path, tiny_model_path):
    path = write_recipe(tmp_path)
    assert runner.invoke(app, ["train", str(path), "--set", "train.steps=2", "--set", "train.lr=0.005"]).exit_code == 0
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "exported step 2 as a float32 model" in result.output and "verified" in result.output
    again = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")])
    assert again.exit_code == 2 and "--force" in again.output
    best = runner.invoke(app, ["export", str(tmp_path / "run"), "--best", "--out", str(tmp_path / "best")])
    assert best.exit_code == 0 and "exported step 2 " in best.output, best.output  # evaluated at the end only
    proc = subprocess.run([sys.executable, "-m", "grpo_cli", "export", str(tmp_path / "run"), "--out",
                           str(tmp_path / "adapter"), "--adapter-only"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "as a LoRA adapter" in proc.stdout


def test_export_of_a_non_run_exits_2(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a grpo run directory" in result.output


def test_eval_predictions_refuses_a_broken_file_and_counts_what_it_grades(tmp_path):
    broken = tmp_path / "p.jsonl"
    broken.write_text('{"answer": "1", "completion": "#### 1"}\n{"answer": "2", "completion": "#### 3"\n')
    result = runner.invoke(app, ["eval", "--predictions", str(broken)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "p.jsonl: 1 of 2 lines are not JSON objects: line 2" in " ".join(result.output.split())
    good = tmp_path / "g.jsonl"
    good.write_text("".join(json.dumps({"answer": str(i), "completion": f"#### {i}"}) + "\n" for i in range(5)))
    result = runner.invoke(app, ["eval", "--predictions", str(good), "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "3 of 5 rows (--limit 3)" in result.output


def test_export_refuses_to_touch_the_run_with_exit_2(tmp_path, tiny_model_path):
    path = write_recipe(tmp_path)
    assert runner.invoke(app, ["train", str(path), "--set", "train.steps=2"]).exit_code == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (tmp_path / "model.bin").write_text("a file")
    for out, says in ((run, "contains"), (tmp_path, "contains"), (run / "model", "lies inside"),
                      (tmp_path / "model.bin", "is a file")):
        result = runner.invoke(app, ["export", str(run), "--out", str(out), "--force"])
        assert result.exit_code == 2 and says in result.output, result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert (tmp_path / "model.bin").read_text() == "a file"


@pytest.mark.parametrize("command", ["train", "validate", "score"])
@pytest.mark.parametrize("typed, meant", [("quickstrat", "'quickstart'"), ("quickstrat.yaml", "'quickstart'"),
                                          ("qwen2.5-0.5b-gms8k", "'qwen2.5-0.5b-gsm8k-lora'")])
def test_a_misspelled_shipped_recipe_name_gets_did_you_mean(command, typed, meant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = [str(tmp_path / "completions.jsonl")] if command == "score" else []
    result = runner.invoke(app, [command, typed, *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"no shipped recipe of that name. Did you mean {meant}" in " ".join(result.output.split())


def test_a_misspelled_recipe_path_gets_did_you_mean_the_file_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["validate", "recipes/quickstrat.yaml"])
    # the closest file first (quickstart-tools.yaml is close too)
    assert result.exit_code == 2 and "Did you mean 'recipes/quickstart.yaml'" in " ".join(result.output.split())
    unknown = runner.invoke(app, ["recipes", "show", "qwen2.5-1.5b-gsm8k-qlroa"])
    assert unknown.exit_code == 2 and "Did you mean 'qwen2.5-1.5b-gsm8k-qlora'" in " ".join(unknown.output.split())
    nothing_like_it = runner.invoke(app, ["validate", str(tmp_path / "xyzzy.yaml")])
    assert nothing_like_it.exit_code == 2 and "not found" in nothing_like_it.output


def _command_paths(command, path=()):
    """Every command line that has a --help: the root, each group, each command under it."""
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_no_help_shows_a_type_tag():
    import re

    import typer.main

    paths = list(_command_paths(typer.main.get_command(app)))
    assert ["recipes", "show"] in paths and len(paths) >= 10
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        tags = re.findall(r"<[\w\[\]., |]+>", result.output)
        assert not tags, f"grpo {' '.join(path)} --help shows {sorted(set(tags))}"
    shown = runner.invoke(app, ["eval", "--help"], terminal_width=200).output
    assert re.search(r"--limit\s+N\s", shown) and re.search(r"--output\s+-o\s+FILE\s", shown)
    assert re.search(r"--chat\s+--no-chat\s+Use the", shown)  # a flag shows no placeholder at all


def validate_with_data(tmp_path, rows, **grpo):
    """`grpo validate` of a builtin-model recipe training on `rows` (a local .jsonl); its exit code and
    output with the lines joined."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "d.jsonl"}, "grpo": grpo}))  # beside the recipe
    result = runner.invoke(app, ["validate", str(path)], terminal_width=200)
    return result.exit_code, " ".join(result.output.split())


def test_validate_refuses_data_without_the_prompt_field_as_training_would(tmp_path, tiny_model_path):
    code, output = validate_with_data(tmp_path, [{"q": "What is 2 + 3?", "answer": "5"}], max_new_tokens=16)
    assert code == 2 and "valid." not in output
    assert "dataset d.jsonl has no field 'question'" in output and "Its fields are: q, answer" in output


def test_validate_reports_prompts_too_long_for_the_context_and_refuses_when_none_fits(tmp_path, tiny_model_path):
    from grpo_cli.model.builtin import build_config, build_tokenizer

    assert build_config(build_tokenizer()).max_position_embeddings == 256
    rows = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "x" * 200, "answer": "1"}]
    code, output = validate_with_data(tmp_path, rows, max_new_tokens=100)
    assert code == 0 and "valid." in output and "prompts too long for the context │ 1" in output
    assert "longest training prompt │ 200 tokens" in output and "model context │ 256 tokens" in output
    assert "1 of 2 training prompts leave less than grpo.max_new_tokens (100)" in output
    assert "Lower grpo.max_new_tokens to at most 56" in output
    code, output = validate_with_data(tmp_path, rows, max_new_tokens=250)
    assert code == 2 and "valid." not in output
    assert "every prompt of d.jsonl is too long: the longest is 200 tokens and grpo.max_new_tokens is 250" in output


def test_validate_counts_the_prompts_of_good_data(tmp_path, tiny_model_path):
    rows = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 10 + 7?", "answer": "17"},
            {"question": "What is 1 + 1?", "answer": ""}]
    code, output = validate_with_data(tmp_path, rows, max_new_tokens=40)
    assert code == 0 and "valid." in output, output
    assert "training prompts kept (d.jsonl) │ 2" in output and "longest training prompt │ 15 tokens" in output
    assert "prompts too long for the context │ 0" in output and "1 row skipped: 1 with no answer (line 3)" in output
    # grpo.max_new_tokens: auto (the default) is the context left after the longest prompt: 256 - 15
    code, output = validate_with_data(tmp_path, rows)
    assert code == 0 and "grpo.max_new_tokens │ 241 (auto)" in output
    assert "prompts too long for the context │ 0" in output


def test_auto_max_new_tokens_skips_a_prompt_that_nearly_fills_the_context_in_validate_as_in_train(tmp_path,
                                                                                                   tiny_model_path):
    """One prompt leaving 6 of the 256-token context made auto 6: validate said "valid", and every completion
    of the training run was cut off at 6 tokens."""
    short, long = {"question": "What is 2 + 3?", "answer": "5"}, {"question": "x" * 250, "answer": "1"}
    code, output = validate_with_data(tmp_path, [short, long])
    assert code == 0 and "grpo.max_new_tokens │ 242 (auto)" in output and "prompts too long for the context │ 1" in output
    assert "training prompts kept (d.jsonl) │ 1" in output
    assert ("1 of 2 training prompts leave less than 32 tokens of the model's 256-token context (the longest prompt "
            "is 250 tokens, and auto gives a completion at least 32); training skips them. Set grpo.max_new_tokens "
            "to at most 6 to keep every prompt") in output
    code, output = validate_with_data(tmp_path, [long, {**long, "question": "y" * 240}])
    assert code == 2 and "valid." not in output
    assert "no training prompt leaves that: the shortest is 240 tokens. Set grpo.max_new_tokens to a number" in output
    # training resolves auto the same way, and skips the same prompt
    path = write_recipe(tmp_path, data={"train": str(tmp_path / "d.jsonl"), "eval": None},
                        grpo={"max_new_tokens": "auto"}, train={"steps": 1})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [short, long]))
    result = runner.invoke(app, ["train", str(path)], terminal_width=200)
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "grpo.max_new_tokens: auto -> 242" in output and "1 prompts too long for the context skipped" in output


def test_validate_skips_the_data_check_for_a_hub_dataset_not_in_the_cache(tmp_path, tiny_model_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "some-org/some-data"}, "grpo": {"max_new_tokens": 16}}))
    result = runner.invoke(app, ["validate", str(path)], terminal_width=200)
    output = " ".join(result.output.split())
    assert result.exit_code == 0 and "valid." in output and "estimated peak" in output
    assert "data check skipped: hub dataset some-org/some-data is not in the local cache" in output


@pytest.mark.parametrize("stop, code, line", [
    (KeyboardInterrupt, 130, "stopped by Ctrl-C; nothing was written"),
    (Terminated, 143, "stopped by SIGTERM; nothing was written"),
])
def test_a_stop_ends_a_command_with_one_line_and_the_signals_exit_code(tmp_path, monkeypatch, stop, code, line):
    import grpo_cli.commands.score as score_module

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(score_module, "score_completions", stopped)
    result = runner.invoke(app, ["score", "quickstart", str(tmp_path / "c.jsonl")])
    assert result.exit_code == code and result.output.strip() == line


@pytest.mark.parametrize("stop, code, line", [
    (KeyboardInterrupt, 130, "interrupted; the last complete checkpoint (if any) is intact: continue with --resume."),
    (Terminated, 143, "stopped by SIGTERM; training had not started its first step, so there was nothing to save."),
])
def test_a_stop_before_training_says_what_it_left(tmp_path, monkeypatch, stop, code, line):
    import grpo_cli.run.train as train_module

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(train_module, "train", stopped)
    result = runner.invoke(app, ["train", "quickstart"])
    assert result.exit_code == code and result.output.strip() == line


def test_the_options_defaults_are_the_commands_and_the_recipes():
    """Each default is stated once (config/defaults.py): grpo eval's options default to EvalOptions' values, the
    sandbox's limits to the recipe's, and the help quotes the same numbers."""
    import dataclasses

    import typer.main

    from grpo_cli.commands.benchmark import NAMED_SETS, EvalOptions
    from grpo_cli.config.recipe import GrpoSpec

    commands = typer.main.get_command(app).commands
    eval_options = {param.name: param.default for param in commands["eval"].params}
    for field in dataclasses.fields(EvalOptions):
        if field.name in eval_options and eval_options[field.name] is not None:
            assert eval_options[field.name] == field.default, field.name
    assert {"samples", "temperature", "top_p", "batch_size", "seed", "device"} <= set(eval_options)
    grpo = GrpoSpec()
    sandbox = {param.name: param.default for param in commands["sandbox"].commands["run"].params}
    assert (sandbox["timeout"], sandbox["memory_mb"]) == (grpo.tool_timeout_s, grpo.tool_memory_mb)
    helps = {param.name: param.help for param in commands["eval"].params}
    assert helps["max_tool_calls"].endswith(f"else {grpo.max_tool_calls}).")
    assert helps["tool_timeout"].endswith(f"else {grpo.tool_timeout_s:g}).")
    assert helps["max_new_tokens"].startswith(
        "Default: " + ", ".join(f"{named.max_new_tokens} for {name}" for name, named in NAMED_SETS.items()))
