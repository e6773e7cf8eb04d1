"""Sampling: G completions for each prompt, packed for the update.

Two engines give the same samples for the same seed (tested):

- `fast` (default): each prompt is prefilled once and its KV cache shared by its G
  samples, and sequences that have ended drop out of the decode batch, so no work
  is spent on finished rows. It draws its random numbers exactly as
  transformers' sampler does (one multinomial over every row at every step), so
  dropping rows does not change what the others sample.
- `generate`: transformers' `generate`, which prefills G copies of each prompt and
  decodes every row to the end. The plain path, for comparison and for
  architectures whose caches the fast engine does not handle.

The fast engine also folds LoRA into float32 base weights while it samples
(`folded_lora`): one matmul per layer instead of three, same distribution up to
float rounding, base weights restored bit for bit.

A completion ends at its first EOS, which is kept and trained on; everything
after it is padding and masked out.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from grpo_cli.rollout import decoder
from grpo_cli.run.guard import drop_point
from grpo_cli.model.calls import COMPACT_FRACTION, cache_argument, draw_tokens, new_cache, position_ids, returned_cache
from grpo_cli.model.logprobs import from_logits
from grpo_cli.rollout.decoded import Decoded
from grpo_cli.tools.calls import Span
from grpo_cli.rollout.settings import Sampling
from grpo_cli.rollout.with_tools import ToolSession, ToolUse, decode_with_tools, printed_from_mask
from grpo_cli.model.loading import adapters_disabled, is_plain_lora_linear, lora_layers


@dataclass(kw_only=True, frozen=True)
class Rollout:
    input_ids: torch.Tensor  # [N, P+C] prompt left-padded to P, then the completion
    attention_mask: torch.Tensor  # [N, P+C] 0 on padding on either side
    completion_mask: torch.Tensor  # [N, C] 1 through each completion's first EOS
    prompt_len: int  # P
    texts: list[str]  # decoded completions, special tokens dropped
    truncated: torch.Tensor  # [N] bool: reached max_new_tokens without an EOS
    group_size: int = 1  # consecutive rows sharing a prompt
    tool_mask: torch.Tensor | None = None  # [N, C] True on tool-output tokens (context, not actions); None: no tool
    tool_use: ToolUse | None = None  # the tool calls per completion, with grpo.tools
    tool_outputs: list[list[Span]] | None = None  # per text, the characters the tool printed (from tool_mask)
    # [N, C] the sampler's log-prob of each completion token, from the logits it drew from (after temperature
    # and top-p): what the update compares with the training forward's (update/sampler_correction.py). Junk
    # where action_mask is 0. None only for a rollout built by hand.
    sampler_logp: torch.Tensor | None = None

    @property
    def completion_ids(self) -> torch.Tensor:  # [N, C]
        return self.input_ids[:, self.prompt_len :]

    @property
    def lengths(self) -> torch.Tensor:  # [N] tokens in the completion, tool output included (the budget's count)
        return self.completion_mask.sum(1)

    @property
    def action_mask(self) -> torch.Tensor:  # [N, C] the tokens the model chose: what the loss, KL and entropy see
        if self.tool_mask is None:
            return self.completion_mask
        return self.completion_mask * (~self.tool_mask).long()

    @property
    def action_lengths(self) -> torch.Tensor:  # [N]
        return self.action_mask.sum(1)


def foldable_lora_layers(model) -> list:
    """The LoRA layers to fold for sampling: all of them when every one is a plain LoRA linear layer
    (`modeling.is_plain_lora_linear`), not merged, over float32 weights; otherwise none. In 16 bits,
    W + s*B@A would round the adapter's small update away; a 4-bit base cannot hold it."""
    layers = lora_layers(model)
    if all(is_plain_lora_linear(layer) and not layer.merged and layer.get_base_layer().weight.dtype == torch.float32
           for layer in layers):
        return layers
    return []


@contextlib.contextmanager
def folded_lora(model, enabled: bool = True):
    """Sampling with each LoRA layer's update folded into its base weight (W' = W + s*B@A) and the
    adapter switched off. The base weight is swapped for a new tensor, not changed in place, so
    the original comes back exactly; the fold costs one weight-sized copy of the adapted layers
    while it lasts. Only where `foldable_lora_layers` allows; a no-op otherwise."""
    layers = foldable_lora_layers(model) if enabled else []
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                originals.append(weight.data)
                weight.data = weight.data + layer.get_delta_weight(layer.active_adapters[0])
        with adapters_disabled(layers):
            yield
    finally:
        for layer, original in zip(layers, originals):
            layer.get_base_layer().weight.data = original


