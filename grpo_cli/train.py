"""`train(recipe)`: the GRPO loop, top to bottom.

Each step: take prompts_per_step prompts, sample group_size completions of each
(rollout), score them with the recipe's rules, turn rewards into group-relative
advantages, then take updates_per_rollout clipped policy-gradient steps on that
batch. Metrics go to metrics.jsonl every step; the held-out set is evaluated at
the start, every eval_every steps and at the end; checkpoints every save_every.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grpo_cli import checkpoint
from grpo_cli.advantages import group_advantages, overlong_penalty, total_reward
from grpo_cli.batching import AUTO_TOKENS, SPREAD, MicroBatch, split
from grpo_cli.console import TrainConsole
from grpo_cli.data import Example, Examples, PromptOrder, load_examples
from grpo_cli.errors import UserError
from grpo_cli.evaluation import evaluate
from grpo_cli.logprobs import can_share_prompts, micro_batch_logprobs
from grpo_cli.loss import LOSSES, LossSettings, token_mean
from grpo_cli.modeling import Policy, load_policy
from grpo_cli.recipe import Recipe, dump
from grpo_cli.rewards import rule_functions
from grpo_cli.rollout import Rollout, concat, generate, select_groups
from grpo_cli.run_log import METRICS, RunLog, read_jsonl
from grpo_cli.scoring import GRADERS, Pending, Scorer, Scores
from grpo_cli.update import make_optimizer


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    step: int
    checkpoint: Path | None
    eval_first: float | None  # held-out accuracy at the first evaluation of the run's history
    eval_last: float | None
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> Path | None:
    """Create the run directory, refuse to mix two runs in it; the checkpoint to resume from, if any."""
    found = checkpoint.latest(run_dir) if run_dir.exists() else None
    used = run_dir.exists() and any((run_dir / name).exists() for name in (METRICS, "checkpoints", "recipe.yaml"))
    if used and not resume:
        raise UserError(
            f"{run_dir} already holds a run. Pass --resume to continue it, or choose another directory "
            f"with --set output.dir=<new dir> (or delete {run_dir})."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump(recipe))
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
    return Examples(kept, examples.name, examples.skipped), len(examples.items) - len(kept)


def logprobs_no_grad(model, batches: list[MicroBatch], temperature: float, share: bool) -> list[torch.Tensor]:
    """Log-probs of each micro-batch's completions under `model`, without autograd. [n, c] each"""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = [micro_batch_logprobs(model, b, temperature, share)[0] for b in batches]
    model.train(was_training)
    return out


@dataclass
class Done:
    """Scores already in hand, behaving like scoring.Pending."""

    scores: Scores

    def result(self) -> Scores:
        return self.scores


@dataclass
class Sampled:
    rollout: Rollout  # the groups to train on
    examples: list[Example]  # their prompts, one per group
    pending: Pending | Done  # their scores
    dropped_groups: int = 0  # groups with equal rewards left out (dynamic sampling)
    rounds: int = 1
    sampled_accuracy: float | None = None  # over every completion sampled, dropped ones included


