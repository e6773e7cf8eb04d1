"""Decoding with a code tool: rows pause while their code runs, the others keep decoding.

The fast engine's loop (rollout._decode_shared) with three more things a row can do:

- close a python block (`tool_calls.closed_code`): its code goes to the sandbox, which runs
  the calls of many rows at once, and the row sits out the next TOOL_LAG_STEPS decode steps
  while every other row goes on;
- resume: its output block is appended to its KV cache in one short prefill (`append`),
  never by re-encoding the transcript, and decoding continues from there;
- run out of budget: tool output counts against max_new_tokens (see tool_calls).

A row resumes exactly TOOL_LAG_STEPS steps after its call, waiting there if the call has not
finished, so which rows decode at which step never depends on how fast the sandbox was: the
same seed gives the same completions. The lag covers a short call on a GPU and on a CPU; a
longer call holds the loop up, and that wait is measured (tool_wait_seconds).

A paused row stays in the decode batch, fed a padding token whose cache slot is marked
invalid, so the batch's shapes (and the random draws, one multinomial over every row per
step as in rollout.py) stay as they would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from dataclasses import dataclass

import torch

from grpo_cli import tool_calls
from grpo_cli.guard import drop_point
from grpo_cli.model_calls import COMPACT_FRACTION, next_token_scores

TOOL_LAG_STEPS = 4  # decode steps a row sits out while its call runs (see the module's docstring)


@dataclass(kw_only=True, frozen=True)
class ToolUse:
    """The tool calls of a rollout's completions."""

    calls: torch.Tensor  # [N] calls run
    errors: torch.Tensor  # [N] of them, those that raised, exited non-zero or were killed (timeouts apart)
    timeouts: torch.Tensor  # [N] of them, those cut off at grpo.tool_timeout_s
    refused: torch.Tensor  # [N] blocks closed after max_tool_calls, not run
    seconds: torch.Tensor  # [N] time the calls ran, in the sandbox
    waited_seconds: float = 0.0  # time the decode loop stood still waiting for a call to finish

    def stacked(self) -> torch.Tensor:  # [N, 5] float64, for gathering across processes
        return torch.stack([self.calls, self.errors, self.timeouts, self.refused, self.seconds], 1).double()

    @staticmethod
    def select(use: ToolUse | None, rows: torch.Tensor) -> ToolUse | None:
        if use is None:
            return None
        return ToolUse(calls=use.calls[rows], errors=use.errors[rows], timeouts=use.timeouts[rows],
                       refused=use.refused[rows], seconds=use.seconds[rows], waited_seconds=use.waited_seconds)

    @staticmethod
    def concat(uses: list[ToolUse | None]) -> ToolUse | None:
        if any(u is None for u in uses):
            return None
        return ToolUse(**{name: torch.cat([getattr(u, name) for u in uses])
                          for name in ("calls", "errors", "timeouts", "refused", "seconds")},
                       waited_seconds=sum(u.waited_seconds for u in uses))


@dataclass(kw_only=True, frozen=True)
class ToolSettings:
    tools: tuple[str, ...] = ("python",)
    max_calls: int = 4
    timeout_s: float = 5.0
    memory_mb: int = 1024


class ToolSession:
    """The sandbox a run's rollouts call, started once (its start-up imports what code commonly
    uses) and closed with the run. `submit` never blocks; `wait(tickets)` returns those calls' outcomes.

    Within one rollout, identical code runs once and its outcome serves every row that wrote it: the
    samples of a group often write the very same block (16 times `print(66 + 18)`), and a call costs a
    fresh process. Code that draws random numbers thus gives those rows one draw between them."""

    def __init__(self, settings: ToolSettings):
        from grpo_cli.sandbox import Limits, Sandbox

        self.settings = settings
        self.sandbox = Sandbox(Limits(timeout_s=settings.timeout_s, memory_mb=settings.memory_mb))
        self._tickets = itertools.count()
        self.start_rollout()

    @property
    def isolation(self) -> dict[str, str]:
        return self.sandbox.isolation

    def start_rollout(self) -> None:
        """Forget the last rollout's calls: sharing stops at a rollout's end."""
        self._call_of: dict[int, int] = {}  # ticket -> sandbox call
        self._owners: set[int] = set()  # tickets whose call ran their code (the others share its outcome)
        self._by_code: dict[str, int] = {}
        self._done: dict = {}  # sandbox call -> Outcome

    def submit(self, code: str) -> int:
        ticket = next(self._tickets)
        if code not in self._by_code:
            self._by_code[code] = self.sandbox.submit(code)
            self._owners.add(ticket)
        self._call_of[ticket] = self._by_code[code]
        return ticket

    def wait(self, tickets: list[int]) -> tuple[dict, float]:
        """({ticket: Outcome}, seconds spent waiting for them). An outcome shared with an earlier ticket
        says 0 seconds: the time was the owner's."""
        self._done.update(self.sandbox.collect(wait=False))
        started = time.perf_counter()
        while any(self._call_of[t] not in self._done for t in tickets):
            self._done.update(self.sandbox.collect(wait=True))
        outcomes = {t: self._done[self._call_of[t]] for t in tickets}
        return ({t: o if t in self._owners else dataclasses.replace(o, seconds=0.0) for t, o in outcomes.items()},
                time.perf_counter() - started)

    def close(self) -> None:
        self.sandbox.close()

    def __enter__(self) -> ToolSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_session(tools: list[str], max_calls: int, timeout_s: float, memory_mb: int):
    """A context giving a ToolSession for these settings, or None when `tools` is empty."""
    if not tools:
        return contextlib.nullcontext(None)
    return ToolSession(ToolSettings(tools=tuple(tools), max_calls=max_calls, timeout_s=timeout_s, memory_mb=memory_mb))