def eos_token_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None] or [tokenizer.eos_token_id]
    return sorted(set(ids))


def _pack(tokenizer, prompt_ids, prompt_mask, decoded: Decoded, eos_ids, group_size) -> Rollout:
    """Prompt [N, P] and what the decode loop drew -> a Rollout with masks and texts. `decoded.tool_mask`
    [N, C]: the tool-output tokens (which are never EOS: they are encoded with special tokens split)."""
    completion, tool_mask = decoded.tokens, decoded.tool_mask  # [N, C] each
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))  # [N, C]
    # Keep tokens up to and including the first EOS: cumsum counts EOS seen strictly before t.
    before = is_eos.long().cumsum(1) - is_eos.long()  # [N, C]
    completion_mask = (before == 0).long()  # [N, C]
    completion = completion * completion_mask + tokenizer.pad_token_id * (1 - completion_mask)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    tool_outputs = None
    if tool_mask is not None:
        tool_mask = tool_mask & completion_mask.bool()  # [N, C]
        tool_outputs = [printed_from_mask(tokenizer, ids, is_tool, text) for ids, is_tool, text in
                        zip(completion.cpu(), tool_mask.cpu(), texts)]
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_len=prompt_ids.shape[1],
        texts=texts,
        truncated=~is_eos.any(1),
        group_size=group_size,
        tool_mask=tool_mask,
        tool_use=decoded.tool_use,
        tool_outputs=tool_outputs,
        sampler_logp=decoded.sampler_logp * completion_mask,
    )


def generate(model, tokenizer, prompts: list[str], sampling: Sampling, world=None,
             tools: ToolSession | None = None) -> Rollout:
    """`sampling.samples_per_prompt` completions for each prompt, consecutive per prompt. N = len(prompts) x samples.

    `world` (a distributed.World): `prompts` are this rank's part of the step (see _decode_shared).
    `tools`: completions may call the code tool (rollout/with_tools.py); the fast engine only."""
    if tools is not None and sampling.engine != "fast":
        raise ValueError("tool calls need the fast engine: transformers' generate cannot pause a row for a call")
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=sampling.add_special_tokens).to(device)
    eos_ids = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if sampling.engine == "fast":
            lean_here = sampling.lean and decoder.supports(model)
            if lean_here:
                capacity = enc["input_ids"].shape[1] + sampling.max_new_tokens
                mode = "graph" if sampling.cuda_graphs and device.type == "cuda" else "eager"
                stepper = decoder.LeanDecoder(model, capacity,
                                              foldable_lora_layers(model) if sampling.fold_lora else [], mode)
            else:
                stepper = _TransformersStepper(model)
            with contextlib.nullcontext() if lean_here else folded_lora(model, sampling.fold_lora):
                arguments = (stepper, tokenizer, enc["input_ids"], enc["attention_mask"], sampling, eos_ids)
                if tools is None:
                    decoded = _decode_shared(*arguments, world)
                else:
                    decoded = decode_with_tools(*arguments, tools, world)
        else:
            decoded = _decode_generate(model, tokenizer, enc["input_ids"], enc["attention_mask"], sampling, eos_ids)
    model.train(was_training)
    samples = sampling.samples_per_prompt
    prompt_ids = enc["input_ids"].repeat_interleave(samples, dim=0)  # [N, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(samples, dim=0)  # [N, P]
    return _pack(tokenizer, prompt_ids, prompt_mask, decoded, eos_ids, samples)


