"""Token-wise functions run over token chunks, with a VJP that recomputes one chunk at a time.

Paper: technique 2 (recompute), long-context part. A half-block's token-wise parts (its
norms, the q/k/v/o projections with their LoRA, the MLP) map each token's row on its own, so
under VJP they can be recomputed and differentiated chunk by chunk. The recompute then holds
one chunk's intermediates ([chunk, d] each) instead of one [L, d] tensor per projection input
and output: only the function's inputs, outputs and input gradients are whole.
The token axis may differ per array (x [B, L, D], heads [B, H, L, hd]); `fn` gets the chunk's
first position too (RoPE needs it). `mx.depends` chains the chunks so that MLX finishes one
before the next starts, and each whole output (and input gradient) is written chunk by chunk
into one buffer (`assemble`: `mx.slice_update`, which reuses the buffer it updates) instead of
concatenated: a concatenation holds every chunk and the result, twice the bytes.
`tokenwise_reference` is the same loop under plain autodiff.
Measured limit: MLX still evaluates every chunk's input gradient before the writes that
assemble dx (about 2 [L, D] at the peak), and `mx.eval` inside this VJP cannot help (it keeps
what it evaluates linked to the traced graph). So the segment engine's backward of an
MLP-half segment does not use this VJP: it runs one evaluated VJP per chunk itself
(engine.SegmentStep._vjp_by_rows, dx held once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

# fn(start, *chunks) -> outputs: rows start.. of every output from the same rows of the inputs
TokenFn = Callable[..., Sequence[mx.array]]


def spans(L: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each token chunk (the last one may be shorter)."""
    return [(s, min(s + chunk, L)) for s in range(0, L, chunk)]


def tokenwise(
    fn: TokenFn,
    modules: Sequence[nn.Module],
    xs: Sequence[mx.array],
    in_axes: Sequence[int],
    out_axes: Sequence[int],
    chunk: int,
) -> tuple[mx.array, ...]:
    """fn(0, *xs) computed and differentiated in token chunks (0 < chunk < L), else whole.

    `modules`: those whose trainable parameters (e.g. LoRA A/B) fn uses; they become explicit
    inputs of the custom function, so their gradients reach whatever arrays the modules hold.
    """
    L = xs[0].shape[in_axes[0]]
    if chunk <= 0 or chunk >= L:
        return tuple(fn(0, *xs))
    plan = _Plan(bind(fn, modules), spans(L, chunk), tuple(in_axes), tuple(out_axes))
    params = [p for m in modules for _, p in tree_flatten(m.trainable_parameters())]
    n = len(xs)
    f = mx.custom_function(lambda *a: _forward(plan, a[:n], a[n:]))

    def vjp(primals, cotangents, outputs):
        return _backward(plan, primals[:n], primals[n:], cotangents)

    f.vjp(vjp)
    return tuple(f(*xs, *params))


def tokenwise_reference(fn: TokenFn, xs, in_axes, out_axes, chunk: int) -> tuple[mx.array, ...]:
    """The same chunks under plain autodiff (keeps every chunk's intermediates)."""
    outs = []
    for s, e in spans(xs[0].shape[in_axes[0]], chunk):
        outs.append(fn(s, *(_rows(x, ax, s, e) for x, ax in zip(xs, in_axes))))
    return _join(outs, out_axes)


@dataclass(frozen=True)
class _Plan:
    pure: Callable  # (start, chunks, params) -> outputs, with params set on the modules
    spans: list[tuple[int, int]]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]


def _join(outs: list, out_axes: Sequence[int]) -> tuple[mx.array, ...]:
    """Each output's chunks concatenated along its token axis."""
    return tuple(mx.concatenate([o[j] for o in outs], axis=ax) for j, ax in enumerate(out_axes))


def _rows(a: mx.array, axis: int, s: int, e: int) -> mx.array:
    """Positions s:e of `a` along its token axis."""
    return a[(slice(None),) * axis + (slice(s, e),)]


def assemble(chunks: Sequence[mx.array], spans_: Sequence[tuple[int, int]], axis: int):
    """The chunks written at their spans along `axis` into one buffer, in order.

    Each `mx.slice_update` reuses its input buffer once nothing else holds it (MLX donates
    it), so the whole array is allocated once and each chunk is freed as soon as it is
    written, where `mx.concatenate` holds all chunks and its result at once.
    """
    first = chunks[0]
    shape = list(first.shape)
    shape[axis] = spans_[-1][1]
    out = mx.zeros(shape, first.dtype)
    for c, (s, _) in zip(chunks, spans_):
        out = write_rows(out, c, s, axis)
    return out


def write_rows(out: mx.array, chunk: mx.array, start: int, axis: int) -> mx.array:
    """`out` with `chunk` written at position `start` of its token axis (in place when MLX
    can donate `out`)."""
    return mx.slice_update(out, chunk, mx.array([start]), [axis])


def bind(fn: TokenFn, modules: Sequence[nn.Module]):
    """(start, chunks, params) -> fn's outputs with `params` set on the modules, restored after."""
    names = [[k for k, _ in tree_flatten(m.trainable_parameters())] for m in modules]

    def call(start: int, chunks, params) -> tuple[mx.array, ...]:
        saved = [m.trainable_parameters() for m in modules]
        it = iter(params)
        for m, ks in zip(modules, names):
            m.update(tree_unflatten([(k, next(it)) for k in ks]))
        try:
            return tuple(fn(start, *chunks))
        finally:
            for m, p in zip(modules, saved):
                m.update(p)

    return call


def _forward(plan: _Plan, xs, params) -> tuple[mx.array, ...]:
    outs: list[tuple[mx.array, ...]] = []
    for s, e in plan.spans:
        chunks = [_rows(x, ax, s, e) for x, ax in zip(xs, plan.in_axes)]
        if outs:  # finish the previous chunk before this one starts
            chunks = [mx.depends(c, list(outs[-1])) for c in chunks]
        outs.append(plan.pure(s, chunks, params))
    return tuple(
        assemble([o[j] for o in outs], plan.spans, ax) for j, ax in enumerate(plan.out_axes)
    )


def _backward(plan: _Plan, xs, params, cotangents) -> tuple[mx.array, ...]:
    """Per chunk: recompute under mx.vjp w.r.t. (input chunks, params); sum param cotangents."""
    n = len(xs)
    dxs: list[list[mx.array]] = [[] for _ in xs]
    dps: list[mx.array | None] = [None] * len(params)
    last: list[mx.array] = []
    for s, e in plan.spans:
        chunks = [_rows(x, ax, s, e) for x, ax in zip(xs, plan.in_axes)]
        if last:  # finish the previous chunk (free its recompute) before this one starts
            chunks = [mx.depends(c, last) for c in chunks]
        cts = [_rows(c, ax, s, e) for c, ax in zip(cotangents, plan.out_axes)]
        _, grads = mx.vjp(lambda *a, s=s: plan.pure(s, a[:n], a[n:]), [*chunks, *params], cts)
        for d, g in zip(dxs, grads[:n]):
            d.append(g)
        dps = [g if t is None else t + g for t, g in zip(dps, grads[n:])]
        last = [*grads[:n], *dps]
    dx = [assemble(d, plan.spans, ax) for d, ax in zip(dxs, plan.in_axes)]
    return (*dx, *dps)
