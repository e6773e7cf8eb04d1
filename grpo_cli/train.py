"""`train(recipe)`: the GRPO loop, top to bottom.

Each step: take prompts_per_step prompts, sample group_size completions of each
(rollout), score them with the recipe's rules, turn rewards into group-relative
advantages, then take updates_per_rollout clipped policy-gradient steps on that
batch. Metrics go to metrics.jsonl every step; the held-out set is evaluated at
the start, every eval_every steps and at the end; checkpoints every save_every.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from grpo_cli import allocator, checkpoint, lora_linear
from grpo_cli.checkpoint import rng_state
from grpo_cli.advantages import group_advantages, overlong_penalty, total_reward
from grpo_cli.batching import AUTO_TOKENS, SPREAD, MicroBatch, split
from grpo_cli.console import TrainConsole
from grpo_cli.data import Example, Examples, PromptOrder, load_examples
from grpo_cli.distributed import Parallel, World, check_recipe, connect, disconnect
from grpo_cli.diversity import group_diversity
from grpo_cli.errors import UserError
from grpo_cli.guard import NAMES, Dropped, Interrupts, NonFiniteGuard, Stopped, out_of_memory, terminate_at_once
from grpo_cli.evaluation import evaluate
from grpo_cli.logprobs import can_share_prompts
from grpo_cli.modeling import load_policy
from grpo_cli.recipe import Recipe, changes, dump
from grpo_cli.recipe import load as load_recipe
from grpo_cli.rewards import rule_functions
from grpo_cli.rollout import Rollout
from grpo_cli.sampling import sample_step
from grpo_cli.run_log import METRICS, SAMPLES, RunLog, read_jsonl, tensorboard_writer
from grpo_cli.scoring import GRADERS, Scorer, refuse_inside_a_starting_worker
from grpo_cli.run_lock import RunLock
from grpo_cli.update import UpdateStats, apply_optimizer_settings, make_optimizer, update_policy


OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    step: int
    checkpoint: Path | None
    eval_first: float | None  # held-out accuracy at the first evaluation of the run's history
    eval_last: float | None
    seconds: float


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Without deterministic kernels, two CPU threads were enough for two runs of the quickstart
    # to drift apart in the last float bit by step 4 (final accuracy 60.5-61.5% over three runs).
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at the first cuBLAS call
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # Deterministic mode also fills every new uninitialized tensor with NaN, a debugging aid that
    # changes no result of code that writes before it reads: ~6000 fills a step on the bench
    # (~8 ms of a 0.32 s CPU step). Off; the determinism test still holds.
    torch.utils.deterministic.fill_uninitialized_memory = False


def listed_changes(differences: dict) -> str:
    """recipe.changes' {key: (before, after)} as one line."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items())


