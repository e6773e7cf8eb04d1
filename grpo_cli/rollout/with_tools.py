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
step as in rollout/sampling.py) stay as they would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from dataclasses import dataclass

import torch

from grpo_cli.tools import calls as tool_calls
from grpo_cli.run.guard import drop_point
from grpo_cli.config.defaults import TOOL_MAX_CALLS, TOOL_MEMORY_MB, TOOL_TIMEOUT_S
from grpo_cli.model.calls import COMPACT_FRACTION, draw_tokens
from grpo_cli.rollout.decoded import Decoded
from grpo_cli.rollout.settings import Sampling

TOOL_LAG_STEPS = 4  # decode steps a row sits out while its call runs (see the module's docstring)
PER_ROW = ("calls", "errors", "timeouts", "refused", "seconds")  # ToolUse's fields of one value per completion


@dataclass(kw_only=True, frozen=True)
class ToolUse:
    """The tool calls of a rollout's completions."""

    calls: torch.Tensor  # [N] calls run
    errors: torch.Tensor  # [N] of them, those that raised, exited non-zero or were killed (timeouts apart)
    timeouts: torch.Tensor  # [N] of them, those cut off at grpo.tool_timeout_s
    refused: torch.Tensor  # [N] blocks closed after max_tool_calls, not run
    seconds: torch.Tensor  # [N] time the calls ran, in the sandbox
    waited_seconds: float = 0.0  # time the decode loop stood still waiting for a call to finish
    restarts: int = 0  # times the sandbox's server died and was started again (the calls it ran ended as errors)

    def stacked(self) -> torch.Tensor:  # [N, 5] float64, PER_ROW's order, for gathering across processes
        return torch.stack([getattr(self, name) for name in PER_ROW], 1).double()

    @staticmethod
    def select(use: ToolUse | None, rows: torch.Tensor) -> ToolUse | None:
        if use is None:
            return None
        return ToolUse(**{name: getattr(use, name)[rows] for name in PER_ROW}, waited_seconds=use.waited_seconds,
                       restarts=use.restarts)

    @staticmethod
    def concat(uses: list[ToolUse | None]) -> ToolUse | None:
        if any(u is None for u in uses):
            return None
        return ToolUse(**{name: torch.cat([getattr(u, name) for u in uses]) for name in PER_ROW},
                       waited_seconds=sum(u.waited_seconds for u in uses), restarts=sum(u.restarts for u in uses))


@dataclass(kw_only=True, frozen=True)
class ToolSettings:
    max_calls: int = TOOL_MAX_CALLS
    timeout_s: float = TOOL_TIMEOUT_S
    memory_mb: int = TOOL_MEMORY_MB


class ToolSession:
    """The sandbox a run's rollouts call, started once (its start-up imports what code commonly
    uses) and closed with the run. `submit` never blocks; `wait(tickets)` returns those calls' outcomes.

    Within one rollout, identical code runs once and its outcome serves every row that wrote it: the
    samples of a group often write the very same block (16 times `print(66 + 18)`), and a call costs a
    fresh process. Code that draws random numbers thus gives those rows one draw between them."""

    def __init__(self, settings: ToolSettings):
        from grpo_cli.tools.sandbox import Limits, Sandbox

        self.settings = settings
        self.sandbox = Sandbox(Limits(timeout_s=settings.timeout_s, memory_mb=settings.memory_mb))
        self._tickets = itertools.count()
        self.start_rollout()

    @property
    def isolation(self) -> dict[str, str]:
        return self.sandbox.isolation

    @property
    def restarts(self) -> int:
        """Times the sandbox's server was started again after dying, over the session (Sandbox.restarts)."""
        return self.sandbox.restarts

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
    return ToolSession(ToolSettings(max_calls=max_calls, timeout_s=timeout_s, memory_mb=memory_mb))


def isolation_note(session: ToolSession) -> str:
    """One line on what confines the tool's code here (sandbox.Sandbox.isolation)."""
    return "; ".join(f"{what}: {how}" for what, how in session.isolation.items())