def _decode_generate(model, tokenizer, input_ids, attention_mask, sampling: Sampling, eos_ids) -> Decoded:
    from transformers import LogitsProcessorList, StoppingCriteria
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    class _DropPoint(StoppingCriteria):
        """Never stops a row: it lets a SIGTERM drop the rollout between tokens (guard.drop_point)."""

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # -> [N] bool
            drop_point()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    recorder = _SamplerLogprobs()
    if sampling.greedy:
        drawing, warpers = {"do_sample": False}, []
    else:
        # generate puts a caller's processors before its own warpers, so the warpers are given here, ahead
        # of the recorder, and generate's own are turned off (temperature 1, top_p 1; top_k=0 also turns off
        # its default top-k=50 filter: we sample from the policy we train).
        drawing = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        warpers = ([TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature != 1.0 else []) + \
            ([TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else [])
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                               max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.samples_per_prompt,
                               eos_token_id=eos_ids, stopping_criteria=[_DropPoint()],
                               logits_processor=LogitsProcessorList([*warpers, recorder]),
                               pad_token_id=tokenizer.pad_token_id, use_cache=True, **drawing)  # [N, P+C]
    completion = sequences[:, input_ids.shape[1] :]  # [N, C]
    return Decoded(tokens=completion, sampler_logp=recorder.finish(completion))


class _SamplerLogprobs:
    """The last of generate's logits processors: it sees the scores each token is drawn from, and on the
    next call (or at `finish`) the token drawn, whose log-prob it keeps."""

    def __init__(self):
        self.scores = None  # [N, V] the last step's
        self.logp: list[torch.Tensor] = []  # per step [N]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.scores = scores
        return scores

    def _take(self, drawn: torch.Tensor) -> None:
        if self.scores is not None:
            self.logp.append(from_logits(self.scores.float(), drawn, with_entropy=False, entropy_grad=False)[0])

    def finish(self, completion: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N, C]
        if completion.shape[1] > len(self.logp):
            self._take(completion[:, -1])
            self.scores = None
        if not self.logp:
            return completion.new_zeros(completion.shape, dtype=torch.float32)
        return torch.stack(self.logp[: completion.shape[1]], 1)


class _TransformersStepper:
    """The model's own forward with a DynamicCache, for architectures `decoder` does not know."""

    def __init__(self, model):
        self.model, self.kwarg = model, cache_argument(model)
        self.cache = self.mask = self.next_position = None

    def prefill(self, input_ids, attention_mask, samples: int) -> torch.Tensor:  # -> [N, V]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                         use_cache=True, logits_to_keep=1, **{self.kwarg: new_cache(self.model)})
        self.cache = returned_cache(out)
        self.cache.batch_repeat_interleave(samples)
        self.mask = attention_mask.repeat_interleave(samples, dim=0)  # [N, P + t]
        self.next_position = self.mask.sum(1)  # [N]
        return out.logits[:, -1].float().repeat_interleave(samples, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]

    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:  # [n] -> [n, V]
        """`live` [n] bool: as decoder.LeanDecoder.step's."""
        column = torch.ones_like(self.mask[:, :1]) if live is None else live.long()[:, None]
        self.mask = torch.cat([self.mask, column], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position[:, None],
                         use_cache=True, logits_to_keep=1, **{self.kwarg: self.cache})
        self.cache = returned_cache(out)
        self.next_position = self.next_position + column[:, 0]
        return out.logits[:, -1].float()

    def append(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # [n, K] each -> [n, V]
        """As decoder.LeanDecoder.append: right-aligned tokens for some rows, the others unchanged."""
        positions = self.next_position[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)  # [n, K]
        self.mask = torch.cat([self.mask, valid.long()], dim=1)
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.kwarg: self.cache})
        self.cache = returned_cache(out)
        self.next_position = self.next_position + valid.long().sum(1)
        return out.logits[:, -1].float()


