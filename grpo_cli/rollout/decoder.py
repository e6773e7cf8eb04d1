"""A lean forward pass for sampling from Llama-family decoders (llama, mistral, qwen2, qwen3).

transformers' forward is written for every model and every cache: each decode step it
rebuilds the attention mask, routes the keys and values through cache objects that grow by
concatenation, and runs q, k, v (and gate, up) as separate matmuls. When one decode step
of a small batch is a few milliseconds of arithmetic, that overhead is most of the step.
This module runs the same computation on the model's own modules, for the architectures
whose decoder layer it knows:

- the KV cache is preallocated for prompt + completion and written in place;
- the attention mask is a [rows, capacity] flag array updated in place, attention runs on
  the key/value heads with the query heads packed beside them (as transformers does for
  one query token);
- with LoRA folded (float32 weights, see `rollout.foldable_lora_layers`), q/k/v and gate/up
  each become one matmul over W + s*B@A, built once per rollout (the memory the fold
  costs anyway); otherwise every projection is the model's own module (LoRA, 4-bit);
- norms, the rotary embedding, the activation and the head are the model's own modules (the
  rotary cos/sin tabulated once per rollout unless its frequencies depend on the length);
  qwen3's per-head RMSNorms on the queries and keys (`q_norm`, `k_norm`) run where its own
  attention runs them: on each head's vector, before the rotary embedding.

Sampling draws the same tokens as through transformers' forward (tested); the rollout
falls back to that forward for anything `supports` refuses.

On a GPU a decode step of a small model is hundreds of kernel launches of a few microseconds
of work each, so Python and the launches set its pace. There (`mode="graph"`) each decode step
is recorded once as a CUDA graph and replayed: the step reads its token, position and cache
slot from fixed input tensors, writes its keys and values at that slot with `index_copy_`, and
attends over the whole preallocated cache under the validity mask, so every replay has the
same shapes and addresses. Dropping finished rows changes the batch, so the step is captured
again after each `keep`. `mode="static"` runs that same step without a graph: the CPU tests
check it against the model's forward, as they do the eager step.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F

from grpo_cli.model.calls import causal_lm, position_ids, uses_logit_postprocessing

# Same decoder layer: pre-norm, rotary GQA attention, gated MLP; qwen3 adds the q/k norms (QK_NORMED).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
QK_NORMED = ("qwen3",)  # attention normalizes each query and key head before the rotary embedding
DYNAMIC_ROPE = ("dynamic", "longrope")  # rotary frequencies that change with the sequence's length


def supports(model) -> bool:
    """Whether `LeanDecoder` computes what the model's own forward computes."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or config.model_type not in ARCHITECTURES or uses_logit_postprocessing(model):
        return False
    if getattr(config, "pretraining_tp", 1) != 1:  # llama's sliced matmuls
        return False
    window = getattr(config, "sliding_window", None)
    # keys outside a window are dropped; qwen2/qwen3 configs clear sliding_window unless use_sliding_window
    if window and getattr(config, "use_sliding_window", True):
        return False
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "norm"):
        return False
    needed = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    if config.model_type in QK_NORMED:  # without them _Layer would skip the norms, not fail
        attention += ("q_norm", "k_norm")
    return all(all(hasattr(layer, name) for name in needed)
               and all(hasattr(layer.self_attn, name) for name in attention) for layer in layers)