@functools.lru_cache(maxsize=8)
def _backtick_ids(tokenizer) -> frozenset[int]:
    """Tokens that can close a code fence: only after one of these is a row's text looked at."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return frozenset(i for i, token in enumerate(tokens) if token and "`" in token)


@dataclass
class _Rows:
    """What the loop knows of each row of the rollout (indexed by row number, not batch position)."""

    tokens: torch.Tensor  # [N, C] the transcript so far: model tokens and tool output
    sampler_logp: torch.Tensor  # [N, C] the log-prob each model token was drawn with; 0 on tool output
    is_tool: torch.Tensor  # [N, C] True on tool output
    length: torch.Tensor  # [N] tokens written, tool output included (the budget's count)
    ended: torch.Tensor  # [N] bool: EOS, or the budget used up
    paused: torch.Tensor  # [N] bool: waiting for a call
    scanned: list[int]  # per row, where its text is next looked at for a closed block (past its last output)
    waiting: dict[int, tuple[int | None, int, str]]  # row -> (ticket, None if refused; resume step; note)
    use: dict[str, list[float]]  # ToolUse's fields, per row

    @classmethod
    def empty(cls, n: int, width: int, pad: int, device) -> _Rows:
        return cls(tokens=torch.full((n, width), pad, dtype=torch.long, device=device),
                   sampler_logp=torch.zeros(n, width, device=device),
                   is_tool=torch.zeros(n, width, dtype=torch.bool, device=device),
                   length=torch.zeros(n, dtype=torch.long, device=device),
                   ended=torch.zeros(n, dtype=torch.bool, device=device),
                   paused=torch.zeros(n, dtype=torch.bool, device=device), scanned=[0] * n, waiting={},
                   use={k: [0.0] * n for k in PER_ROW})

    def text_since_scan(self, tokenizer, row: int) -> str:
        """Decoded as the completion's text is (Rollout.texts), special tokens dropped: a block is closed, and
        run, exactly where a reading of that text finds it closed (tool_calls.printed_spans)."""
        return tokenizer.decode(self.tokens[row, self.scanned[row] : int(self.length[row])], skip_special_tokens=True)


def decode_with_tools(stepper, tokenizer, input_ids, attention_mask, sampling: Sampling, eos_ids: list[int],
                      session: ToolSession, world=None) -> Decoded:
    """Completion tokens [N, C], their sampler log-probs, the tool-output mask [N, C] and the calls' ToolUse:
    rollout._decode_shared's contract, with the tool (see the module's docstring). `stepper` must have
    `append`."""
    device = input_ids.device
    session.start_rollout()
    restarts_before = session.restarts
    max_new_tokens = sampling.max_new_tokens
    logits = stepper.prefill(input_ids, attention_mask, sampling.samples_per_prompt)  # [n, V] of the batch's rows
    n_rows = logits.shape[0]
    ranks, offset = (world.size, world.rank * n_rows) if world is not None and world.active else (1, 0)
    pad = tokenizer.pad_token_id
    backticks = torch.tensor(sorted(_backtick_ids(tokenizer)), dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, device=device)
    state = _Rows.empty(n_rows, max_new_tokens, pad, device)
    waited = 0.0
    active = torch.arange(n_rows, device=device)  # the batch's rows, in batch order
    step = 0
    while True:
        drop_point()  # a SIGTERM drops the rollout here (guard.Interrupts.droppable)
        live = ~(state.ended[active] | state.paused[active])  # [n] the rows that sample this step
        rows = active[live]  # [m]
        picked, picked_logp = draw_tokens(logits[live], offset + rows, n_rows * ranks, pad, sampling.temperature,
                                          sampling.top_p, sampling.greedy)  # [m] x2
        state.tokens[rows, state.length[rows]] = picked
        state.sampler_logp[rows, state.length[rows]] = picked_logp
        state.length[rows] += 1
        state.ended[rows] |= torch.isin(picked, eos) | (state.length[rows] >= max_new_tokens)
        # only a token with a backtick can close a block: only those rows' text is looked at
        for row in rows[torch.isin(picked, backticks) & ~state.ended[rows]].tolist():
            _call_if_closed(state, row, tokenizer, session, step)
        everyone_done = bool(state.ended.all())
        if ranks > 1:
            everyone_done = world.reduce(float(everyone_done), "min") == 1.0
        if everyone_done:
            break
        # rows that just ended need no step; one that closed a block does (its fence goes into the cache)
        step_live = live & ~state.ended[active]  # [n]
        feed = torch.full_like(active, pad)  # [n]
        feed[live] = picked
        feed[~step_live] = pad
        done_here = int(state.ended[active].sum())
        if done_here and done_here >= (getattr(stepper, "compact_fraction", None) or COMPACT_FRACTION) * len(active):
            kept = (~state.ended[active]).nonzero().squeeze(1)
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
        due = [row for row, (_, resume, _) in state.waiting.items() if resume <= step]
        if due:
            logits, waited_now = _resume(stepper, tokenizer, state, due, active.tolist(), session, logits,
                                         max_new_tokens, pad)
            waited += waited_now
        step += 1
    tool_use = ToolUse(**{k: torch.tensor(v, dtype=torch.float64 if k == "seconds" else torch.long)
                          for k, v in state.use.items()}, waited_seconds=waited,
                       restarts=session.restarts - restarts_before)
    width = int(state.length.max()) if n_rows else 0
    return Decoded(tokens=state.tokens[:, :width], sampler_logp=state.sampler_logp[:, :width],
                   tool_mask=state.is_tool[:, :width], tool_use=tool_use)


def _encoded(tokenizer, text: str) -> list[int]:
    """Tool output as tokens: data, never control ("<|im_end|>" printed by the code stays text)."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _as_decoded(tokenizer, shown: str) -> str:
    """`shown` as the completion's text will hold it: without the characters the tokenizer cannot encode
    (the character-level one of builtin:tiny-math-tools has no "é"), which decoding drops. Its fences are
    escaped after that (tool_calls.output_block), since dropping one could join backticks into a fence."""
    return tokenizer.decode(_encoded(tokenizer, shown), skip_special_tokens=True)


