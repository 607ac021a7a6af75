"""LARS: a low-rank, input-dependent gate on the input of each frozen linear (no weight update).

Paper: Tenison et al., "Parameter Efficiency Is Not Memory Efficiency" (arXiv 2604.22783),
as their public code implements it (see /work/shared/methods.md). Per adapted linear, input
width d, blocks of B input channels (G = d / B gates):

    z = x / sqrt(mean(x^2) + eps)      RMS-normalised input, no learned weight
    p = (z U) V                        U: [d, r], V: [r, G]   gate logits per block
    g = 1 + alpha p                    alpha: a trainable scalar
    y = linear(x * repeat_B(g))        the base linear (quantized or not) stays frozen

Why a custom VJP: autodiff would keep z, zU and p for the backward pass; `lars_gate` keeps
only x (which the q/k/v or gate/up projections share) and recomputes the rest. Both passes are
written so that no [..., d] temporary is built beyond the gated input and dx: zU = s (x U),
mean(x dz) = (zU . dzU) / (s d), block sums as batched dot products, gating by broadcasting, and
one compiled elementwise pass for dx (MLX evaluates the whole backward at once, so temporaries
of q, k and v would otherwise be alive together). `gate_reference` is the plain formula it is
tested against. The gate depends on the input, so it cannot be
merged into W: `fuse` refuses a LARS adapter and inference keeps the gate.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from . import blocks
from .errors import UserError

EPS = 1e-5
ALPHA_INIT = 0.1  # the authors' init; V ~ N(0, V_STD^2) makes a fresh gate almost 1
V_STD = 1e-4
PARAMS = ("lars_u", "lars_v", "lars_alpha")


def _scale(x: mx.array) -> mx.array:
    """s = 1 / sqrt(mean(x^2) + eps) per token, [..., 1]; a row-wise dot product, so no
    [..., d] temporary (mean(square(x)) would allocate one)."""
    sq = (x[..., None, :] @ x[..., :, None])[..., 0]  # [..., 1, d] @ [..., d, 1] -> [..., 1]
    return mx.rsqrt(sq / x.shape[-1] + EPS)


def _gated(x: mx.array, g: mx.array) -> mx.array:
    """x * repeat(g): each gate g[..., j] scales its block of channels, by broadcasting
    (no repeated [..., d] copy of g)."""
    G = g.shape[-1]
    return (x.reshape(*x.shape[:-1], G, -1) * g[..., None]).reshape(x.shape)  # [..., G, B]


def gate_reference(x: mx.array, u: mx.array, v: mx.array, alpha: mx.array) -> mx.array:
    """x * repeat(1 + alpha (z U) V) with z = x / rms(x): the plain formula, as autodiff
    sees it (it keeps z, zU and p for the backward pass)."""
    block = x.shape[-1] // v.shape[-1]
    z = x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + EPS)
    return x * mx.repeat(1 + alpha * ((z @ u) @ v), block, axis=-1)


def _forward(x, u, v, alpha):
    """The same gate, written so that its only [..., d] array is the output: zU = s (x U)."""
    s = _scale(x)
    zu = s * (x @ u)  # [..., r]
    p = zu @ v  # [..., G]
    return _gated(x, 1 + alpha * p), (s, zu, p)


@functools.cache
def _combine():
    """dx = repeat(g) dy + s dz - c x, fused by mx.compile into one pass over [..., d]."""

    def combine(x, dy, dz, g, s, c):
        G = g.shape[-1]
        shape = (*x.shape[:-1], G, -1)
        gdy = dy.reshape(shape) * g[..., None]
        return gdy.reshape(x.shape) + s * dz - c * x

    return mx.compile(combine)


@functools.cache
def _gate_fn():
    """The gate as an mx.custom_function whose VJP recomputes z, zU and p from x."""

    @mx.custom_function
    def gate(x, u, v, alpha):
        return _forward(x, u, v, alpha)[0]

    @gate.vjp
    def gate_vjp(primals, cotangent, output):
        x, u, v, alpha = primals
        d, (r, G) = x.shape[-1], v.shape
        s, zu, p = _forward(x, u, v, alpha)[1]
        # dg_j = sum over block j of x_k dy_k: a batched row dot, [..., G, 1, B] @ [..., G, B, 1]
        xb = x.reshape(*x.shape[:-1], G, 1, d // G)
        dg = (xb @ cotangent.reshape(*x.shape[:-1], G, d // G, 1)).reshape(*x.shape[:-1], G)
        dalpha = (dg * p).sum().reshape(alpha.shape)
        dp = alpha * dg
        dv = zu.reshape(-1, r).T @ dp.reshape(-1, G)
        dzu = dp @ v.T  # [..., r]
        du = x.reshape(-1, d).T @ (s * dzu).reshape(-1, r)  # z^T dzu with z = s x
        dz = dzu @ u.T  # [..., d]
        # RMS norm without weight: dx = s dz - s^3 x mean(x dz), and mean(x dz) = (zU . dzU) / (s d)
        c = s * s * (zu * dzu).sum(-1, keepdims=True) / d
        dx = _combine()(x, cotangent, dz, 1 + alpha * p, s, c)
        return dx, du, dv, dalpha

    return gate


def lars_gate(x: mx.array, u: mx.array, v: mx.array, alpha: mx.array) -> mx.array:
    """The gated input x * repeat(g), differentiable in all four; backward keeps only x."""
    return _gate_fn()(x, u, v, alpha)


class LARSLinear(nn.Module):
    """A frozen linear (nn.Linear or quantized) behind a trainable LARS gate."""

    def __init__(self, linear: nn.Module, rank: int, block: int):
        super().__init__()
        d = _input_dims(linear)
        self.linear = linear
        self.block = block
        bound = 1 / math.sqrt(rank)  # kaiming-uniform(a=sqrt 5) on [d, r]
        self.lars_u = mx.random.uniform(-bound, bound, (d, rank))
        self.lars_v = V_STD * mx.random.normal((rank, d // block))
        self.lars_alpha = mx.array([ALPHA_INIT])

    def __call__(self, x: mx.array) -> mx.array:
        dtype = x.dtype
        xt = lars_gate(x.astype(mx.float32), self.lars_u, self.lars_v, self.lars_alpha)
        return self.linear(xt.astype(dtype))


def _input_dims(linear: nn.Module) -> int:
    if isinstance(linear, nn.QuantizedLinear):
        return linear.weight.shape[1] * 32 // linear.bits
    return linear.weight.shape[1]


def lars_parameters(cfg) -> dict:
    return {"rank": cfg.rank, "block": cfg.lars_block, "keys": list(cfg.lora_keys)}


def wrap(model: nn.Module, num_layers: int, params: dict) -> None:
    """Freeze the model and put a LARSLinear around `keys` in its last `num_layers` blocks."""
    model.freeze()
    rank, block, keys = params["rank"], params["block"], params["keys"]
    layers = blocks.layers(model)
    for layer in layers[len(layers) - num_layers :]:
        swaps = []
        for name, module in layer.named_modules():
            if name in keys:
                d = _input_dims(module)
                if d % block:
                    raise UserError(
                        f"--lars-block {block}: does not divide the input width {d} of "
                        f"{name}; choose a divisor of it (e.g. 32)"
                    )
                swaps.append((name, LARSLinear(module, rank, block)))
        layer.update_modules(tree_unflatten(swaps))
    mx.eval(model.trainable_parameters())


def load(model: nn.Module, folder: Path, acfg: dict, weights_file: str) -> None:
    """Wrap `model` as `acfg` says and load the saved gate weights; every key must fit."""
    wrap(model, acfg["num_layers"], acfg["lars_parameters"])
    weights = mx.load(str(folder / weights_file))
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:1]
        raise UserError(f"{folder}: LARS adapter does not fit this model (e.g. {diff})")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
