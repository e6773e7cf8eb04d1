"""The held-out evaluation inside a run: at the start, every eval_every steps and at the last step, greedy,
with the run's tool if it has one. Several processes each take every size-th item of the set."""

from __future__ import annotations

import signal

from grpo_cli.rewards.scoring import Scorer
from grpo_cli.rollout.settings import Sampling
from grpo_cli.run.evaluation import evaluate
from grpo_cli.run.guard import Dropped, Interrupts, Stopped
from grpo_cli.run.saving import record_best_if_improved
from grpo_cli.run.setup import Run


def evaluate_held_out(run: Run, scorer: Scorer, step: int) -> float:
    """Greedy accuracy on the held-out set, logged as step `step`'s."""
    world, policy, recipe = run.world, run.policy, run.recipe
    rank_items = run.eval_set.items[world.rank :: world.size]
    sampling = Sampling.for_evaluation(recipe.grpo.max_new_tokens, add_special_tokens=not recipe.data.chat)
    with run.parallel.gathered():  # the processes take different items: no lockstep
        report = evaluate(policy.model, policy.tokenizer, rank_items, sampling, scorer,
                          sampler=lambda tokenizer, prompts, sampling: run.parallel.generate(
                              tokenizer, prompts, sampling, run.tools, lockstep=False))
    correct = world.all_gather_objects([c for item in report.items for c in item.correct])
    accuracy, seconds = sum(correct) / len(correct), world.reduce(report.seconds, "max")
    timeouts = int(world.reduce(report.timeouts))
    run.log.metrics({"step": step, "eval/accuracy": accuracy, "eval/n": len(correct), "eval/seconds": seconds,
                     "eval/timeouts": timeouts})
    run.console.evaluation(step, accuracy, len(correct), seconds, timeouts)
    return accuracy


def first_evaluation(run: Run, scorer: Scorer, interrupts: Interrupts) -> None:
    """The base model's accuracy, step 0; a SIGTERM during it stops the run before anything was trained."""
    try:
        with interrupts.droppable():
            evaluate_held_out(run, scorer, 0)
    except Dropped:
        raise Stopped("stopped by SIGTERM during the first evaluation, before any training step; nothing to "
                      "save. Run the same command again to start.", signal.SIGTERM) from None


def evaluate_if_due(run: Run, scorer: Scorer, interrupts: Interrupts) -> None:
    """Every eval_every steps and at the last; a SIGTERM drops the evaluation (the step is trained and
    logged: it is saved and the run stops after)."""
    steps, every = run.recipe.train.steps, run.recipe.output.eval_every
    if run.eval_set is None or not (run.step % every == 0 or run.step == steps):
        return
    try:
        with interrupts.droppable():
            accuracy = evaluate_held_out(run, scorer, run.step)
    except Dropped:
        return
    record_best_if_improved(run, accuracy)