def holds_run(run_dir: Path) -> bool:
    """A run directory holds a run once a training step was recorded (a metrics row or a checkpoint).
    An attempt that failed before its first step (a recipe mistake found when the data or model
    loaded) leaves only its recipe and perhaps a step-0 evaluation: the corrected rerun may start."""
    return any((run_dir / "checkpoints").glob("step-*")) or any(
        row.get("step", 0) >= 1 for row in read_jsonl(run_dir / METRICS))


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, notify, recipe_file: Path | None = None) -> Path | None:
    """Create the run directory, refuse to mix two runs in it; the checkpoint to resume from, if any.

    Resuming with a recipe that changes what the checkpoint trained (model, adapter, data, group
    size, seed) is refused with the differences; other changes are allowed and appended to
    resumes.jsonl. `recipe_file`: the file the user passed, never overwritten (it may be
    `<run dir>/recipe.yaml` itself, with the user's comments)."""
    if holds_run(run_dir) and not resume:
        raise UserError(
            f"{run_dir} already holds a run. Pass --resume to continue it, or choose another directory "
            f"with --set output.dir=<new dir> (or delete {run_dir})."
        )
    # The newest checkpoint whose files match their checksums: damaged newer ones are skipped with a
    # warning; when every one is damaged, an error (not a fresh start that would drop the run's logs).
    found = checkpoint.latest_intact(run_dir, warn=notify) if resume and run_dir.exists() else None
    if found is not None:
        saved = load_recipe(found / checkpoint.RECIPE_FILE)
        fixed, allowed = changes(saved, recipe)
        if fixed:
            raise UserError(f"{run_dir} holds a run this recipe cannot continue: {listed_changes(fixed)}. "
                            f"Resume with the recipe it was started with ({run_dir / 'recipe.yaml'}), or train "
                            "into a new output.dir.")
        if allowed:
            notify("resuming with changed settings: " + listed_changes(allowed))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if found is None:  # starting from step 0: logs of an attempt that saved nothing are not this run's
            for name in (METRICS, SAMPLES):
                (run_dir / name).unlink(missing_ok=True)
        resolved = run_dir / "recipe.yaml"
        if recipe_file is not None and resolved.exists() and resolved.samefile(recipe_file):
            notify(f"{resolved} is the recipe you passed: left as you wrote it (each checkpoint holds the "
                   "resolved recipe).")
        else:
            resolved.write_text(dump(recipe))
        if found is not None:
            with open(run_dir / "resumes.jsonl", "a") as handle:
                handle.write(json.dumps({"from_step": checkpoint.read_state(found)["step"],
                                         "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "changed": {k: list(v) for k, v in allowed.items()}}) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror}. Set output.dir to a writable place.") from None
    return found


def fit_to_context(examples: Examples, tokenizer, model, max_new_tokens: int, add_special_tokens: bool) -> tuple[Examples, int]:
    """Drop prompts that leave no room for max_new_tokens in the model's context; count them."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return examples, 0
    lengths = [len(ids) for ids in tokenizer([e.prompt for e in examples.items], add_special_tokens=add_special_tokens)["input_ids"]]
    kept = [e for e, n in zip(examples.items, lengths) if n + max_new_tokens <= limit]
    if not kept:
        raise UserError(
            f"every prompt of {examples.name} is too long: the longest is {max(lengths)} tokens and "
            f"grpo.max_new_tokens is {max_new_tokens}, but the model's context is {limit} tokens."
        )
    return replace(examples, items=kept), len(examples.items) - len(kept)


def logprobs_no_grad(parallel: Parallel, rollout: Rollout, batches: list[MicroBatch], temperature: float,
                     share: bool, reference: bool) -> list[torch.Tensor]:
    """Log-probs of each micro-batch's completions under the policy (or its reference), without
    autograd; with `share`, the step's prompts run once for all micro-batches. [n, c] each"""
    model = parallel.policy.model
    was_training = model.training
    model.eval()
    with torch.no_grad(), parallel.gathered(reference=reference):
        out = parallel.logprobs(rollout, batches, temperature, share, reference)
    model.train(was_training)
    return out


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the peak allocated since the step began; CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def mean_or_none(values: np.ndarray) -> float | None:
    """Mean of a rule's rewards, leaving out completions it skipped (NaN); None if it skipped them all."""
    return None if np.isnan(values).all() else float(np.nanmean(values))


def sample_rows(step: int, batch: list[Example], rollout: Rollout, rule_names: list[str], scores: np.ndarray,
                rewards: torch.Tensor, advantages: torch.Tensor, groups: int, group_size: int) -> list[dict]:
    rows = []
    for i in range(min(groups, len(batch)) * group_size):
        example = batch[i // group_size]
        rows.append({
            "step": step, "group": i // group_size, "prompt": example.prompt, "answer": example.answer,
            "completion": rollout.texts[i], "rewards": dict(zip(rule_names, scores[i].tolist())),
            "reward": rewards[i].item(), "advantage": advantages[i].item(),
        })
    return rows


def run_eval(step: int, parallel: Parallel, eval_set: Examples, recipe: Recipe, scorer: Scorer, log: RunLog,
             console: TrainConsole) -> float:
    """Greedy accuracy on the held-out set; several processes each take a share of it."""
    world, policy = parallel.world, parallel.policy
    share = eval_set.items[world.rank :: world.size]
    with parallel.gathered():
        report = evaluate(policy.model, policy.tokenizer, share, recipe.grpo.max_new_tokens, scorer,
                          add_special_tokens=not recipe.data.chat,
                          sampler=lambda **kwargs: parallel.generate(**kwargs))
    correct = world.all_gather_objects([c for item in report.items for c in item.correct])
    accuracy, seconds = sum(correct) / len(correct), world.reduce(report.seconds, "max")
    timeouts = int(world.reduce(report.timeouts))
    log.metrics({"step": step, "eval/accuracy": accuracy, "eval/n": len(correct), "eval/seconds": seconds,
                 "eval/timeouts": timeouts})
    console.evaluation(step, accuracy, len(correct), seconds, timeouts)
    return accuracy


def save_checkpoint(run_dir: Path, step: int, parallel: Parallel, optimizer, scheduler, trainer_state: dict,
                    recipe: Recipe, rng: dict | None = None) -> Path:
    """Every process takes part in gathering the state (sharded weights, the optimizer's); the first writes."""
    sharded = parallel.strategy == "fsdp"
    model_state = parallel.model_state() if sharded else None
    optimizer_state = parallel.optimizer_state(optimizer)
    if parallel.world.main:
        checkpoint.save(run_dir, step, parallel.policy, optimizer_state, scheduler, trainer_state, dump(recipe),
                        rng=rng, keep_last=recipe.output.keep_last, model_state=model_state)
    parallel.world.barrier()  # resume or export may read it next
    return checkpoint.checkpoint_dir(run_dir, step)


def train(recipe: Recipe, resume: bool = False, recipe_dir: Path | None = None,
          console: TrainConsole | None = None, recipe_file: Path | None = None) -> RunSummary:
    """Run the recipe; with resume, continue from the run directory's latest checkpoint.
    `recipe_file`: the YAML the recipe came from, which the run never overwrites.

    Under torchrun each process runs this with its share of every step (see distributed.py)."""
    refuse_inside_a_starting_worker("train()")
    with terminate_at_once():  # until the loop's own handling: nothing to save yet
        world = connect(recipe.distributed.timeout_minutes)
        try:
            check_recipe(recipe, world)
            if not world.main:
                console = TrainConsole(quiet=True)
            with RunLock(Path(recipe.output.dir)) if world.main else contextlib.nullcontext():
                return _train(recipe, resume, recipe_dir, console or TrainConsole(), world, recipe_file)
        finally:
            disconnect(world)


def _train(recipe: Recipe, resume: bool, recipe_dir: Path | None, console: TrainConsole, world: World,
           recipe_file: Path | None = None) -> RunSummary:
    started = time.perf_counter()
    run_dir = Path(recipe.output.dir)
    grpo = recipe.grpo
    rule_keys = [r.key for r in recipe.rewards]
    rule_fns = rule_functions(recipe.rewards, recipe_dir)  # imports custom rules now, before any model loads
    tensorboard = resume_from = None
    if world.main:
        resume_from = prepare_run_dir(run_dir, recipe, resume, console.message, recipe_file)
        tensorboard = tensorboard_writer(run_dir / "tensorboard") if recipe.output.tensorboard else None
    world.barrier()  # the run directory is ready
    # Every process resumes from the checkpoint the first one verified (it may have skipped a damaged one).
    resume_from = world.all_gather_objects([resume_from])[0]
    seed_everything(recipe.train.seed, recipe.train.deterministic)

    # Model, data, optimizer.
    policy = load_policy(recipe.model, grpo.kl_beta, progress=console.message, device=world.device(recipe.model.device))
    if policy.device.type == "cpu":
        allocator.keep_freed_memory()  # the step's activations reused warm (see allocator.py)
    chat = recipe.data.chat
    train_set = load_examples(recipe.data.train, recipe.data, policy.tokenizer, recipe_dir)
    train_set, too_long = fit_to_context(train_set, policy.tokenizer, policy.model, grpo.max_new_tokens, not chat)
    eval_set = None
    if recipe.data.eval is not None:
        eval_set = load_examples(recipe.data.eval, recipe.data, policy.tokenizer, recipe_dir)
        if recipe.data.eval_limit:
            eval_set = replace(eval_set, items=eval_set.items[: recipe.data.eval_limit])
    console.message(
        f"model {recipe.model.name} on {policy.device} ({str(policy.dtype).removeprefix('torch.')})"
        + (f" x {world.size} processes" if world.active else "") + ", "
        f"{sum(p.numel() for p in policy.trainable_parameters()):,} trainable parameters; "
        f"train set {train_set.name}: {len(train_set.items)} prompts"
        + (f" ({train_set.skip_note()})" if train_set.skipped else "")
        + (f" ({too_long} prompts too long for the context skipped)" if too_long else "")
    )
    if resume_from is not None:
        checkpoint.restore_weights(resume_from, policy)  # before sharding: into whole tensors
    fast = grpo.engine == "fast"
    if fast:
        lora_linear.install(policy.model)  # LoRA layers trained in fewer passes; the plain engine keeps PEFT's
    parallel = Parallel(policy, world, recipe.distributed.strategy)
    optimizer, scheduler = make_optimizer(policy.trainable_parameters(), recipe.train,
                                          recipe.train.steps * grpo.updates_per_rollout)
    order = PromptOrder(len(train_set.items), recipe.train.seed)
    weights = torch.tensor([r.weight for r in recipe.rewards], dtype=torch.float64)  # [R]
    scored_rules = rule_keys + ([] if "correctness" in rule_keys else ["correctness"])

    step = 0
    if resume_from is not None:
        state = checkpoint.restore_training(resume_from, parallel, optimizer, scheduler)
        apply_optimizer_settings(optimizer, scheduler, recipe.train)  # a changed lr or weight decay takes effect
        step = state["step"]
        order = PromptOrder(len(train_set.items), recipe.train.seed, **state["data"])
        console.message(f"resuming from {resume_from} (step {step})")
    log = RunLog(run_dir, resume_step=step if resume else None, tensorboard=tensorboard, enabled=world.main)
    last_saved = resume_from
    policy.model.train()
    # FSDP2 reduce-scatters once per unit per backward; a shared-prompt pass calls each layer twice and
    # only when a micro-batch repeats a prompt, which would differ between processes.
    share = fast and can_share_prompts(policy.model) and parallel.strategy != "fsdp"

    guard = NonFiniteGuard(recipe.train.max_bad_steps)
    trainer_state = lambda: {"data": order.state(), "base_model": recipe.model.name}  # noqa: E731

    def save_step_undone(step: int, rng_before: dict, order_before: dict) -> Path | None:
        """Save the state `step` started from, when nothing of it was applied (it is step - 1's)."""
        if step <= 1 or checkpoint.latest(run_dir) == checkpoint.checkpoint_dir(run_dir, step - 1):
            return last_saved  # nothing trained yet, or that state is saved already
        order.epoch, order.position = order_before["epoch"], order_before["position"]
        return save_checkpoint(run_dir, step - 1, parallel, optimizer, scheduler, trainer_state(), recipe,
                               rng=rng_before)

    with Scorer({**GRADERS, **rule_fns}) as scorer, Interrupts(console.message, not world.active) as interrupts:
        if eval_set is not None and step == 0:
            try:
                with interrupts.droppable():
                    run_eval(0, parallel, eval_set, recipe, scorer, log, console)
            except Dropped:
                raise Stopped("stopped by SIGTERM during the first evaluation, before any training step; "
                              "nothing to save. Run the same command again to start.", signal.SIGTERM) from None
        console.start(recipe.train.steps, step)
        try:
            while step < recipe.train.steps:
                step += 1
                t_start = time.perf_counter()
                rng_before, order_before = rng_state(), order.state()  # to save this step undone (OOM, SIGTERM)
                if policy.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(policy.device)
                phase, stats = "rollout", None
                try:
                    # Rollout: G completions for each prompt; the worker processes start scoring them.
                    # A SIGTERM drops it (the model is as the step found it) rather than wait for its end.
                    with interrupts.droppable():
                        sampled = sample_step(parallel, train_set, order, scorer, recipe, scored_rules, weights)
                    rollout, group = sampled.rollout, grpo.group_size
                    t_rollout = time.perf_counter()

                    # Micro-batches of similar length; reference log-probs for the KL, and old log-probs
                    # when the batch is reused (both fixed for the whole step).
                    phase = "update"
                    if fast:
                        batches = split(rollout, grpo.micro_batch_size, AUTO_TOKENS, SPREAD)
                    else:
                        batches = split(rollout, grpo.micro_batch_size)
                    ref_logp = old_logp = None
                    if grpo.kl_beta > 0:
                        ref_logp = logprobs_no_grad(parallel, rollout, batches, grpo.temperature, share, reference=True)
                    if grpo.updates_per_rollout > 1:
                        old_logp = logprobs_no_grad(parallel, rollout, batches, grpo.temperature, share, reference=False)

                    # Rewards (with DAPO's overlong penalty), then group-relative advantages.
                    t_wait = time.perf_counter()
                    scores = sampled.pending.result()
                    overlong = overlong_penalty(rollout.lengths.cpu(), grpo.max_new_tokens, grpo.overlong_buffer,
                                                grpo.overlong_penalty)  # [N]
                    rewards = total_reward(scores.values[:, : len(rule_keys)], weights) + overlong  # [N]
                    # Every process sees the whole step's rewards: groups stay local, batch scaling does not.
                    all_rewards = world.all_gather(rewards)  # [N_all]
                    advantages, zero_std = group_advantages(all_rewards, group, grpo.reward_scaling)  # [N_all], [B_all]
                    mine = slice(world.rank * len(rewards), (world.rank + 1) * len(rewards))
                    advantages = advantages[mine].to(policy.device, torch.float32)  # [N]
                    if scores.errors or scores.timeouts:
                        console.message(f"warning: step {step}: {scores.errors + scores.timeouts} reward calls "
                                        f"failed and scored 0 ({'; '.join(scores.messages)})")
                    t_scored = time.perf_counter()

                    # Clipped policy-gradient updates on this batch, skipped if anything is not finite.
                    if torch.isfinite(all_rewards).all():
                        stats = update_policy(policy, optimizer, scheduler, recipe, rollout, batches, advantages,
                                              ref_logp, old_logp, share, parallel)
                    else:
                        scheduler.step()
                        stats = UpdateStats([float("nan")], [], [], 0.0, 0.0, [float("nan")], ["rewards"], 0)
                    t_update = time.perf_counter()
                except Dropped:
                    saved = save_step_undone(step, rng_before, order_before)
                    raise Stopped(f"stopped by SIGTERM during step {step}, whose rollout was dropped; "
                                  + (f"saved {saved}. Continue with the same command and --resume." if saved else
                                     "nothing was trained yet, so nothing was saved."), signal.SIGTERM) from None
                except OUT_OF_MEMORY:
                    saved = None
                    if stats is None or stats.applied == 0:  # nothing of this step was applied
                        saved = save_step_undone(step, rng_before, order_before)
                    raise out_of_memory(phase, step, grpo, saved or last_saved) from None

                # The step's figures, over every process's completions.
                values = world.all_gather(torch.from_numpy(scores.values)).numpy()  # [N_all, R']
                texts = world.all_gather_objects(rollout.texts)
                lengths = world.all_gather(rollout.lengths.cpu())  # [N_all]
                losses = [world.reduce(loss) for loss in stats.losses]
                column = {rule: values[:, i] for i, rule in enumerate(scores.rules)}
                row = {
                    "step": step,
                    "reward_mean": all_rewards.mean().item(),
                    "reward_std": all_rewards.std(unbiased=False).item(),
                    **{f"reward/{key}": mean_or_none(column[key]) for key in rule_keys},
                    **({"reward/overlong": world.all_gather(overlong).mean().item()} if grpo.overlong_buffer else {}),
                    "accuracy": float((column["correctness"] > 0.5).mean()),
                    "kl": world.all_gather(torch.cat(stats.kls)).mean().item() if stats.kls else None,
                    "entropy": world.all_gather(torch.cat(stats.entropies)).mean().item() if stats.entropies else None,
                    "clip_frac": world.reduce(stats.clipped) / max(world.reduce(stats.tokens), 1.0),
                    "loss": sum(losses) / len(losses),
                    "grad_norm": sum(stats.grad_norms) / len(stats.grad_norms),
                    "lr": scheduler.get_last_lr()[0],
                    "completion_len": lengths.float().mean().item(),
                    "tokens_per_second": lengths.sum().item() / (t_update - t_start),
                    "peak_memory_gib": world.reduce(peak_memory_gib(policy.device), "max"),
                    **dict(zip(("answer_diversity", "text_diversity"), group_diversity(texts, group))),
                    "truncated_frac": world.all_gather(rollout.truncated.cpu().float()).mean().item(),
                    "frac_zero_std": zero_std.float().mean().item(),
                    **({"dropped_groups": sampled.dropped_groups, "sampling_rounds": sampled.rounds,
                        "sampled_accuracy": sampled.sampled_accuracy} if grpo.dynamic_sampling else {}),
                    **({"skipped_update": ", ".join(stats.problems)} if stats.problems else {}),
                    "score_errors": int(world.reduce(scores.errors)),
                    "score_timeouts": int(world.reduce(scores.timeouts)),
                    "step_seconds": t_update - t_start,
                    "rollout_seconds": t_rollout - t_start,
                    "score_seconds": t_scored - t_wait,  # waiting for the scores, past what overlapped
                    "update_seconds": t_update - t_rollout - (t_scored - t_wait),
                    # since this process started: differences between rows are whole steps, logging included
                    "elapsed_seconds": time.perf_counter() - started,
                }
                log.metrics(row)
                best, worst = int(all_rewards.argmax()), int(all_rewards.argmin())
                console.step(row, (texts[best], all_rewards[best].item()), (texts[worst], all_rewards[worst].item()))
                if stats.problems:
                    console.message(f"warning: step {step}: non-finite {', '.join(stats.problems)}; update skipped")
                guard.record(step, stats.problems, last_saved)
                if step == 1 or step % recipe.output.samples_every == 0:
                    log.samples(sample_rows(step, sampled.examples, rollout, rule_keys, scores.values, rewards,
                                            advantages, recipe.output.samples_groups, group))
                if eval_set is not None and (step % recipe.output.eval_every == 0 or step == recipe.train.steps):
                    try:
                        with interrupts.droppable():
                            run_eval(step, parallel, eval_set, recipe, scorer, log, console)
                    except Dropped:
                        pass  # SIGTERM: the step is trained and logged; save it and stop below
                # Ctrl-C or SIGTERM on any process stops all
                stop = world.reduce(float(interrupts.requested), "max") > 0
                if step % recipe.output.save_every == 0 or step == recipe.train.steps or stop:
                    last_saved = save_checkpoint(run_dir, step, parallel, optimizer, scheduler, trainer_state(), recipe)
                if stop and step < recipe.train.steps:
                    raise Stopped(f"stopped by {NAMES[interrupts.signum or signal.SIGINT]} after step {step}; saved "
                                  f"{last_saved}. Continue with the same command and --resume.",
                                  interrupts.signum or signal.SIGINT)
        finally:
            console.stop()
            log.close()

    evals = [r["eval/accuracy"] for r in read_jsonl(run_dir / METRICS) if "eval/accuracy" in r]
    return RunSummary(run_dir, step, last_saved, evals[0] if evals else None, evals[-1] if evals else None,
                      time.perf_counter() - started)