def _decode_shared(stepper, tokenizer, input_ids, attention_mask, sampling: Sampling, eos_ids,
                   world=None) -> Decoded:
    """Prefill [B, P] once, share each prompt's cache across its samples, decode only unfinished rows.
    `stepper`: a `decoder.LeanDecoder` or `_TransformersStepper`.

    With several processes (`world`), each draws the random numbers of every rank's rows and keeps
    its own, and all continue until the last row of any rank has ended: the same draws as one
    process sampling the whole step.
    """
    device = input_ids.device
    max_new_tokens = sampling.max_new_tokens
    logits = stepper.prefill(input_ids, attention_mask, sampling.samples_per_prompt)  # [n, V]: the active rows
    n_rows = logits.shape[0]
    ranks, offset = (world.size, world.rank * n_rows) if world is not None and world.active else (1, 0)
    active = torch.arange(n_rows, device=device)  # row numbers of the active rows
    tokens = torch.full((n_rows, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=device)
    sampler_logp = torch.zeros(n_rows, max_new_tokens, device=device)
    eos = torch.tensor(eos_ids, device=device)
    ended = torch.zeros(n_rows, dtype=torch.bool, device=device)  # over this rank's rows
    steps = 0
    compact_fraction = getattr(stepper, "compact_fraction", None) or COMPACT_FRACTION
    for step in range(max_new_tokens):
        drop_point()  # a SIGTERM drops the rollout here (guard.Interrupts.droppable)
        chosen, chosen_logp = draw_tokens(logits, offset + active, n_rows * ranks, tokenizer.pad_token_id,
                                          sampling.temperature, sampling.top_p, sampling.greedy)  # [n] x2
        tokens[active, step] = chosen
        sampler_logp[active, step] = chosen_logp
        steps = step + 1
        just_ended = torch.isin(chosen, eos)  # [n]
        ended[active[just_ended]] = True
        all_ended = bool(ended.all())
        if ranks > 1:
            all_ended = world.reduce(float(all_ended), "min") == 1.0
        if all_ended or steps == max_new_tokens:
            break
        if int(just_ended.sum()) and (int(ended[active].sum()) >= compact_fraction * len(active)):
            # Drop the ended rows (the cache index copy is amortized over many steps).
            kept = (~ended[active]).nonzero().squeeze(1)
            if len(kept) == 0:  # this rank is done; it keeps drawing in step with the others
                active = active[:0]
                continue
            stepper.keep(kept)
            active, chosen = active[kept], chosen[kept]
        if len(active) == 0:
            continue
        logits = stepper.step(chosen)  # [n, V]
    return Decoded(tokens=tokens[:, :steps], sampler_logp=sampler_logp[:, :steps])


def select_groups(rollout: Rollout, groups: list[int]) -> Rollout:
    """The rows of the given groups (each group_size consecutive rows), in that order."""
    picked = [g * rollout.group_size + j for g in groups for j in range(rollout.group_size)]
    rows = torch.tensor(picked, dtype=torch.long, device=rollout.input_ids.device)
    return Rollout(input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows],
                   completion_mask=rollout.completion_mask[rows], prompt_len=rollout.prompt_len,
                   texts=[rollout.texts[i] for i in picked], truncated=rollout.truncated[rows],
                   group_size=rollout.group_size,
                   tool_mask=None if rollout.tool_mask is None else rollout.tool_mask[rows],
                   tool_use=ToolUse.select(rollout.tool_use, rows.cpu()),
                   tool_outputs=None if rollout.tool_outputs is None else [rollout.tool_outputs[i] for i in picked],
                   sampler_logp=None if rollout.sampler_logp is None else rollout.sampler_logp[rows])


def concat(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several of the same group size: prompts re-padded on the left, completions
    on the right, to the longest of each."""
    if len(rollouts) == 1:
        return rollouts[0]
    p = max(r.prompt_len for r in rollouts)
    c = max(r.completion_mask.shape[1] for r in rollouts)

    def pad(tensor, left, right, value):
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    ids, masks, completion_masks, tool_masks, sampler_logps = [], [], [], [], []
    tools = all(r.tool_mask is not None for r in rollouts)
    recorded = all(r.sampler_logp is not None for r in rollouts)
    for r in rollouts:
        left, right = p - r.prompt_len, c - r.completion_mask.shape[1]
        ids.append(pad(r.input_ids, left, right, pad_id))
        masks.append(pad(r.attention_mask, left, right, 0))
        completion_masks.append(pad(r.completion_mask, 0, right, 0))
        if tools:
            tool_masks.append(pad(r.tool_mask, 0, right, False))
        if recorded:
            sampler_logps.append(pad(r.sampler_logp, 0, right, 0.0))
    return Rollout(input_ids=torch.cat(ids), attention_mask=torch.cat(masks),
                   completion_mask=torch.cat(completion_masks), prompt_len=p,
                   texts=[t for r in rollouts for t in r.texts], truncated=torch.cat([r.truncated for r in rollouts]),
                   group_size=rollouts[0].group_size, tool_mask=torch.cat(tool_masks) if tools else None,
                   tool_use=ToolUse.concat([r.tool_use for r in rollouts]),
                   tool_outputs=[s for r in rollouts for s in r.tool_outputs] if tools else None,
                   sampler_logp=torch.cat(sampler_logps) if recorded else None)
