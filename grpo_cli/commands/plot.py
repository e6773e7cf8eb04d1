"""`grpo plot`: a run's curves as one PNG, several runs overlaid to compare.

Reads metrics.jsonl as it is on disk, so it works on a finished run and on one in
progress (a torn last line is skipped).
"""

from __future__ import annotations

from pathlib import Path

from grpo_cli.errors import UserError
from grpo_cli.run.log import METRICS, read_jsonl

PANELS = [
    ("reward", "reward per rule"),
    ("accuracy", "accuracy (train, and held-out eval); tool use"),
    ("kl", "KL to the reference"),
    ("sampler_kl", "sampler vs trainer: k3 KL per token (mean, max)"),
    ("completion_len", "completion length (tokens)"),
    ("step_seconds", "step time (s)"),
    ("answer_diversity", "distinct answers per group"),
    ("sampler_ratio", "sampler vs trainer: ratio exp(trainer - sampler) (min, mean, max)"),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


RUN_STYLES = ["-", "--", ":", "-."]  # on the reward panel, where colour tells the rules apart


def _runs(run_dirs: list[Path]) -> list[tuple[Path, list[dict], list[dict]]]:
    runs = []
    for run_dir in run_dirs:
        rows = read_jsonl(Path(run_dir) / METRICS)
        if not rows:
            raise UserError(f"{run_dir} has no {METRICS} with rows yet; pass a run directory of grpo train.")
        runs.append((Path(run_dir), [r for r in rows if "reward_mean" in r], [r for r in rows if "eval/accuracy" in r]))
    return runs


def _reward_panel(axis, runs, several: bool) -> None:
    """The total and each rule in a colour of its own, the same rule in the same colour in every run; with
    several runs, the run is told by the line style."""
    rules = sorted({k for _, steps, _ in runs for r in steps for k in r if k.startswith("reward/")})
    for index, (run_dir, steps, _) in enumerate(runs):
        prefix = f"{run_dir.name} " if several else ""
        style = RUN_STYLES[index % len(RUN_STYLES)]
        axis.plot(*_series(steps, "reward_mean"), color="black", linewidth=2, linestyle=style, label=f"{prefix}total")
        for rule_index, rule in enumerate(rules):
            axis.plot(*_series(steps, rule), color=f"C{rule_index % 10}", linewidth=1.2, linestyle=style,
                      label=f"{prefix}{rule.removeprefix('reward/')}")


def _mismatch_lines(axis, steps: list[dict], keys: tuple[str, ...], color: str, label: str | None) -> None:
    """One line per key in the run's colour, told apart by style (the first solid)."""
    for key, style in zip(keys, ("-", "--", ":")):
        short = key.removeprefix("sampler_")
        axis.plot(*_series(steps, key), color=color, linestyle=style, label=f"{label} {short}" if label else short)


def draw(run_dirs: list[Path]):
    """The figure of panels for every run (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("grpo plot needs matplotlib: pip install matplotlib") from None
    runs = _runs(run_dirs)
    figure, axes = plt.subplots(2, 4, figsize=(22, 8), constrained_layout=True)
    several = len(runs) > 1
    for axis, (key, title) in zip(axes.flat, PANELS):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if key == "reward":
            _reward_panel(axis, runs, several)
        for index, (run_dir, steps, evals) in enumerate(runs):
            color = f"C{index}"
            label = run_dir.name if several else None
            if key == "accuracy":
                prefix = f"{label} " if label else ""
                axis.plot(*_series(steps, "accuracy"), color=color, alpha=0.6, label=f"{prefix}train (sampled)")
                axis.plot(*_series(evals, "eval/accuracy"), color=color, marker="o", linewidth=2,
                          label=f"{prefix}held-out (greedy)")
                if any("tool_use_frac" in r for r in steps):  # a share too: it reads on the same axis
                    axis.plot(*_series(steps, "tool_use_frac"), color=color, linestyle="--", linewidth=1.2,
                              label=f"{prefix}ran code (sampled)")
                axis.set_ylim(-0.02, 1.02)
            elif key == "sampler_kl":
                _mismatch_lines(axis, steps, ("sampler_kl", "sampler_kl_max"), color, label)
                if any(v > 0 for line in axis.lines for v in line.get_ydata()):
                    axis.set_yscale("log")  # 1e-12 in float32, 1e-3 in 16 bits: only a log axis shows both
            elif key == "sampler_ratio":
                _mismatch_lines(axis, steps, ("sampler_ratio_min", "sampler_ratio_mean", "sampler_ratio_max"),
                                color, label)
            elif key != "reward":
                axis.plot(*_series(steps, key), color=color, label=label)
        if not axis.lines or not any(len(line.get_xdata()) for line in axis.lines):
            axis.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=axis.transAxes,
                      color="gray")
        elif several or key in ("reward", "accuracy", "sampler_kl", "sampler_ratio"):
            # Beside the axes, never over a curve; constrained layout makes room for it.
            axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    figure.suptitle(", ".join(str(d) for d, _, _ in runs))
    return figure


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw the panels for every run into `out` (PNG); returns its path."""
    figure = draw(run_dirs)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
