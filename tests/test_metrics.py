"""The step's figures: one catalogue of names, one place for the collectives, a row built from hand-made values."""

import numpy as np
import pytest
import torch

from conftest import ROOT
from grpo_cli.run import metrics
from grpo_cli.run.metrics import CATALOGUE, StepFigures, gather, step_row
from grpo_cli.commands.plot import PANELS
from grpo_cli.update import sampler_correction
from grpo_cli.update.policy import UpdateStats


def figures(**overrides) -> StepFigures:
    values = dict(
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64),
        scores=np.array([[1.0, 0.2], [0.0, 0.0], [1.0, np.nan], [0.0, 0.4]]),
        rules=["correctness", "step_format"],
        texts=["4", "5", "5", "5"],
        lengths=torch.tensor([10, 20, 30, 40]),
        truncated=torch.tensor([0.0, 0.0, 0.0, 1.0]),
        overlong=torch.zeros(4, dtype=torch.float64),
        kls=torch.tensor([0.1, 0.3]),
        entropies=torch.tensor([1.0, 2.0]),
        losses=[0.5, 1.5],
        clipped_tokens=5.0,
        tokens=20.0,
        score_errors=0,
        score_timeouts=1,
        peak_memory_gib=1.25,
        tool_use=None,
        tool_wait_seconds=0.0,
        tool_restarts=0,
        mismatch=sampler_correction.combine(torch.empty(0, len(sampler_correction.FIELDS))),
    )
    return StepFigures(**{**values, **overrides})


def row_of(f: StepFigures, **overrides) -> dict:
    settings = dict(rule_keys=["correctness", "step_format"], group_size=2, zero_std=torch.tensor([False, True]),
                    stats=UpdateStats(grad_norms=[2.0, 4.0]), lr=1e-4, sampled=None, dynamic_sampling=False,
                    overlong_on=False, seconds={"step": 2.0, "rollout": 0.5, "score": 0.25, "update": 1.0}, elapsed=9.0)
    return step_row(7, f, **{**settings, **overrides})


def test_a_row_from_hand_made_figures():
    row = row_of(figures())
    assert row["step"] == 7
    assert row["reward_mean"] == pytest.approx(0.5) and row["reward_std"] == pytest.approx(np.sqrt(0.125))
    assert row["reward/correctness"] == pytest.approx(0.5)
    assert row["reward/step_format"] == pytest.approx(0.2)  # the skipped (NaN) completion is left out
    assert row["accuracy"] == 0.5
    assert row["kl"] == pytest.approx(0.2) and row["entropy"] == pytest.approx(1.5)
    assert row["clip_frac"] == 0.25 and row["loss"] == 1.0 and row["grad_norm"] == 3.0
    assert row["completion_len"] == 25.0 and row["tokens_per_second"] == 50.0
    assert row["truncated_frac"] == 0.25 and row["frac_zero_std"] == 0.5
    assert row["answer_diversity"] == pytest.approx(0.75)  # groups (4, 5): 2 answers of 2, (5, 5): 1 of 2
    assert row["update_seconds"] == 1.0 and row["step_seconds"] == 2.0  # each as timed
    assert row["score_timeouts"] == 1 and row["peak_memory_gib"] == 1.25
    assert "skipped_update" not in row and "reward/overlong" not in row and "dropped_groups" not in row


def test_thinking_lengths_only_when_a_completion_thinks():
    assert "think_len" not in row_of(figures()) and "answer_len" not in row_of(figures())
    texts = ["<think>abcd</think> #### 4",  # thinks 4 characters, answers 6
             "ab</think>\n#### 44<|im_end|>junk",  # the template opened the block: 2, then 7 (end of turn)
             "<think>still thinking",  # never closed: no parts to measure
             "#### 5"]  # no thinking
    row = row_of(figures(texts=texts))
    assert row["think_len"] == 3.0 and row["answer_len"] == 6.5


def test_kl_is_null_without_a_reference_pass_and_optional_columns_follow_their_settings():
    row = row_of(figures(kls=torch.empty(0), overlong=torch.full((4,), -0.5, dtype=torch.float64)),
                 overlong_on=True, stats=UpdateStats(grad_norms=[1.0], problems=["loss"]))
    assert row["kl"] is None
    assert row["reward/overlong"] == -0.5
    assert row["skipped_update"] == "loss"


def test_tool_columns_from_hand_made_calls():
    # per completion: calls, errors, timeouts, refused, seconds, tool-output tokens
    use = torch.tensor([[2, 1, 0, 0, 0.5, 12], [0, 0, 0, 0, 0.0, 0], [1, 0, 1, 1, 5.0, 9], [1, 0, 0, 0, 0.1, 5]],
                       dtype=torch.float64)
    row = row_of(figures(tool_use=use, tool_wait_seconds=0.25, tool_restarts=1))
    assert row["tool_calls"] == 1.0 and row["tool_use_frac"] == 0.75
    assert row["tool_errors"] == 0.25  # 1 error of 4 calls; the timeout is counted apart
    assert row["tool_timeouts"] == 1 and row["tool_refused"] == 1
    assert row["tool_tokens"] == pytest.approx(6.5) and row["tool_seconds"] == pytest.approx(5.6)
    assert row["tool_wait_seconds"] == 0.25 and row["tool_restarts"] == 1
    assert not any(key.startswith("tool_") for key in row_of(figures()))