def printed_from_mask(tokenizer, tokens: torch.Tensor, is_tool: torch.Tensor, text: str) -> list[tool_calls.Span]:
    """The characters of `text` (`tokens` [C] decoded, special tokens dropped) that the tool printed, known from
    the tool-output mask `is_tool` [C], not by reading the text: each run of tool tokens is one output block, and
    what it printed is that block less the frame output_block put around it (tool_calls.printed_in)."""
    spans, at = [], 0
    for tool, run in itertools.groupby(is_tool.tolist()):
        end = at + len(list(run))
        if tool:
            block = (len(tokenizer.decode(tokens[:at], skip_special_tokens=True)),
                     len(tokenizer.decode(tokens[:end], skip_special_tokens=True)))
            printed = tool_calls.printed_in(text, block)
            if printed is not None:
                spans.append(printed)
        at = end
    return spans


def _call_if_closed(state: _Rows, row: int, tokenizer, session: ToolSession, step: int) -> None:
    """If the row's text now closes a python block: submit its code (or refuse it past max_tool_calls)
    and pause the row until its resume step."""
    code = tool_calls.closed_code(state.text_since_scan(tokenizer, row))
    if code is None:
        return
    state.paused[row] = True
    max_calls = session.settings.max_calls
    if state.use["calls"][row] >= max_calls:
        state.use["refused"][row] += 1
        state.waiting[row] = (None, step + 1, tool_calls.limit_note(max_calls))
    else:
        state.use["calls"][row] += 1
        state.waiting[row] = (session.submit(code), step + TOOL_LAG_STEPS, "")


def _resume(stepper, tokenizer, state: _Rows, due: list[int], active: list[int], session: ToolSession, logits,
            max_new_tokens: int, pad: int) -> tuple[torch.Tensor, float]:
    """Append the output blocks of the `due` rows to their transcripts and caches: the batch's logits with
    theirs replaced [n, V], and the seconds spent waiting for their calls."""
    tickets = [state.waiting[r][0] for r in due if state.waiting[r][0] is not None]
    outcomes, waited = session.wait(tickets) if tickets else ({}, 0.0)
    blocks: dict[int, list[int]] = {}
    for row in due:
        ticket, _, note = state.waiting.pop(row)
        state.paused[row] = False
        if ticket is not None:
            outcome = outcomes[ticket]
            state.use["seconds"][row] += outcome.seconds
            state.use["timeouts"][row] += outcome.status == "timeout"
            state.use["errors"][row] += outcome.status not in ("ok", "timeout")
            note = outcome.shown(tool_calls.SHOWN_CHARS)
        start = int(state.length[row])
        text = tool_calls.output_block(state.text_since_scan(tokenizer, row), _as_decoded(tokenizer, note))
        block = _encoded(tokenizer, text)[: max_new_tokens - start]
        end = start + len(block)
        state.tokens[row, start:end] = torch.tensor(block, dtype=torch.long)
        state.is_tool[row, start:end] = True
        state.length[row] = end
        state.scanned[row] = end
        if end == max_new_tokens:
            state.ended[row] = True  # cut at the budget: nothing left to decode
        else:
            blocks[row] = block
    if not blocks:
        return logits, waited
    width = max(len(b) for b in blocks.values())
    device = logits.device
    block_ids = torch.full((len(active), width), pad, dtype=torch.long, device=device)
    valid = torch.zeros(len(active), width, dtype=torch.bool, device=device)
    for i, row in enumerate(active):
        if row in blocks:  # right-aligned, so the last position is each resumed row's last token
            block = blocks[row]
            block_ids[i, width - len(block) :] = torch.tensor(block, dtype=torch.long)
            valid[i, width - len(block) :] = True
    appended = stepper.append(block_ids, valid)  # [n, V]
    return torch.where(valid.any(1)[:, None], appended, logits), waited
