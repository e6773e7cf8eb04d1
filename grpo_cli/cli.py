"""The `grpo` command: wires each subcommand to a plain function and turns user mistakes into messages."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

from grpo_cli import __version__
from grpo_cli.config.defaults import (EVAL_BATCH_SIZE, EVAL_DEVICE, EVAL_SAMPLES, EVAL_SEED, EVAL_TEMPERATURE,
                                      EVAL_TOP_P, NAMED_SET_MAX_NEW_TOKENS, TOOL_MAX_CALLS, TOOL_MEMORY_MB,
                                      TOOL_TIMEOUT_S)
from grpo_cli.errors import UserError
from grpo_cli.run.guard import EXIT_CODES, NAMES, Terminated, terminate_at_once


def _shown_type(param) -> str | None:
    """What --help shows after an option: its metavar (FILE, N, KEY=VALUE); nothing for a flag, whose name is all
    there is to type, or for an argument, whose name says what it is. Not Typer's type tags (<bool>, <list[str]>)."""
    if param.param_type_name == "argument" or getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    return param.metavar or "VALUE"


class _PlainHelp:
    """--help that reads plainly: every parameter's type column as _shown_type says, the ones Typer adds itself
    (--help, --install-completion) included."""

    def format_help(self, ctx, formatter):
        for param in self.get_params(ctx):
            param.display_type_rich = lambda ctx, shown=_shown_type(param): shown
        return super().format_help(ctx, formatter)


class PlainCommand(_PlainHelp, TyperCommand):
    pass