def test_every_written_column_is_catalogued():
    row = row_of(figures(tool_use=torch.ones(4, 6, dtype=torch.float64)), dynamic_sampling=True, overlong_on=True,
                 sampled=type("Sampled", (), {"dropped_groups": 1, "rounds": 2, "sampled_accuracy": 0.5})(),
                 stats=UpdateStats(grad_norms=[1.0], problems=["gradients"]))
    assert all(metrics.known(key) for key in row)
    assert {"dropped_groups", "sampling_rounds", "sampled_accuracy", "skipped_update", "reward/overlong"} <= set(row)


def test_the_row_builder_refuses_a_column_missing_from_the_catalogue(monkeypatch):
    monkeypatch.setattr(metrics, "CATALOGUE", {k: v for k, v in CATALOGUE.items() if k != "clip_frac"})
    with pytest.raises(AssertionError, match="clip_frac"):
        row_of(figures())


def test_the_documentation_shows_the_catalogue():
    document = (ROOT / "docs" / "runs.md").read_text()
    assert metrics.markdown_table() in document, "paste grpo_cli.run.metrics.markdown_table() into docs/runs.md"


def test_the_console_and_the_plot_read_catalogued_names():
    # reward_mean with each reward/<rule>; accuracy with eval/accuracy; the sampler's ratio min, mean and max
    composite = {"reward", "accuracy", "sampler_ratio"}
    assert all(key in CATALOGUE or key in composite for key, _ in PANELS)
    assert all(m.name in CATALOGUE for m in metrics.DASHBOARD)
    assert {"reward_mean", "accuracy", "kl", "truncated_frac"} <= {m.name for m in metrics.DASHBOARD}


def test_the_sampler_figures_reach_the_dashboard_only_when_they_matter():
    from grpo_cli.run.console import dashboard
    from rich.console import Console

    def shown(**values):
        console = Console(width=200, record=True)
        console.print(dashboard({**row_of(figures()), **values}, None, None))
        return console.export_text()

    agreeing = shown(sampler_kl=3e-12, sampler_ratio_outside=0.0)
    assert "sampler KL" not in agreeing and "ratio outside" not in agreeing  # float32: rounding, not a finding
    apart = shown(sampler_kl=2.5e-3, sampler_ratio_outside=0.004)
    assert "sampler KL" in apart and "2.5e-03" in apart and "0.40%" in apart


def test_a_row_with_the_sampler_figures(tmp_path):
    trainer = torch.log(torch.tensor([[0.5, 0.2, 0.4]]))
    sampler = torch.log(torch.tensor([[0.5, 0.5, 0.1]]))  # ratios 1, 0.4, 4
    mask = torch.ones(1, 3)
    correction = sampler_correction.Correction(method="mask")
    row = row_of(figures(mismatch=sampler_correction.mismatch_sums(trainer, sampler, mask, correction)),
                 correction=correction)
    assert row["sampler_ratio_outside"] == pytest.approx(2 / 3)
    assert row["sampler_corrected_frac"] == pytest.approx(2 / 3)
    assert row["sampler_ratio_min"] == pytest.approx(0.4) and row["sampler_ratio_max"] == pytest.approx(4.0)
    assert "sampler_kl" not in row_of(figures())  # nothing measured (no update ran): no column
    from grpo_cli.commands.plot import plot_runs
    from grpo_cli.run.log import METRICS

    import json
    (tmp_path / METRICS).write_text(json.dumps(row) + "\n")
    assert plot_runs([tmp_path], tmp_path / "curves.png").stat().st_size > 0


class RecordingWorld:
    """One process that writes down each collective it is asked to make."""

    size, rank = 1, 0

    def __init__(self):
        self.calls = []

    def all_gather(self, tensor):
        self.calls.append(("all_gather", tensor.dim()))
        return tensor

    def all_gather_objects(self, items):
        self.calls.append(("all_gather_objects",))
        return items

    def reduce(self, value, op="sum"):
        self.calls.append(("reduce", op))
        return value


class FakeScores:
    def __init__(self, n):
        self.values, self.rules, self.errors, self.timeouts = np.zeros((n, 1)), ("correctness",), 0, 0


class FakeRollout:
    def __init__(self, n):
        self.texts, self.lengths, self.truncated = ["x"] * n, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        self.action_lengths, self.tool_use = self.lengths, None


@pytest.mark.parametrize("with_kl", [True, False])
def test_gather_makes_the_same_collectives_whatever_a_process_holds(with_kl):
    """Processes that made different calls would hang: the calls may not depend on the recipe or the data."""
    calls = []
    for n, kl in ((4, with_kl), (2, not with_kl)):
        world = RecordingWorld()
        stats = UpdateStats(losses=[1.0], grad_norms=[1.0], entropies=[torch.ones(n)],
                            kls=[torch.ones(n)] if kl else [])
        gather(world, rewards_all=torch.zeros(n), scores=FakeScores(n), rollout=FakeRollout(n),
               overlong=torch.zeros(n), stats=stats, peak_memory_gib=1.0)
        calls.append(world.calls)
    assert calls[0] == calls[1] and len(calls[0]) >= 10