def _folded(module, foldable: set) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W + s*B@A, bias) of a LoRA layer the rollout may fold, else None."""
    if id(module) not in foldable:
        return None
    base = module.get_base_layer()
    return base.weight + module.get_delta_weight(module.active_adapters[0]), base.bias


def _fused(modules: list, foldable: set):
    """One (weight, bias) for projections that read the same input, or None to run them one by one."""
    parts = [_folded(m, foldable) for m in modules]
    if any(p is None for p in parts):
        return None
    weight = torch.cat([w for w, _ in parts])  # [sum of outputs, in]
    if all(b is None for _, b in parts):
        return weight, None
    bias = torch.cat([b if b is not None else weight.new_zeros(w.shape[0]) for w, b in parts])
    return weight, bias


class _Layer:
    """One decoder layer's modules, its projections fused where folding allows, and its KV cache."""

    def __init__(self, layer, config, foldable: set):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # qwen3's, else None
        self.qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj], foldable)
        self.o = _folded(attn.o_proj, foldable)
        self.gate_up = _fused([mlp.gate_proj, mlp.up_proj], foldable)
        self.down = _folded(mlp.down_proj, foldable)
        self.keys = self.values = None  # [n, kv_heads, capacity, head_dim]

    def _project(self, x):  # [n, T, H] -> q [n, T, heads*d], k, v [n, T, kv_heads*d]
        if self.qkv is None:
            return self.attn.q_proj(x), self.attn.k_proj(x), self.attn.v_proj(x)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return F.linear(x, *self.qkv).split([q_size, kv_size, kv_size], dim=-1)

    def _mlp(self, x):  # [n, T, H] -> [n, T, H]
        if self.gate_up is None or self.down is None:
            return self.mlp(x)
        gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
        return F.linear(self.mlp.act_fn(gate) * up, *self.down)

    def forward(self, x, cos, sin, start: int, valid: torch.Tensor, slot: torch.Tensor | None = None,
                rows: torch.Tensor | None = None):
        """x [n, T, H]: tokens at cache slots start..start+T; valid [n, capacity] which slots hold tokens.
        `slot` [1] (static step, T = 1): the cache slot as a tensor, attention over the whole cache.
        `rows` [n]: x holds only these rows of the cache (a tool output's prefill for the rows it concerns)."""
        n, t, _ = x.shape
        residual = x
        x = self.layer.input_layernorm(x)
        q, k, v = self._project(x)
        q = q.view(n, t, self.heads, self.head_dim)  # [n, T, heads, d]
        k = k.view(n, t, self.kv_heads, self.head_dim)  # [n, T, kv_heads, d]
        if self.q_norm is not None:  # over each head's d values, before the rotation (as qwen3's attention)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [n, heads, T, d], [n, kv_heads, T, d]
        v = v.view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        if rows is not None:  # a few rows: their cache read (copied) up to here, their new slots written back
            end = start + t
            self.keys[rows, :, start:end] = k
            self.values[rows, :, start:end] = v
            keys, values = self.keys[rows, :, :end], self.values[rows, :, :end]
        elif slot is None:
            end = start + t
            self.keys[:, :, start:end] = k
            self.values[:, :, start:end] = v
        else:  # the same shapes every step; slots not yet written are zeros, masked out
            end = self.keys.shape[2]
            self.keys.index_copy_(2, slot, k)
            self.values.index_copy_(2, slot, v)
        if rows is None:
            keys, values = self.keys[:, :, :end], self.values[:, :, :end]  # [n, kv_heads, end, d]
        groups = self.heads // self.kv_heads
        if t == 1:
            # One query token: the query heads of each key/value head sit side by side as its
            # queries, so attention reads the cache once per key/value head (no repeat).
            out = F.scaled_dot_product_attention(
                q.reshape(n, self.kv_heads, groups, self.head_dim), keys, values,
                attn_mask=valid[:, None, None, :end], scale=self.scaling)  # [n, kv_heads, groups, d]
            out = out.reshape(n, 1, self.heads * self.head_dim)
        else:
            causal = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(end - t)  # [T, end]
            mask = causal[None] & valid[:, None, :end]  # [n, T, end]
            # A padding query would see no key, and its NaN would reach the cache; it sees itself.
            mask[:, torch.arange(t, device=x.device), torch.arange(start, end, device=x.device)] = True
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                                 scale=self.scaling)  # [n, heads, T, d]
            out = out.transpose(1, 2).reshape(n, t, self.heads * self.head_dim)
        out = self.attn.o_proj(out) if self.o is None else F.linear(out, *self.o)
        x = residual + out
        return x + self._mlp(self.layer.post_attention_layernorm(x))


