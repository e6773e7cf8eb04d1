"""LoRA linear layers trained with three matmuls each way and no full-size elementwise passes.

PEFT computes y = x W^T + b + s * (x A^T) B^T as separate operations: the base matmul,
A, B, a multiply by s and an add, the last two each a pass over a [tokens, out] tensor,
and autograd mirrors them in backward (plus the sum of the two input gradients). This
autograd function computes the same thing with the scale and the sums inside matmuls:
forward is the base matmul, x A^T, then one addmm that adds s * (x A^T) B^T to it;
backward forms the input gradient as one addmm too: fewer passes over [tokens, out]
tensors, with PEFT's gradients (tests/test_lora_linear.py; what it saves:
docs/performance.md, "Update").

With 16-bit weights PEFT keeps the adapter in float32: it casts x to float32 for A and B,
adds their float32 output to the 16-bit base output in float32 and rounds the sum back to
16 bits; the function does the same arithmetic. Autograd under PEFT keeps a float32 copy of
x for each adapter's gradient (one per projection: q, k and v each keep their own); the
function keeps x itself, once for the projections that share it, and casts it again in
backward: less is kept for backward, with the same log-probabilities (the figures:
docs/performance.md, "Update"; tests/test_lora_linear.py holds it under 75% of PEFT's).

`install` switches it on for the LoRA layers where PEFT's forward computes exactly that
formula: one active adapter, no dropout, no DoRA or other variant, a plain nn.Linear base
that is frozen, input and base in one dtype and the adapter in that dtype or float32. It
runs only with autograd on and the adapter on; everything else (the reference pass,
sampling, other layers) is PEFT's.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from grpo_cli.model.loading import is_plain_lora_linear, lora_layers


class _LoraLinear(torch.autograd.Function):
    """x W^T + b + s (x A^T) B^T; the adapter's arithmetic in the adapter's dtype (`.to` of a
    tensor already in that dtype is the tensor itself: no copy in the one-dtype case)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        flat = x.reshape(-1, x.shape[-1])  # [T, in], x's dtype
        low = flat.to(lora_a.dtype) @ lora_a.t()  # [T, r], adapter dtype
        base = F.linear(flat, weight, bias).to(lora_a.dtype)  # [T, out]
        out = torch.addmm(base, low, lora_b.t(), alpha=scaling).to(x.dtype)  # [T, out]
        ctx.save_for_backward(flat, low, weight, lora_a, lora_b)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, low, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])  # [T, out], x's dtype
        wide = grad.to(lora_a.dtype)  # [T, out], adapter dtype
        grad_low = (wide @ lora_b).mul_(ctx.scaling)  # [T, r]
        grad_x = None
        if ctx.needs_input_grad[0]:
            if grad.dtype == lora_a.dtype:
                grad_x = torch.addmm(grad @ weight, grad_low, lora_a)  # [T, in]
            else:  # as autograd sums PEFT's two paths: each rounded to x's dtype, then added
                grad_x = grad @ weight + (grad_low @ lora_a).to(grad.dtype)
            grad_x = grad_x.view(ctx.input_shape)
        grad_a = grad_low.t() @ flat.to(lora_a.dtype)  # [r, in]
        grad_b = (wide.t() @ low).mul_(ctx.scaling)  # [out, r]
        return grad_x, None, None, grad_a, grad_b, None


def _forward(self, x, *args, **kwargs):
    """The installed forward of an eligible layer: `_LoraLinear` in training, PEFT's otherwise."""
    if args or kwargs or self.disable_adapters or self.merged or not torch.is_grad_enabled():
        return type(self).forward(self, x, *args, **kwargs)
    adapter = self.active_adapters[0]
    a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    base = self.get_base_layer()
    if not (x.dtype == base.weight.dtype and a.dtype == b.dtype and a.dtype in (x.dtype, torch.float32)):
        return type(self).forward(self, x, *args, **kwargs)
    return _LoraLinear.apply(x, base.weight, base.bias, a, b, self.scaling[adapter])


def eligible(layer) -> bool:
    """Whether PEFT's forward of this layer is exactly base + s * B(A x) (see the module docstring):
    a plain LoRA linear layer without dropout over a frozen base."""
    return (is_plain_lora_linear(layer) and isinstance(layer.lora_dropout[layer.active_adapters[0]], torch.nn.Identity)
            and not layer.get_base_layer().weight.requires_grad)


def install(model) -> int:
    """Train the eligible LoRA layers of `model` through `_LoraLinear`; how many there are."""
    layers = [layer for layer in lora_layers(model) if eligible(layer)]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)  # a bound method: a deep copy binds to the copy
    return len(layers)