def sample_step(policy: Policy, train_set: Examples, order: PromptOrder, scorer: Scorer, recipe: Recipe,
                rules: list[str], weights: torch.Tensor) -> Sampled:
    """Rollouts and their scoring for one step. Without dynamic sampling the scores are left pending,
    to overlap with the reference pass; with it, groups whose rewards are all equal are dropped and
    more prompts are sampled (up to max_sampling_rounds rollouts) until the step has prompts_per_step
    informative groups."""
    grpo = recipe.grpo

    def rollout_of(batch: list[Example]):
        rollout = generate(policy.model, policy.tokenizer, [e.prompt for e in batch], grpo.max_new_tokens,
                           samples_per_prompt=grpo.group_size, temperature=grpo.temperature, top_p=grpo.top_p,
                           add_special_tokens=not recipe.data.chat, engine=grpo.engine)
        rows = [e for e in batch for _ in range(grpo.group_size)]
        pending = scorer.submit(rules, [e.prefill + t for e, t in zip(rows, rollout.texts)], [e.answer for e in rows],
                                [{"prompt": e.prompt, **e.row} for e in rows])
        return rollout, pending

    batch = [train_set.items[i] for i in order.take(grpo.prompts_per_step)]
    rollout, pending = rollout_of(batch)
    if not grpo.dynamic_sampling:
        return Sampled(rollout, batch, pending)
    kept: list[tuple[Rollout, list[Example], Scores]] = []
    dropped = rounds = correct = total = 0
    while True:
        rounds += 1
        scores = pending.result()
        rewards = total_reward(scores.values[:, : len(weights)], weights)  # [N]
        _, zero_std = group_advantages(rewards, grpo.group_size)  # [B]
        informative = [g for g, flat in enumerate(zero_std.tolist()) if not flat]
        dropped += len(batch) - len(informative)
        correct += int((scores.column("correctness") > 0.5).sum())
        total += len(scores.values)
        if informative:
            rows = [g * grpo.group_size + j for g in informative for j in range(grpo.group_size)]
            kept.append((select_groups(rollout, informative), [batch[g] for g in informative],
                         Scores(scores.values[rows], scores.rules, scores.timeouts, scores.errors, scores.messages)))
        have = sum(len(examples) for _, examples, _ in kept)
        if have >= grpo.prompts_per_step or rounds == grpo.max_sampling_rounds:
            break
        batch = [train_set.items[i] for i in order.take(grpo.prompts_per_step)]
        rollout, pending = rollout_of(batch)
    if not kept:  # nothing informative at all: train on the last round, whose advantages are all 0
        return Sampled(rollout, batch, Done(scores), dropped, rounds, correct / total)
    groups = grpo.prompts_per_step
    rollout = concat([r for r, _, _ in kept], policy.tokenizer.pad_token_id)
    examples = [e for _, es, _ in kept for e in es][:groups]
    merged = np.concatenate([sc.values for _, _, sc in kept])[: groups * grpo.group_size]
    first = kept[0][2]
    return Sampled(select_groups(rollout, list(range(len(examples)))), examples,
                   Done(Scores(merged, first.rules, sum(sc.timeouts for *_, sc in kept),
                               sum(sc.errors for *_, sc in kept), first.messages)),
                   dropped, rounds, correct / total)


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


def run_eval(step: int, policy: Policy, eval_set: Examples, recipe: Recipe, scorer: Scorer, log: RunLog,
             console: TrainConsole) -> float:
    report = evaluate(policy.model, policy.tokenizer, eval_set.items, recipe.grpo.max_new_tokens, scorer,
                      add_special_tokens=not recipe.data.chat)
    log.metrics({"step": step, "eval/accuracy": report.accuracy, "eval/n": len(report.items),
                 "eval/seconds": report.seconds})
    console.evaluation(step, report.accuracy, len(report.items), report.seconds)
    return report.accuracy