class LeanDecoder:
    """Prefill, then one token per step, for rows that can be dropped as they finish.

    `foldable`: the LoRA layers whose update may be folded into the weights (all or none,
    see rollout.foldable_lora_layers); the adapters themselves are never touched.
    `mode`: "eager", "static" (the graph's step, run directly) or "graph" (CUDA only; see the
    module's docstring)."""

    def __init__(self, model, capacity: int, foldable: list, mode: str = "eager"):
        lm = causal_lm(model)
        self.inner, self.head, self.capacity = lm.model, lm.get_output_embeddings(), capacity
        ids = {id(m) for m in foldable}
        self.layers = [_Layer(layer, lm.config, ids) for layer in self.inner.layers]
        self.mode = mode
        # When to drop ended rows (see rollout._decode_shared). A replayed step costs about the same
        # for fewer rows on a GPU (it reads the weights once either way) and each drop means a new
        # capture, so the static step waits until half the rows have ended.
        self.compact_fraction = 0.5 if mode != "eager" else None
        self.length = 0  # cache slots written
        self.valid = self.next_position = None  # [n, capacity] bool, [n]
        self.rotary_table = None  # (cos, sin) [capacity, d] each, where they depend on the position alone
        self.inputs = None  # static step: token [n, 1], position [n, 1], slot [1]
        self.graph = self.graph_logits = None

    def _forward(self, input_ids, positions, slot=None, rows=None):  # [n, T] each -> logits of the last position [n, V]
        x = self.inner.embed_tokens(input_ids)  # [n, T, H]
        if self.rotary_table is None:
            cos, sin = self.inner.rotary_emb(x, positions)
        else:
            cos, sin = self.rotary_table[0][positions], self.rotary_table[1][positions]  # [n, T, d] each
        valid = self.valid if rows is None else self.valid[rows]
        for layer in self.layers:
            x = layer.forward(x, cos, sin, self.length, valid, slot, rows)
        return self.head(self.inner.norm(x[:, -1:]))[:, -1].float()  # [n, V]

    def _new_cache(self, *shape, like: torch.Tensor) -> torch.Tensor:
        # Eager reads stop at self.length, so the rest may stay uninitialized; the static step reads
        # every slot (masked), and a NaN left in memory would survive the mask (0 x NaN).
        return like.new_zeros(shape) if self.mode != "eager" else like.new_empty(shape)

    def prefill(self, input_ids, attention_mask, samples: int) -> torch.Tensor:
        """Each of the [B, P] left-padded prompts once; its cache then serves `samples` rows.
        Returns the next-token logits of the B x samples rows [N, V]."""
        b, p = input_ids.shape
        weight = self.inner.embed_tokens.weight
        for layer in self.layers:
            layer.keys = self._new_cache(b, layer.kv_heads, self.capacity, layer.head_dim, like=weight)
            layer.values = self._new_cache(b, layer.kv_heads, self.capacity, layer.head_dim, like=weight)
        self.valid = torch.zeros(b, self.capacity, dtype=torch.bool, device=input_ids.device)
        self.valid[:, :p] = attention_mask.bool()
        self.length = 0
        if getattr(self.inner.rotary_emb, "rope_type", None) not in DYNAMIC_ROPE:
            # one table instead of ~10 small ops per step; the same values (elementwise in the position)
            cos, sin = self.inner.rotary_emb(weight[:1][None], torch.arange(self.capacity, device=input_ids.device)[None])
            self.rotary_table = (cos[0], sin[0])
        elif self.mode == "graph":
            self.mode = "static"  # frequencies computed from the length: not replayable as recorded
        logits = self._forward(input_ids, position_ids(attention_mask))
        self.length = p
        self.keep(torch.arange(b, device=input_ids.device).repeat_interleave(samples))
        self.next_position = attention_mask.sum(1).repeat_interleave(samples)  # [N]
        return logits.repeat_interleave(samples, dim=0)

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these rows only (indices into the current rows, repeats allowed)."""
        for layer in self.layers:
            keys = self._new_cache(len(rows), *layer.keys.shape[1:], like=layer.keys)
            values = self._new_cache(len(rows), *layer.values.shape[1:], like=layer.values)
            keys[:, :, : self.length] = layer.keys[rows, :, : self.length]
            values[:, :, : self.length] = layer.values[rows, :, : self.length]
            layer.keys, layer.values = keys, values
        self.valid = self.valid[rows]
        if self.next_position is not None:
            self.next_position = self.next_position[rows]
        self.inputs = self.graph = self.graph_logits = None  # new batch and cache: a new static step

    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """The rows' next tokens [n] -> the logits after them [n, V]. In graph mode the logits are the
        graph's output tensor, valid until the next step. `live` [n] bool: rows whose token this is; the
        others (paused for a tool call) are fed a token whose slot stays invalid, and do not advance."""
        self._ensure_room(1)
        self.valid[:, self.length] = True if live is None else live
        if self.mode == "eager":
            logits = self._forward(tokens[:, None], self.next_position[:, None])
        else:
            if self.inputs is None:
                self.inputs = (tokens.new_empty(len(tokens), 1), tokens.new_empty(len(tokens), 1),
                               tokens.new_empty(1))
            token, position, slot = self.inputs
            token.copy_(tokens[:, None])
            position.copy_(self.next_position[:, None])
            slot.fill_(self.length)
            logits = self._replay() if self.mode == "graph" else self._forward(token, position, slot)
        self.length += 1
        self.next_position = self.next_position + (1 if live is None else live.long())
        return logits

    def append(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Several tokens at once for some rows (a tool's output), one short prefill: tokens [n, K]
        right-aligned, `valid` [n, K] marks each row's; rows with none keep their state. The logits
        after each row's last token [n, V] (meaningless for rows given none)."""
        k = tokens.shape[1]
        self._ensure_room(k)
        positions = self.next_position[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)  # [n, K]
        self.valid[:, self.length : self.length + k] = valid
        # only the rows given tokens run: a prefill of every row would cost K decode steps of the whole batch.
        # The other rows' slots stay unwritten, so they are zeroed: masked or not, a NaN left in memory would
        # reach those rows' attention (0 x NaN).
        rows = valid.any(1).nonzero().squeeze(1)  # [m]
        for layer in self.layers:
            layer.keys[:, :, self.length : self.length + k] = 0
            layer.values[:, :, self.length : self.length + k] = 0
        logits = torch.zeros(len(tokens), self.head.weight.shape[0], device=tokens.device)  # [n, V]
        logits[rows] = self._forward(tokens[rows], positions[rows], rows=rows)
        self.length += k
        self.next_position = self.next_position + valid.long().sum(1)
        return logits

    def _ensure_room(self, slots: int) -> None:
        """Make room for `slots` more: a tool's output and paused rows leave slots that hold nothing for most
        rows (a slot is one column for every row), so the cache is first packed (`_pack`), then grown if
        that is not enough. Positions never pass prompt + max_new_tokens, so the rotary table stays."""
        if self.length + slots <= self.capacity:
            return
        self._pack()
        if self.length + slots <= self.capacity:
            return
        self.capacity = max(2 * self.capacity, self.length + slots)
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = self._new_cache(old.shape[0], old.shape[1], self.capacity, old.shape[3], like=old)
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(layer, name, new)
        valid = self.valid.new_zeros(self.valid.shape[0], self.capacity)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.valid = valid
        self.inputs = self.graph = self.graph_logits = None  # the step reads the new tensors: a new capture

    def _pack(self) -> None:
        """Move each row's tokens to the front of the cache, in order, dropping the slots it left empty.
        Keys carry their rotation already, so where a key sits changes nothing; each decode step then
        attends over no more slots than the longest row holds."""
        valid = self.valid[:, : self.length]  # [n, L]
        counts = valid.sum(1)  # [n]
        width = int(counts.max()) if len(counts) else 0
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]  # [n, width] filled slots first
        for layer in self.layers:
            for name in ("keys", "values"):
                cache = getattr(layer, name)
                index = order[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3])
                packed = self._new_cache(*cache.shape, like=cache)
                packed[:, :, :width] = cache[:, :, : self.length].gather(2, index)
                setattr(layer, name, packed)
        self.valid = torch.zeros_like(self.valid)
        self.valid[:, :width] = torch.arange(width, device=valid.device)[None] < counts[:, None]
        self.length = width
        self.inputs = self.graph = self.graph_logits = None  # new tensors: a new capture

    def _replay(self) -> torch.Tensor:
        if self.graph is None:
            token, position, slot = self.inputs
            try:  # the step reads these very tensors on every replay: step() copies into them
                self.graph, self.graph_logits = self.record(lambda: self._forward(token, position, slot))
            except Exception as error:  # an op that cannot be recorded: decode without graphs, correctly
                warnings.warn(f"decoding without CUDA graphs: capturing a decode step failed ({error})", stacklevel=2)
                self.mode, self.graph = "static", None
                return self._forward(token, position, slot)
        self.graph.replay()
        return self.graph_logits

    @staticmethod
    def record(step):
        """`step` (no arguments, returns a tensor) recorded as a CUDA graph: (graph, its output tensor).
        A warm-up run on a side stream first, as torch.cuda.graphs asks (it computes this very step; the
        first replay computes it again, the same values)."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, out