class PlainGroup(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(
    cls=PlainGroup,
    help="Fine-tune language models with GRPO from YAML recipes.\n\n"
    "Start with: grpo train recipes/quickstart.yaml (or simply: grpo train quickstart)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(
    cls=PlainGroup,
    help="List the shipped recipes, a line each; show one.\n\nExample: grpo recipes;  grpo recipes show quickstart",
    invoke_without_command=True,
)
app.add_typer(recipes_app, name="recipes")
sandbox_app = typer.Typer(
    cls=PlainGroup,
    help="The code tool's sandbox (docs/tools.md): run a file as a rollout's tool call would.\n\n"
    "Example: grpo sandbox run attempt.py --timeout 2",
    no_args_is_help=True,
)
app.add_typer(sandbox_app, name="sandbox")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"grpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


_SIGNALS = {code: signum for signum, code in EXIT_CODES.items()}  # an exit code -> the signal that stops with it


def _stopped_by_signal(exit_code: int, what: str) -> None:
    """Ctrl-C or SIGTERM outside a training loop: a line saying what the stop left, no traceback; the exit code
    is the signal's (guard.EXIT_CODES)."""
    typer.secho(f"stopped by {NAMES[_SIGNALS[exit_code]]}; {what}", err=True, fg=typer.colors.YELLOW)
    raise typer.Exit(exit_code)


def _fail(error: UserError) -> None:
    from grpo_cli.run.guard import Stopped

    where = f"[rank {_rank()}] " if _rank() else ""
    if isinstance(error, Stopped):
        if not _rank():
            typer.secho(str(error), err=True, fg=typer.colors.YELLOW)
    else:
        typer.secho(f"{where}error: {error}", err=True, fg=typer.colors.RED)
    raise typer.Exit(error.exit_code)


@contextlib.contextmanager
def _reported(stopped: str | None = None, *, interrupted: str | None = None):
    """How a command ends early, the same in every command, never with a traceback: a UserError as its message
    and its exit code (_fail); Ctrl-C or SIGTERM as "stopped by <signal>; <stopped>" (what the stop left) and the
    signal's exit code (guard.EXIT_CODES). `interrupted` is the whole line for Ctrl-C where there is more to say.
    Without `stopped`, Ctrl-C and SIGTERM are not caught here."""
    try:
        yield
    except UserError as error:
        _fail(error)
    except (KeyboardInterrupt, Terminated) as stop:
        if stopped is None:
            raise
        signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM
        if signum == signal.SIGINT and interrupted is not None:
            typer.secho(interrupted, err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(EXIT_CODES[signum]) from None
        _stopped_by_signal(EXIT_CODES[signum], stopped)


@app.command(cls=PlainCommand)
def train(
    recipe: Path = typer.Argument(...,
                                  help="The YAML recipe, e.g. recipes/quickstart.yaml, or a shipped recipe's name."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="Override a recipe value: --set grpo.kl_beta=0.02 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the final summary."),
) -> None:
    """Train with GRPO as the recipe says.

    Example: grpo train recipes/quickstart.yaml --set train.steps=50
    """
    from grpo_cli.config import catalog
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.run.console import TrainConsole
    from grpo_cli.run.train import train as run_training

    with _reported("training had not started its first step, so there was nothing to save.",
                   interrupted="interrupted; the last complete checkpoint (if any) is intact: continue with --resume."):
        recipe = catalog.resolve(recipe)
        loaded = recipe_module.load(recipe, set_)
        console = TrainConsole(quiet=quiet)
        summary = run_training(loaded, resume=resume, recipe_dir=recipe.resolve().parent, console=console,
                               recipe_file=recipe)
    if _rank():
        return  # under torchrun the first process reports
    moved = ""
    if summary.eval_first is not None and summary.eval_last is not None:
        moved = f"; held-out accuracy {summary.eval_first:.1%} -> {summary.eval_last:.1%}"
    if summary.best is not None:
        moved += f" (best: {summary.best['checkpoint']}, {summary.best['accuracy']:.1%} held-out)"
    typer.echo(
        f"done: {summary.step} steps in {summary.seconds:.0f}s{moved}; "
        f"checkpoint {summary.checkpoint}; metrics {summary.run_dir / 'metrics.jsonl'}"
    )


@app.command("eval", cls=PlainCommand)
def eval_command(
    model: str = typer.Option(None, "--model", "-m", metavar="MODEL",
                              help="Run directory, checkpoint, model directory, hub id or builtin:tiny-math."),
    best: bool = typer.Option(False, "--best",
                              help="With a run directory: its best checkpoint (highest held-out accuracy, "
                                   "output.keep_best), not its latest."),
    data: str = typer.Option(None, "--data", "-d", metavar="DATA",
                             help="gsm8k, math500, builtin:arithmetic-test, a .jsonl/.json/.csv/.parquet file or a hub dataset; default: the run's eval set."),
    data_file: str = typer.Option(None, "--data-file", metavar="FILE",
                                  help="A local copy of gsm8k or math500 (otherwise read from the hub)."),
    predictions: str = typer.Option(None, "--predictions", metavar="FILE",
                                    help="Grade completions from a .jsonl file (answer + completion or completions); no model is loaded."),
    samples: int = typer.Option(EVAL_SAMPLES, "--samples", "-k", metavar="K",
                                help="Completions per problem: 1 = greedy pass@1; k > 1 adds mean accuracy, maj@k and pass@k."),
    limit: int = typer.Option(None, "--limit", metavar="N", help="Only the first N problems."),
    output: Path = typer.Option(None, "--output", "-o", metavar="FILE",
                                help="Write results (figures, settings, one record per row) as JSON."),
    max_new_tokens: int = typer.Option(
        None, "--max-new-tokens", metavar="N",
        help=f"Default: {', '.join(f'{n} for {name}' for name, n in NAMED_SET_MAX_NEW_TOKENS.items())}, else the "
             "run's recipe."),
    temperature: float = typer.Option(EVAL_TEMPERATURE, metavar="T", help="Sampling temperature when --samples > 1."),
    top_p: float = typer.Option(EVAL_TOP_P, "--top-p", metavar="P", help="Nucleus sampling when --samples > 1."),
    batch_size: int = typer.Option(EVAL_BATCH_SIZE, "--batch-size", metavar="N", help="Prompts per generation batch."),
    seed: int = typer.Option(EVAL_SEED, metavar="N", help="Seed for sampling."),
    template: str = typer.Option(None, metavar="TEMPLATE",
                                 help="Prompt format string over the row's fields, e.g. 'Q: {question}\\nA:'."),
    system_prompt: str = typer.Option(None, "--system-prompt", metavar="TEXT", help="System message for chat prompts."),
    chat: bool = typer.Option(None, "--chat/--no-chat",
                              help="Use the tokenizer's chat template (default: when it has one)."),
    template_kwargs: list[str] = typer.Option(
        [], "--chat-template-kwarg", metavar="KEY=VALUE",
        help="A chat template variable, e.g. enable_thinking=true (repeatable; default: the run's)."),
    device: str = typer.Option(EVAL_DEVICE, metavar="DEVICE", help="auto, cpu or cuda."),
    dtype: str = typer.Option(None, metavar="DTYPE",
                              help="float32, bfloat16, float16 or auto (default: the run's, else auto)."),
    tools: str = typer.Option(None, "--tools", metavar="TOOL",
                              help="python: the model may run code in a sandbox (Qwen2.5-Math's tool-integrated "
                                   "format); none: no tool. Default: the run's grpo.tools, else none."),
    max_tool_calls: int = typer.Option(None, "--max-tool-calls", metavar="N",
                                       help=f"With --tools: calls per completion (default: the run's, else "
                                            f"{TOOL_MAX_CALLS})."),
    tool_timeout: float = typer.Option(None, "--tool-timeout", metavar="SECONDS",
                                       help=f"With --tools: wall-clock limit of one call (default: the run's, "
                                            f"else {TOOL_TIMEOUT_S:g})."),
) -> None:
    """Measure accuracy on a math set, or grade given completions.

    Examples: grpo eval --model runs/quickstart --limit 50;
    grpo eval --model Qwen/Qwen2.5-0.5B-Instruct --data gsm8k --samples 8 --output results.json;
    grpo eval --predictions completions.jsonl
    """
    import json

    from rich.console import Console

    from grpo_cli.commands.benchmark import EvalOptions, parse_template_kwargs, run
    from grpo_cli.run.console import TaskProgress, print_eval
    from grpo_cli.run.log import write_whole

    console = Console()
    with _reported():
        variables = parse_template_kwargs(template_kwargs) if template_kwargs else None
    options = EvalOptions(model=model, data=data, data_file=data_file, predictions=predictions, samples=samples,
                          limit=limit, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          batch_size=batch_size, seed=seed, template=template, system_prompt=system_prompt, chat=chat,
                          chat_template_kwargs=variables, device=device, dtype=dtype, best=best,
                          tools=None if tools is None else [t.strip() for t in tools.split(",") if t.strip() != "none"],
                          max_tool_calls=max_tool_calls, tool_timeout_s=tool_timeout)
    with _reported("nothing was written" if output is None else f"{output} was not written."), \
            terminate_at_once(), TaskProgress(console, "generate") as progress:
        evaluation = run(options, on_progress=progress.update,
                         on_message=lambda text: console.print(text, highlight=False))
        results = evaluation.results()
        if output is not None:
            write_whole(output, json.dumps(results, indent=1, ensure_ascii=False))
    print_eval(console, results)
    if output is not None:
        console.print(f"results written to {output}", highlight=False)


@app.command(cls=PlainCommand)
def score(
    recipe: Path = typer.Argument(...,
                                  help="The recipe whose reward rules and weights to use (a file or a shipped recipe's name)."),
    completions: Path = typer.Argument(...,
                                       help=".jsonl/.json/.csv/.parquet rows: the prompt field (or 'prompt'), the answer field (or 'answer'), and 'completion' or 'completions'."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="Override a recipe value, e.g. --set rewards.1.weight=0.5."),
    output: Path = typer.Option(None, "--output", "-o", metavar="FILE", help="Also write the scores as JSON."),
) -> None:
    """Score completions with the recipe's reward rules, grouped per prompt, as training would.

    Example: grpo score recipes/quickstart.yaml my_completions.jsonl
    """
    import dataclasses
    import json

    from rich.console import Console

    from grpo_cli.config import catalog
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.run.console import print_scores
    from grpo_cli.run.log import write_whole
    from grpo_cli.commands.score import score_completions

    with _reported("nothing was written" if output is None else f"{output} was not written."), terminate_at_once():
        recipe = catalog.resolve(recipe)
        loaded = recipe_module.load(recipe, set_)
        groups = score_completions(loaded, completions, recipe.resolve().parent)
        if output is not None:
            write_whole(output, json.dumps([dataclasses.asdict(g) for g in groups], indent=1, ensure_ascii=False))
    print_scores(Console(), groups, [r.key for r in loaded.rewards])


@app.command(cls=PlainCommand)
def export(
    source: str = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    best: bool = typer.Option(False, "--best",
                              help="Export the run directory's best checkpoint (highest held-out accuracy, "
                                   "output.keep_best), not its latest."),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Directory to write the model to."),
    dtype: str = typer.Option(None, metavar="DTYPE",
                              help="float32, bfloat16 or float16 (default: the recipe's; auto -> bfloat16)."),
    export_format: str = typer.Option(None, "--format", metavar="FORMAT",
                                      help="safetensors: the model with the LoRA adapters merged in, which plain "
                                           "transformers loads (the default); adapter: the LoRA adapter alone, in "
                                           "the PEFT layout (LoRA runs); gguf: one GGUF file and an Ollama "
                                           "Modelfile, for llama.cpp, Ollama and LM Studio."),
    quant: str = typer.Option(None, "--quant", metavar="TYPE",
                              help="--format gguf's type: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0; "
                                   "q6_k, q5_k_m, q4_k_m with llama-cpp-python installed."),
    verifier: str = typer.Option(None, "--verifier", metavar="NAME",
                                 help="--format gguf's check: auto (llama.cpp where llama-cpp-python is installed, "
                                      "else transformers' GGUF reader), llama.cpp or transformers."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="The same as --format adapter."),
    force: bool = typer.Option(False, "--force",
                               help="Replace --out if it holds an earlier export (nothing else is ever deleted)."),
) -> None:
    """Merge the trained adapters into the base and save a model plain transformers loads (or, with --format adapter,
    the adapter alone; with --format gguf, a GGUF file for llama.cpp and Ollama); verified after writing.

    Example: grpo export runs/quickstart --out models/quickstart;  grpo export runs/smollm2 --out m --format gguf
    --quant q8_0
    """
    from grpo_cli.export.build import export as run_export

    with _reported(f"{out} was not written (nothing half-written is left)."), terminate_at_once():
        if adapter_only:  # the older spelling of --format adapter
            if export_format not in (None, "adapter"):
                raise UserError(f"--adapter-only is short for --format adapter; it cannot go with --format "
                                f"{export_format}. Pass one of them.")
            export_format = "adapter"
        exported = run_export(source, out, dtype=dtype, format=export_format, force=force, best=best, quant=quant,
                              verifier=verifier)
    source_said = 'the adapter' if exported.step is None else f'step {exported.step}'
    typer.echo(f"exported {source_said} as a {exported.label} to {exported.out}; verified: "
               f"{exported.check.summary()}")


@app.command(cls=PlainCommand)
def plot(
    runs: list[Path] = typer.Argument(..., help="One or more run directories (finished or in progress)."),
    out: Path = typer.Option(None, "--out", "-o", metavar="PNG",
                             help="PNG to write; default: plot.png in the (first) run directory."),
) -> None:
    """Draw reward per rule, accuracy (train and held-out), KL, length, step time and diversity over steps.

    Example: grpo plot runs/quickstart;  grpo plot runs/a runs/b --out compare.png
    """
    from grpo_cli.commands.plot import plot_runs

    with _reported():
        written = plot_runs(runs, out or runs[0] / "plot.png")
    typer.echo(f"wrote {written}")


@app.command(cls=PlainCommand)
def samples(
    run: Path = typer.Argument(..., help="A run directory."),
    step: int = typer.Option(None, metavar="STEP", help="A logged step; default the latest."),
) -> None:
    """Read the completions a run logged, with each rule's reward, the total and the advantage.

    Example: grpo samples runs/quickstart --step 40
    """
    from rich.console import Console

    from grpo_cli.run.console import print_scores
    from grpo_cli.commands.score import logged_groups

    with _reported():
        shown, groups = logged_groups(run, step)
    rules = list(dict.fromkeys(k for g in groups for c in g.completions for k in c.rewards))
    Console().print(f"step {shown}", style="bold")
    print_scores(Console(), groups, rules, title="prompt")


@recipes_app.callback()
def recipes_list(context: typer.Context) -> None:
    """List the shipped recipes, a line each.

    Example: grpo recipes;  grpo recipes show quickstart
    """
    if context.invoked_subcommand is not None:
        return
    from grpo_cli.config.catalog import shipped

    width = max(len(r.name) for r in shipped())
    for recipe in shipped():
        typer.echo(f"{recipe.name.ljust(width)}  {recipe.summary}")
    # The memory a recipe needs depends on the machine (dtype, CUDA or not): one source, the estimate.
    typer.echo("\nMemory: grpo validate NAME estimates it for this machine, before anything heavy loads.")


@recipes_app.command("show", cls=PlainCommand)
def recipes_show(name: str = typer.Argument(..., help="A name from grpo recipes.")) -> None:
    """Print a shipped recipe.

    Example: grpo recipes show quickstart > my-recipe.yaml
    """
    from grpo_cli.config.catalog import find

    with _reported():
        typer.echo(find(name).read_text(), nl=False)


@app.command(cls=PlainCommand)
def validate(
    recipe: Path = typer.Argument(..., help="The YAML recipe, or a shipped recipe's name."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a recipe value (repeatable)."),
) -> None:
    """Check a recipe and its data, and show what it would train: resolved values, the prompts read with the
    model's tokenizer, parameters, estimated peak memory.

    Example: grpo validate recipes/qwen2.5-0.5b-gsm8k-lora.yaml
    """
    import torch
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    from grpo_cli.config import catalog
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.data.check import Skipped, check_data
    from grpo_cli.commands.estimate import count_parameters, estimate, model_config

    from grpo_cli.trackers.sink import check_installed

    console = Console()
    with _reported():
        recipe = catalog.resolve(recipe)
        loaded = recipe_module.load(recipe, set_)
        check_installed(loaded.output.trackers)  # as `grpo train` does before the model loads
    console.print(Syntax(recipe_module.dump(loaded), "yaml", background_color="default"))
    config = no_config = None
    try:
        config = model_config(loaded)
    except UserError as error:  # a hub model neither cached nor reachable: the recipe is still valid
        no_config = (f"could not read the model's config, which the parameter count and memory estimate need: "
                     f"{error}")
    except Exception as exc:
        no_config = (f"could not read the model's config ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                     "the parameter count and memory estimate need it.")
    with _reported():
        try:
            checked = check_data(loaded, config, recipe.resolve().parent)  # what training would refuse fails here
        except Skipped as why:
            checked = None
            console.print(f"data check skipped: {why}.", style="yellow", highlight=False)
    if loaded.grpo.tools:
        with _reported():  # a machine that cannot confine the tool's code makes the recipe unusable here
            print_sandbox(console, loaded.grpo)
    console.print(f"{recipe}: valid.", style="green")
    if checked is not None:
        print_data_check(console, checked)
    if no_config is not None:
        console.print(no_config, style="yellow", highlight=False)
        return
    if checked is not None:
        from grpo_cli.data.prompt_room import with_max_new_tokens

        loaded = with_max_new_tokens(loaded, checked.max_new_tokens)  # auto resolved, for the memory estimate
    total, trainable = count_parameters(loaded, config)
    on_gpu = loaded.model.device == "cuda" or (loaded.model.device == "auto" and torch.cuda.is_available())
    guess = estimate(loaded, config, total, trainable, on_gpu=on_gpu,
                     prompt_tokens=checked.longest if checked is not None else None)
    table = Table(title="what it trains, and an estimate of peak memory", title_justify="left")
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("parameters", f"{total:,}")
    table.add_row("trainable", f"{trainable:,} ({trainable / total:.2%})")
    for part, gib in guess.parts.items():
        table.add_row(part, f"{gib:.2f} GiB")
    table.add_row("estimated peak", f"{guess.total_gib:.2f} GiB")
    console.print(table)


@sandbox_app.command("run", cls=PlainCommand)
def sandbox_run(
    file: Path = typer.Argument(..., metavar="FILE.py", help="Python to run, as the code of one ```python block."),
    timeout: float = typer.Option(TOOL_TIMEOUT_S, "--timeout", metavar="S",
                                  help="Wall-clock limit of the call (grpo.tool_timeout_s)."),
    memory_mb: int = typer.Option(TOOL_MEMORY_MB, "--memory-mb", metavar="M",
                                  help="Address-space limit of the call, in MB (grpo.tool_memory_mb)."),
) -> None:
    """Run FILE.py exactly as a rollout's tool call runs, and print the output block the completion would get.

    The isolation layers in force on this machine go to stderr. Exit status: 0 when the code ran without error;
    1 when it raised, exited non-zero, timed out or was killed (the block says which); 2 for a mistake of yours,
    or when this machine cannot confine the code (the message says why and what to change).

    Example: grpo sandbox run attempt.py --timeout 2 --memory-mb 512
    """
    from grpo_cli.commands.sandbox_run import check_tool_limits, run_file

    with _reported("the call was ended with its sandbox."):
        check_tool_limits({"tool_timeout_s": "--timeout", "tool_memory_mb": "--memory-mb"},
                          tool_timeout_s=timeout, tool_memory_mb=memory_mb)
        ran = run_file(file, timeout_s=timeout, memory_mb=memory_mb)
    for layer, how in ran.isolation.items():
        typer.echo(f"{layer}: {how}", err=True)
    typer.echo(f"status: {ran.outcome.status} in {ran.outcome.seconds * 1000:.0f} ms", err=True)
    typer.echo(ran.block, nl=False)
    raise typer.Exit(0 if ran.outcome.status == "ok" else 1)


def print_sandbox(console, grpo) -> None:
    """What confines the tool's code on this machine: the sandbox started once, as training will start it."""
    from rich.table import Table

    from grpo_cli.rollout.with_tools import open_session

    with open_session(grpo.tools, grpo.max_tool_calls, grpo.tool_timeout_s, grpo.tool_memory_mb) as session:
        probe = session.sandbox.run("print(6 * 7)")
        table = Table(title="the code tool's sandbox on this machine (docs/tools.md)", title_justify="left")
        table.add_column("")
        table.add_column("", overflow="fold")
        for layer, how in session.isolation.items():
            table.add_row(layer, how)
        table.add_row("a call", f"print(6 * 7) -> {probe.shown()!r} in {probe.seconds * 1000:.0f} ms")
    console.print(table)


def print_data_check(console, checked) -> None:
    """The data as training will see it: prompts kept, the longest, and those that leave too little room."""
    from rich.table import Table

    train = checked.train
    table = Table(title="the data, read with the model's tokenizer", title_justify="left")
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row(f"training prompts kept ({train.name})", f"{len(train.items) - checked.too_long:,}")
    table.add_row("longest training prompt", f"{checked.longest:,} tokens")
    table.add_row("model context", f"{checked.context:,} tokens" if checked.context else "not stated")
    table.add_row("grpo.max_new_tokens", f"{checked.max_new_tokens:,}" + (" (auto)" if checked.auto else ""))
    table.add_row("prompts too long for the context", f"{checked.too_long:,}")
    if checked.eval is not None:
        table.add_row(f"held-out prompts ({checked.eval.name})", f"{len(checked.eval.items):,}")
    console.print(table)
    if train.skipped:
        console.print(f"note: {train.skip_note()}", style="yellow", highlight=False)
    if checked.too_long:
        console.print(f"note: {too_long_note(checked, len(train.items))}", style="yellow", highlight=False)


def too_long_note(checked, prompts: int) -> str:
    """The training prompts that leave too little of the context, which training skips, and what would keep them."""
    from grpo_cli.config.recipe import MIN_AUTO_MAX_NEW_TOKENS

    room = checked.context - checked.longest
    least = f"{MIN_AUTO_MAX_NEW_TOKENS} tokens" if checked.auto else \
        f"grpo.max_new_tokens ({checked.max_new_tokens}) tokens"
    why = f", and auto gives a completion at least {MIN_AUTO_MAX_NEW_TOKENS}" if checked.auto else ""
    # auto is the room the other prompts leave: a number keeps these, set (auto) or lowered
    keep = (f"{'Set' if checked.auto else 'Lower'} grpo.max_new_tokens to at most {room} to keep every prompt, or "
            "shorten the prompts." if room > 0 else "Shorten the prompts, or use a model with a longer context.")
    return (f"{checked.too_long} of {prompts} training prompts leave less than {least} of the model's "
            f"{checked.context}-token context (the longest prompt is {checked.longest} tokens{why}); training skips "
            f"them. {keep}")


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