def train(recipe: Recipe, resume: bool = False, recipe_dir: Path | None = None,
          console: TrainConsole | None = None) -> RunSummary:
    """Run the recipe; with resume, continue from the run directory's latest checkpoint."""
    console = console or TrainConsole()
    started = time.perf_counter()
    run_dir = Path(recipe.output.dir)
    grpo = recipe.grpo
    rule_keys = [r.key for r in recipe.rewards]
    rule_fns = rule_functions(recipe.rewards, recipe_dir)  # imports custom rules now, before any model loads
    resume_from = prepare_run_dir(run_dir, recipe, resume)
    seed_everything(recipe.train.seed)

    # Model, data, optimizer.
    policy = load_policy(recipe.model, grpo.kl_beta, progress=console.message)
    chat = recipe.data.chat
    train_set = load_examples(recipe.data.train, recipe.data, policy.tokenizer, recipe_dir)
    train_set, too_long = fit_to_context(train_set, policy.tokenizer, policy.model, grpo.max_new_tokens, not chat)
    eval_set = None
    if recipe.data.eval is not None:
        eval_set = load_examples(recipe.data.eval, recipe.data, policy.tokenizer, recipe_dir)
        if recipe.data.eval_limit:
            eval_set = Examples(eval_set.items[: recipe.data.eval_limit], eval_set.name, eval_set.skipped)
    console.message(
        f"model {recipe.model.name} on {policy.device} ({str(policy.dtype).removeprefix('torch.')}), "
        f"{sum(p.numel() for p in policy.trainable_parameters()):,} trainable parameters; "
        f"train set {train_set.name}: {len(train_set.items)} prompts"
        + (f" ({train_set.skipped} rows without an answer skipped)" if train_set.skipped else "")
        + (f" ({too_long} prompts too long for the context skipped)" if too_long else "")
    )
    optimizer, scheduler = make_optimizer(policy.trainable_parameters(), recipe.train,
                                          recipe.train.steps * grpo.updates_per_rollout)
    order = PromptOrder(len(train_set.items), recipe.train.seed)
    weights = torch.tensor([r.weight for r in recipe.rewards], dtype=torch.float64)  # [R]
    scored_rules = rule_keys + ([] if "correctness" in rule_keys else ["correctness"])
    loss_fn = LOSSES[grpo.loss]

    step = 0
    if resume_from is not None:
        state = checkpoint.restore(resume_from, policy, optimizer, scheduler)
        step = state["step"]
        order = PromptOrder(len(train_set.items), recipe.train.seed, **state["data"])
        console.message(f"resuming from {resume_from} (step {step})")
    log = RunLog(run_dir, resume_step=step if resume else None)
    last_saved = resume_from
    policy.model.train()
    fast = grpo.engine == "fast"
    share = fast and can_share_prompts(policy.model)

    with Scorer({**GRADERS, **rule_fns}) as scorer:
        if eval_set is not None and step == 0:
            run_eval(0, policy, eval_set, recipe, scorer, log, console)
        console.start(recipe.train.steps, step)
        try:
            while step < recipe.train.steps:
                step += 1
                t_start = time.perf_counter()

                # Rollout: G completions for each prompt; the worker processes start scoring them.
                sampled = sample_step(policy, train_set, order, scorer, recipe, scored_rules, weights)
                rollout, group = sampled.rollout, grpo.group_size
                completions = rollout.input_ids.shape[0]
                t_rollout = time.perf_counter()

                # Micro-batches of similar length; reference log-probs for the KL, and old log-probs
                # when the batch is reused (both fixed for the whole step).
                if fast:
                    batches = split(rollout, grpo.micro_batch_size, AUTO_TOKENS, SPREAD)
                else:
                    batches = split(rollout, grpo.micro_batch_size)
                ref_logp = old_logp = None
                if grpo.kl_beta > 0:
                    with policy.reference() as reference:
                        ref_logp = logprobs_no_grad(reference, batches, grpo.temperature, share)
                if grpo.updates_per_rollout > 1:
                    old_logp = logprobs_no_grad(policy.model, batches, grpo.temperature, share)

                # Rewards (with DAPO's overlong penalty), then group-relative advantages.
                t_wait = time.perf_counter()
                scores = sampled.pending.result()
                overlong = overlong_penalty(rollout.lengths.cpu(), grpo.max_new_tokens, grpo.overlong_buffer,
                                            grpo.overlong_penalty)  # [N]
                rewards = total_reward(scores.values[:, : len(rule_keys)], weights) + overlong  # [N]
                advantages, zero_std = group_advantages(rewards, group, grpo.reward_scaling)  # [N], [B]
                advantages = advantages.to(policy.device, torch.float32)
                if scores.errors or scores.timeouts:
                    console.message(f"warning: step {step}: {scores.errors + scores.timeouts} reward calls failed "
                                    f"and scored 0 ({'; '.join(scores.messages)})")
                t_scored = time.perf_counter()

                # Clipped policy-gradient updates on this batch.
                loss_mask = rollout.completion_mask * (~rollout.truncated).unsqueeze(1) if grpo.mask_truncated \
                    else rollout.completion_mask  # [N, C]
                settings = LossSettings(grpo.clip_eps, grpo.upper_clip, grpo.kl_beta, grpo.entropy_bonus,
                                        completions, max(1, int(loss_mask.sum())), grpo.max_new_tokens)
                losses, kls, entropies, clipped, tokens, grad_norms = [], [], [], 0.0, 0.0, []
                for _ in range(grpo.updates_per_rollout):
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = 0.0
                    for i, micro in enumerate(batches):
                        logp, entropy = micro_batch_logprobs(policy.model, micro, grpo.temperature, share,
                                                             with_entropy=True)  # [n, c] each
                        mask = loss_mask[micro.rows, : micro.completion_mask.shape[1]]  # [n, c]
                        # With one update, pi_old is the current policy: the ratio is exactly 1.
                        old = old_logp[i] if old_logp is not None else logp.detach()
                        terms = loss_fn(logp, old, advantages[micro.rows], mask, settings,
                                        ref_logp[i] if ref_logp is not None else None,
                                        entropy if grpo.entropy_bonus else entropy.detach())
                        loss = terms.per_completion.sum()
                        loss.backward()
                        step_loss += loss.item()
                        if terms.kl is not None:
                            kls.append(terms.kl)
                        entropies.append(token_mean(entropy.detach(), micro.completion_mask))
                        clipped += terms.clipped_tokens.item()
                        tokens += terms.tokens.item()
                    max_norm = recipe.train.max_grad_norm or float("inf")
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), max_norm).item())
                    optimizer.step()
                    scheduler.step()
                    losses.append(step_loss)
                t_update = time.perf_counter()

                row = {
                    "step": step,
                    "reward_mean": rewards.mean().item(),
                    "reward_std": rewards.std(unbiased=False).item(),
                    **{f"reward/{key}": mean_or_none(scores.column(key)) for key in rule_keys},
                    **({"reward/overlong": overlong.mean().item()} if grpo.overlong_buffer else {}),
                    "accuracy": float((scores.column("correctness") > 0.5).mean()),
                    "kl": torch.cat(kls).mean().item() if kls else None,
                    "entropy": torch.cat(entropies).mean().item(),
                    "clip_frac": clipped / max(tokens, 1.0),
                    "loss": sum(losses) / len(losses),
                    "grad_norm": sum(grad_norms) / len(grad_norms),
                    "lr": scheduler.get_last_lr()[0],
                    "completion_len": rollout.lengths.float().mean().item(),
                    "truncated_frac": rollout.truncated.float().mean().item(),
                    "frac_zero_std": zero_std.float().mean().item(),
                    **({"dropped_groups": sampled.dropped_groups, "sampling_rounds": sampled.rounds,
                        "sampled_accuracy": sampled.sampled_accuracy} if grpo.dynamic_sampling else {}),
                    "score_errors": scores.errors,
                    "score_timeouts": scores.timeouts,
                    "step_seconds": t_update - t_start,
                    "rollout_seconds": t_rollout - t_start,
                    "score_seconds": t_scored - t_wait,  # waiting for the scores, past what overlapped
                    "update_seconds": t_update - t_rollout - (t_scored - t_wait),
                }
                log.metrics(row)
                console.step(row)
                if step == 1 or step % recipe.output.samples_every == 0:
                    log.samples(sample_rows(step, sampled.examples, rollout, rule_keys, scores.values, rewards,
                                            advantages, recipe.output.samples_groups, group))
                if eval_set is not None and (step % recipe.output.eval_every == 0 or step == recipe.train.steps):
                    run_eval(step, policy, eval_set, recipe, scorer, log, console)
                if step % recipe.output.save_every == 0 or step == recipe.train.steps:
                    last_saved = checkpoint.save(run_dir, step, policy, optimizer, scheduler,
                                                 {"data": order.state(), "base_model": recipe.model.name},
                                                 dump(recipe))
        finally:
            console.stop()

    evals = [r["eval/accuracy"] for r in read_jsonl(run_dir / METRICS) if "eval/accuracy" in r]
    return RunSummary(run_dir, step, last_saved, evals[0] if evals else None, evals[-1] if evals else None,
                      time.perf_counter() - started)
