"""Seeing a run: the live dashboard, TensorBoard, plots, logged samples, recipes and validate."""

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import ROOT, small_recipe
from grpo_cli.config import recipe as recipe_module
from grpo_cli.cli import app
from grpo_cli.run.console import TrainConsole, dashboard
from grpo_cli.errors import UserError
from grpo_cli.run.metrics import DASHBOARD
from grpo_cli.run.log import read_jsonl
from grpo_cli.run.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path):
    run_dir = tmp_path_factory.mktemp("seeing") / "run"
    recipe = recipe_module.validate(small_recipe(run_dir, output={"dir": str(run_dir), "save_every": 2,
                                                                  "eval_every": 2, "samples_every": 1,
                                                                  "tensorboard": True}))
    train(recipe, console=TrainConsole(quiet=True))
    return run_dir


def test_steps_log_what_the_dashboard_shows(run_dir):
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward_mean" in r]
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["peak_memory_gib"] > 0
        assert 0 < row["answer_diversity"] <= 1 and 0 < row["text_diversity"] <= 1


def test_dashboard_panel(run_dir):
    row = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward_mean" in r][-1]
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(dashboard(row, ("2+2=4. #### 4", 1.2), ("#### 5", -0.2)))
    text = console.export_text()
    # every figure the catalogue puts on the dashboard, by its label and with the row's value as the
    # catalogue formats it; then each reward rule's mean, and the best and worst completion
    shown = [(m.label, "-" if row[m.name] is None else format(row[m.name], m.fmt)) for m in DASHBOARD
             if m.on_dashboard(row)]
    assert "tool_use_frac" not in row and "tool use" not in text  # a run without the tool: no tool figures
    # float32: the sampler and the trainer agree to rounding, which is logged but not worth a cell
    assert 0 < row["sampler_kl"] < 1e-9 and "sampler KL" not in text
    shown += [(k.removeprefix("reward/"), format(v, "+.3f")) for k, v in row.items() if k.startswith("reward/")]
    assert {"correctness", "step_format"} <= {label for label, _ in shown}
    for label, value in shown:
        assert re.search(rf"(?<!\S){re.escape(label)}\s+{re.escape(value)}(?!\S)", text), (label, value)
    assert re.search(r"best \+1\.20\s+2\+2=4\. #### 4", text) and re.search(r"worst -0\.20\s+#### 5", text)


def test_live_console_on_a_terminal_and_plain_lines_otherwise(run_dir):
    row = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward_mean" in r][-1]
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    live = TrainConsole(console=terminal)
    live.start(3, 0)
    live.step(row, ("a", 1.0), ("b", 0.0))
    live.stop()
    assert "step 3" in terminal.file.getvalue() and "best" in terminal.file.getvalue()
    plain_out = io.StringIO()
    plain = TrainConsole(console=Console(file=plain_out, force_terminal=False, width=100))
    plain.start(30, 0)
    for step in range(1, 31):
        plain.step({**row, "step": step})
    lines = plain_out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/30", "10/30", "20/30", "30/30"]
    assert "\x1b[" not in plain_out.getvalue()
    quiet_out = io.StringIO()
    quiet = TrainConsole(quiet=True, console=Console(file=quiet_out, force_terminal=True))
    quiet.start(3, 0)
    quiet.step(row)
    quiet.message("hello")
    assert quiet_out.getvalue() == ""