def isolation_note(session: ToolSession) -> str:
    """One line on what confines the tool's code here (sandbox.Sandbox.isolation)."""
    return "; ".join(f"{what}: {how}" for what, how in session.isolation.items())


@functools.lru_cache(maxsize=8)
def _backtick_ids(tokenizer) -> frozenset[int]:
    """Tokens that can close a code fence: only after one of these is a row's text looked at."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return frozenset(i for i, token in enumerate(tokens) if token and "`" in token)


def decode_with_tools(stepper, tokenizer, input_ids, attention_mask, max_new_tokens: int, samples: int,
                      temperature: float, top_p: float, greedy: bool, eos_ids: list[int], session: ToolSession,
                      world=None) -> tuple[torch.Tensor, torch.Tensor, ToolUse]:
    """(completion tokens [N, C], tool-output mask [N, C], the calls' ToolUse): rollout._decode_shared's
    contract, with the tool (see the module's docstring). `stepper` must have `append`."""
    device = input_ids.device
    session.start_rollout()
    logits = stepper.prefill(input_ids, attention_mask, samples)  # [n, V] of the batch's rows
    n_rows, vocab = logits.shape
    ranks, offset = (world.size, world.rank * n_rows) if world is not None and world.active else (1, 0)
    pad = tokenizer.pad_token_id
    backticks = torch.tensor(sorted(_backtick_ids(tokenizer)), dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, device=device)
    tokens = torch.full((n_rows, max_new_tokens), pad, dtype=torch.long, device=device)
    is_tool = torch.zeros(n_rows, max_new_tokens, dtype=torch.bool, device=device)
    length = torch.zeros(n_rows, dtype=torch.long, device=device)  # tokens written per row, tool output included
    ended = torch.zeros(n_rows, dtype=torch.bool, device=device)
    paused = torch.zeros(n_rows, dtype=torch.bool, device=device)  # waiting for a call
    scanned = [0] * n_rows  # where the row's text is next looked at for a closed block (after its last output)
    waiting: dict[int, tuple[int | None, int, str]] = {}  # row -> (ticket, or None if refused; resume step; note)
    use = {k: [0.0] * n_rows for k in ("calls", "errors", "timeouts", "refused", "seconds")}
    waited = 0.0
    active = torch.arange(n_rows, device=device)  # the batch's rows, in batch order
    max_calls = session.settings.max_calls
    step = 0
    while True:
        drop_point()  # a SIGTERM drops the rollout here (guard.Interrupts.droppable)
        live = ~(ended[active] | paused[active])  # [n] the rows that sample this step
        if greedy:
            chosen = logits.argmax(-1) if len(active) else active  # [n] (only the live rows' are used)
        else:
            # one multinomial over every row, live or not, as rollout._decode_shared draws it
            probs = torch.zeros(n_rows * ranks, vocab, device=device)
            probs[:, pad] = 1.0
            if bool(live.any()):
                probs[offset + active[live]] = next_token_scores(logits[live], temperature, top_p).softmax(-1)
            chosen = torch.multinomial(probs, num_samples=1).squeeze(1)[offset + active]  # [n]
        rows, picked = active[live], chosen[live]
        tokens[rows, length[rows]] = picked
        length[rows] += 1
        ended[rows] |= torch.isin(picked, eos) | (length[rows] >= max_new_tokens)
        # only a token with a backtick can close a block: only those rows' text is looked at
        for row in rows[torch.isin(picked, backticks) & ~ended[rows]].tolist():
            code = tool_calls.closed_code(tokenizer.decode(tokens[row, scanned[row] : int(length[row])]))
            if code is None:
                continue
            paused[row] = True
            if use["calls"][row] >= max_calls:
                use["refused"][row] += 1
                waiting[row] = (None, step + 1, tool_calls.limit_note(max_calls))
            else:
                use["calls"][row] += 1
                waiting[row] = (session.submit(code), step + TOOL_LAG_STEPS, "")
        everyone_done = bool(ended.all())
        if ranks > 1:
            everyone_done = world.reduce(float(everyone_done), "min") == 1.0
        if everyone_done:
            break
        # rows that just ended need no step; one that closed a block does (its fence goes into the cache)
        step_live = live & ~ended[active]  # [n]
        feed = torch.where(step_live, chosen, torch.full_like(chosen, pad))  # [n]
        done_here = int(ended[active].sum())
        if done_here and done_here >= (getattr(stepper, "compact_fraction", None) or COMPACT_FRACTION) * len(active):
            kept = (~ended[active]).nonzero().squeeze(1)
            if len(kept) == 0:  # this rank is done; it keeps drawing in step with the others
                active, logits = active[:0], logits[:0]
                step += 1
                continue
            stepper.keep(kept)
            active, feed, step_live, logits = active[kept], feed[kept], step_live[kept], logits[kept]
        if len(active) == 0:
            step += 1
            continue
        if bool(step_live.any()):
            stepped = stepper.step(feed, live=step_live)  # [n, V]
            logits = torch.where(step_live[:, None], stepped, logits)
        due = [row for row, (_, resume, _) in waiting.items() if resume <= step]
        if due:
            logits, waited_now = _resume(stepper, tokenizer, due, active.tolist(), waiting, session, tokens, is_tool,
                                         length, scanned, ended, use, logits, max_new_tokens, pad)
            paused[due] = False
            waited += waited_now
        step += 1
    tool_use = ToolUse(**{k: torch.tensor(v, dtype=torch.float64 if k == "seconds" else torch.long)
                          for k, v in use.items()}, waited_seconds=waited)
    width = int(length.max()) if n_rows else 0
    return tokens[:, :width], is_tool[:, :width], tool_use


def _resume(stepper, tokenizer, due, active, waiting, session, tokens, is_tool, length, scanned, ended, use, logits,
            max_new_tokens, pad) -> tuple[torch.Tensor, float]:
    """Append the output blocks of the `due` rows to their transcripts and caches; their new logits."""
    ids = [waiting[r][0] for r in due if waiting[r][0] is not None]
    outcomes, waited = session.wait(ids) if ids else ({}, 0.0)
    blocks: dict[int, list[int]] = {}
    for row in due:
        call, _, note = waiting.pop(row)
        if call is not None:
            outcome = outcomes[call]
            use["seconds"][row] += outcome.seconds
            use["timeouts"][row] += outcome.status == "timeout"
            use["errors"][row] += outcome.status not in ("ok", "timeout")
            note = outcome.shown(tool_calls.SHOWN_CHARS)
        start = int(length[row])
        text = tool_calls.output_block(tokenizer.decode(tokens[row, scanned[row] : start]), note)
        # the output is data, never control: "<|im_end|>" printed by the code stays text
        block = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        block = block[: max_new_tokens - start]
        tokens[row, start : start + len(block)] = torch.tensor(block, dtype=torch.long)
        is_tool[row, start : start + len(block)] = True
        length[row] = start + len(block)
        scanned[row] = start + len(block)
        if start + len(block) == max_new_tokens:
            ended[row] = True  # cut at the budget: nothing left to decode
        else:
            blocks[row] = block
    if not blocks:
        return logits, waited
    width = max(len(b) for b in blocks.values())
    device = logits.device
    block_ids = torch.full((len(active), width), pad, dtype=torch.long, device=device)
    valid = torch.zeros(len(active), width, dtype=torch.bool, device=device)
    resumed = torch.zeros(len(active), dtype=torch.bool, device=device)
    for i, row in enumerate(active):
        if row in blocks:  # right-aligned, so the last position is each resumed row's last token
            block = blocks[row]
            block_ids[i, width - len(block) :] = torch.tensor(block, dtype=torch.long)
            valid[i, width - len(block) :] = True
            resumed[i] = True
    appended = stepper.append(block_ids, valid)  # [n, V]
    return torch.where(resumed[:, None], appended, logits), waited
