"""The `grpo` command: wires each subcommand to a plain function and turns user mistakes into messages."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from grpo_cli import __version__
from grpo_cli.errors import UserError

app = typer.Typer(
    help="Fine-tune language models with GRPO from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"grpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def _fail(error: UserError) -> None:
    typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
    raise typer.Exit(error.exit_code)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="The YAML recipe, e.g. recipes/quickstart.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set grpo.kl_beta=0.02 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the final summary."),
) -> None:
    """Train with GRPO as the recipe says.

    Example: grpo train recipes/quickstart.yaml --set train.steps=50
    """
    from grpo_cli import recipe as recipe_module
    from grpo_cli.console import TrainConsole
    from grpo_cli.train import train as run_training

    try:
        loaded = recipe_module.load(recipe, set_)
        console = TrainConsole(quiet=quiet)
        summary = run_training(loaded, resume=resume, recipe_dir=recipe.resolve().parent, console=console)
    except UserError as error:
        _fail(error)
    moved = ""
    if summary.eval_first is not None and summary.eval_last is not None:
        moved = f"; held-out accuracy {summary.eval_first:.1%} -> {summary.eval_last:.1%}"
    typer.echo(
        f"done: {summary.step} steps in {summary.seconds:.0f}s{moved}; "
        f"checkpoint {summary.checkpoint}; metrics {summary.run_dir / 'metrics.jsonl'}"
    )


def quiet_libraries() -> None:
    """Keep the console for our own output: no per-file progress bars from transformers,
    no notice from bitsandbytes about an optional CPU kernel package we do not use."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main() -> None:
    quiet_libraries()
    app(prog_name="grpo")


if __name__ == "__main__":
    main()