def test_tensorboard_gets_the_same_scalars_and_the_samples(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reward_mean", "train/kl", "reward/correctness", "eval/accuracy"} <= tags
    steps = [e.step for e in events.Scalars("train/reward_mean")]
    assert steps == [1, 2, 3]
    assert "samples/text_summary" in events.Tags()["tensors"]


def test_tensorboard_missing_is_explained(tmp_path, monkeypatch, tiny_model_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    recipe = recipe_module.validate(small_recipe(tmp_path / "run", output={"tensorboard": True}))
    with pytest.raises(UserError, match="pip install tensorboard"):
        train(recipe, console=TrainConsole(quiet=True))


def test_plot_renders_a_real_run(run_dir, tmp_path):
    import matplotlib.image

    result = runner.invoke(app, ["plot", str(run_dir), "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'p.png'}" in result.output
    image = matplotlib.image.imread(tmp_path / "p.png")
    assert image.shape[0] >= 600 and image.shape[1] >= 1200
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert (tmp_path / "p.png").stat().st_size > 30_000


def test_plot_compares_runs_and_defaults_into_the_run(run_dir, tmp_path):
    result = runner.invoke(app, ["plot", str(run_dir), str(run_dir)])
    assert result.exit_code == 0 and (run_dir / "plot.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["plot", str(empty)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output


def test_samples_view(run_dir):
    result = runner.invoke(app, ["samples", str(run_dir), "--step", "2"])
    assert result.exit_code == 0, result.output
    assert "step 2" in result.output and "advantage" in result.output and "correctness" in result.output
    missing = runner.invoke(app, ["samples", str(run_dir), "--step", "99"])
    assert missing.exit_code == 2 and "the logged steps are 1, 2, 3" in missing.output


def test_recipes_list_and_show():
    listed = runner.invoke(app, ["recipes"])
    assert listed.exit_code == 0
    names = [line.split()[0] for line in listed.output.split("\n\n")[0].splitlines()]  # then a note on memory
    assert names == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    shown = runner.invoke(app, ["recipes", "show", "quickstart"])
    assert shown.exit_code == 0 and shown.output == (ROOT / "recipes" / "quickstart.yaml").read_text()
    unknown = runner.invoke(app, ["recipes", "show", "quickstrat"])
    assert unknown.exit_code == 2 and "quickstart" in unknown.output


def test_validate_shows_parameters_and_memory(tiny_model_path):
    result = runner.invoke(app, ["validate", "quickstart", "--set", "model.lora.r=4"])
    assert result.exit_code == 0, result.output
    assert "valid." in result.output and "r: 4" in result.output
    assert "800,512" in result.output and "trainable" in result.output and "estimated peak" in result.output


def test_validate_shows_the_sandbox_a_recipe_with_the_tool_gets(tiny_model_path):
    result = runner.invoke(app, ["validate", "quickstart", "--set", "grpo.tools=[python]", "--set", "model.lora.r=4"])
    assert result.exit_code == 0, result.output
    assert "sandbox on this machine" in result.output and "-> '42'" in result.output
    for layer in ("process", "network", "filesystem", "system calls", "keyring", "limits"):
        assert layer in result.output
    plain = runner.invoke(app, ["validate", "quickstart"])
    assert plain.exit_code == 0 and "sandbox" not in plain.output


def test_validate_refuses_a_broken_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("grpo: {group_sise: 4}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Did you mean 'group_size'?" in result.output


@pytest.mark.parametrize("command", [["train"], ["eval"], ["score"], ["export"], ["plot"], ["samples"],
                                     ["validate"], ["recipes"], ["recipes", "show"]])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_version_and_completion():
    assert runner.invoke(app, ["--version"]).exit_code == 0
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_a_shipped_recipe_by_name(tmp_path, tiny_model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "quickstart", "--set", "train.steps=1", "--set", "data.eval=null",
                                 "--set", f"output.dir={tmp_path / 'r'}"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert "no held-out evaluation: data.eval is null" in " ".join(result.output.split())  # said, not silent


def test_4_bit_estimate_keeps_embeddings_and_norms_in_16_bits(tiny_model_path):
    from grpo_cli.model import builtin as builtin_model
    from grpo_cli.commands.estimate import GIB, count_parameters, estimate, quantized_parameters
    from grpo_cli.config.recipe import load

    config = builtin_model.build_config(builtin_model.build_tokenizer())
    # 4 layers of q 128x128, k and v 128x64, o 128x128, gate and up 128x384, down 384x128; the tied
    # 101x128 embedding and the nine 128-wide norms stay in 16 bits
    assert quantized_parameters(config) == 4 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384) == 786_432
    recipe = load(str(ROOT / "recipes" / "quickstart.yaml"), ["model.load_in_4bit=true", "model.dtype=bfloat16"])
    total, trainable = count_parameters(recipe, config)
    assert total - 786_432 == 101 * 128 + 9 * 128
    weights = estimate(recipe, config, total, trainable).parts["weights"]
    assert weights == (786_432 * 0.5 + (101 * 128 + 9 * 128) * 2) / GIB


def _metrics(run_dir, rules, steps=30, tools=False):
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "reward_mean": step / steps, "accuracy": step / steps, "kl": 0.01,
                     "completion_len": 30.0, "step_seconds": 1.0,
                     **{f"reward/{rule}": (i + 1) * step / steps / 4 for i, rule in enumerate(rules)},
                     **({"tool_use_frac": step / steps / 2} if tools else {})})
        if step % 10 == 0:
            rows.append({"step": step, "eval/accuracy": step / steps, "eval/n": 50})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_plot_gives_each_rule_its_colour_and_puts_legends_beside_the_axes(tmp_path):
    import matplotlib.colors
    import matplotlib.pyplot as plt

    from grpo_cli.commands.plot import draw

    rules = ["correctness", "step_format", "reflection_bonus"]
    figure = draw([_metrics(tmp_path / "a", rules), _metrics(tmp_path / "b", rules[:2])])
    try:
        figure.canvas.draw()
        reward = figure.axes[0]
        colours = {}
        for line in reward.lines:
            run, series = line.get_label().split(" ", 1)
            colours.setdefault(series, set()).add(matplotlib.colors.to_hex(line.get_color()))
        assert set(colours) == {"total", *rules}
        assert all(len(c) == 1 for c in colours.values()), colours  # a rule keeps its colour from run to run
        assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # and no two share one
        legends = [axis for axis in figure.axes if axis.get_legend() is not None]
        assert len(legends) == 5  # two runs: every panel with curves tells them apart (no diversity logged here)
        for axis in legends:
            box, legend = axis.get_window_extent(), axis.get_legend().get_window_extent()
            assert legend.x0 >= box.x1 or legend.y1 <= box.y0 or legend.x1 <= box.x0 or legend.y0 >= box.y1, \
                f"the legend of {axis.get_title()!r} lies over its curves"
            others = [o.get_window_extent() for o in figure.axes if o is not axis]
            assert not any(legend.overlaps(o) for o in others), f"the legend of {axis.get_title()!r} covers a panel"
    finally:
        plt.close(figure)


@pytest.fixture
def hub(monkeypatch, tiny_model_path):
    """The hub as validate meets it: `cached` says whether the model's config is in the local cache, `answers`
    whether the hub answers; a config fetched from the hub itself takes 30 s, as retries offline do."""
    import time

    import huggingface_hub.utils
    import transformers
    from huggingface_hub import constants

    from grpo_cli.model import builtin as builtin_model

    state = {"cached": False, "answers": False, "probes": 0, "fetched": 0}

    def from_pretrained(name, local_files_only=False, **kwargs):
        if local_files_only:
            if not state["cached"]:
                raise OSError(f"{name} is not in the cache")
        else:
            state["fetched"] += 1
            time.sleep(30)
        return builtin_model.build_config(builtin_model.build_tokenizer())

    class Session:
        def head(self, url, timeout=None):
            state["probes"] += 1
            assert timeout is not None and timeout <= 10
            if not state["answers"]:
                raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Session)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests set HF_HUB_OFFLINE=1; a newcomer has not
    return state


def _validate_hub_model(tmp_path):
    import time

    path = tmp_path / "r.yaml"
    path.write_text("model: {name: some-org/some-model}\n")
    started = time.perf_counter()
    result = runner.invoke(app, ["validate", str(path)], terminal_width=400)
    return result, time.perf_counter() - started


def test_validate_offline_says_what_to_do_at_once_instead_of_retrying(hub, tmp_path):
    result, seconds = _validate_hub_model(tmp_path)
    assert result.exit_code == 0 and "valid." in result.output  # the recipe is fine; only the estimate is missing
    assert seconds < 5 and hub["probes"] == 1 and hub["fetched"] == 0
    text = " ".join(result.output.split())
    assert "some-org/some-model is not in the local Hugging Face cache" in text and "does not answer" in text
    assert "hf download some-org/some-model" in text and "HF_HUB_OFFLINE=1" in text and "hf auth login" in text


def test_validate_reads_a_cached_config_without_the_network(hub, tmp_path):
    hub["cached"] = True
    result, seconds = _validate_hub_model(tmp_path)
    assert result.exit_code == 0 and "estimated peak" in result.output, result.output
    assert hub["probes"] == 0 and hub["fetched"] == 0 and seconds < 5


def test_validate_with_hf_hub_offline_set_does_not_ask_the_hub(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result, _ = _validate_hub_model(tmp_path)
    assert "HF_HUB_OFFLINE is set, so the hub is not asked" in " ".join(result.output.split())
    assert hub["probes"] == 0 and hub["fetched"] == 0


def test_validate_fetches_from_the_hub_when_it_answers(hub, tmp_path, monkeypatch):
    import time

    hub["answers"] = True
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    result, _ = _validate_hub_model(tmp_path)
    assert result.exit_code == 0 and "estimated peak" in result.output, result.output
    assert hub["probes"] == 1 and hub["fetched"] == 1


def test_transcripts_show_code_and_output_apart():
    from grpo_cli.run.console import TRANSCRIPT_STYLES, _transcript

    shown = _transcript("Compute.\n```python\nprint(17 * 23)\n```\n```output\n391\n```\n#### 391")
    assert shown.plain == "Compute. ```python print(17 * 23) ``` ```output 391 ``` #### 391"
    styled = {shown.plain[span.start : span.end]: span.style for span in shown.spans}
    assert styled == {"```python print(17 * 23) ```": TRANSCRIPT_STYLES["code"],
                      "```output 391 ```": TRANSCRIPT_STYLES["output"]}
    assert _transcript("x" * 500, limit=50).plain.endswith("...") and len(_transcript("x" * 500, limit=50).plain) == 50


def test_plot_shows_the_share_that_ran_code_beside_accuracy_for_a_run_with_the_tool(tmp_path):
    import matplotlib.pyplot as plt

    from grpo_cli.commands.plot import draw

    figure = draw([_metrics(tmp_path / "tools", ["correctness"], tools=True), _metrics(tmp_path / "text", ["correctness"])])
    try:
        accuracy = figure.axes[1]
        labels = [line.get_label() for line in accuracy.lines]
        assert "tools ran code (sampled)" in labels and "text ran code (sampled)" not in labels
        line = accuracy.lines[labels.index("tools ran code (sampled)")]
        assert list(line.get_ydata())[-1] == 0.5 and line.get_linestyle() == "--"
    finally:
        plt.close(figure)
