"""LoRA linear y = x W^T + s (x A) B with one memory-lean VJP (techniques 1 and 2 together).

Why: autodiff of mlx-lm's LoRALinear keeps x·A from the forward and builds dL/dx from
separate [.., in] terms (the frozen base's, with its own partial sums over W's row tiles, and
the LoRA path's), each its own buffer, before adding them. Here the backward keeps only x,
recomputes x·A (MeSP's trick: [.., r] is cheap to redo), and builds dL/dx column block by
column block, each block the base's term (one dequantized column tile of W) plus the LoRA
term (quant.linear_input_grad), so dL/dx is the only [.., in] array and at most one float
tile of W exists. The forward is LoRALinear's
own formula. `lora_linear_reference` is the plain formula the tests compare with.

`FusedLoRALinear` is mlx-lm's LoRALinear with this call; `use_fused_vjp(model)` swaps it in
(quant.prepare_for_training does). EMLoC's emulator (W = up · down) fuses too: its dL/dx
goes through the two factors, rank-wide in between. Active dropout (a fresh mask per call)
and other bases keep LoRALinear's own call (autodiff, with the extra buffers above: that
made EMLoC's 2048-token step peak above LoRA's on the same engine).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from .lora import has_active_dropout


def lora_linear_reference(x, base: nn.Module, a, b, scale: float) -> mx.array:
    """mlx-lm's LoRALinear formula (no dropout), for autodiff."""
    return base(x) + (scale * ((x @ a) @ b)).astype(x.dtype)


def lora_linear(x: mx.array, base: nn.Module, a: mx.array, b: mx.array, scale: float):
    """base(x) + s (x a) b, differentiable in x, a and b (the base is frozen)."""
    from .quant import linear_input_grad  # quant imports this module to swap the class in

    # a tuple out: the VJP then gets its cotangents as a list, one per output
    fn = mx.custom_function(lambda x, a, b: (lora_linear_reference(x, base, a, b, scale),))

    def vjp(primals, cotangents, outputs):
        x, a, b = primals
        dy = cotangents[0]
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [N, in], [N, out]
        # scale applied to [N, r] and [r, out] products, never to an [N, out] copy of dy
        g = (dy2 @ b.T) * scale  # [N, r]: dL/d(x a)
        da = x2.T @ g  # [in, r]
        db = ((x2 @ a).T @ dy2) * scale  # [r, out], x·A recomputed
        dx = linear_input_grad(base, dy2, low_rank=(g, a))
        return dx.reshape(x.shape).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)

    fn.vjp(vjp)
    return fn(x, a, b)[0]


FUSABLE = (nn.Linear, nn.QuantizedLinear)  # bases whose dL/dx linear_input_grad knows


def fusable(base: nn.Module) -> bool:
    """Whether quant.linear_input_grad knows `base`'s dL/dx (also EMLoC's emulator)."""
    from .emulator import EmulatorLinear  # emulator imports quant, which imports this module

    return isinstance(base, (*FUSABLE, EmulatorLinear))


class FusedLoRALinear(LoRALinear):
    """LoRALinear whose call runs `lora_linear` (same parameters, names and files)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not fusable(self.linear) or has_active_dropout(self):
            return super().__call__(x)
        return lora_linear(x, self.linear, self.lora_a, self.lora_b, self.scale)


def use_fused_vjp(model: nn.Module) -> int:
    """Swap every LoRALinear in `model` for a FusedLoRALinear (same arrays); return count."""
    swaps = []
    for path, m in model.named_modules():
        if path and type(m) is LoRALinear:  # (the root cannot be replaced in place)
            new = FusedLoRALinear.__new__(FusedLoRALinear)  # skip __init__: no new weights
            new.__dict__.update(m.__dict__)  # scale, _training, _no_grad, ...
            new._no_grad = set(m._no_grad)
            dict.update(new, m)  # linear, dropout, lora_a, lora_b
            swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
