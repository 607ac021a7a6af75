"""A block's attention half as one custom function, recomputed and differentiated per query chunk.

Paper: "Going beyond the paper" (long-context layer recompute), serving technique 2. The
half is y = residual(x, post(o_proj(attention(q(x), k(x), v(x))))), with q, k, v the
token-wise projections (norm, LoRA linears, RoPE: the family's). Built from separate custom
functions (token-wise q/k/v, the flash core, token-wise out) its VJP held every tensor between
them whole: q, k, v, the attention output o, do, dq, and dx as chunks plus their
concatenation, about 9 [L, D] (Llama-3.2-3B shape: 1.7 GB at 16K tokens in float32).
Here only what attention needs whole is: k and v (and their float32 gradients; with grouped
queries each is a third of [L, D] on Llama-3.2-3B), besides the input x, its cotangent and
dx. The VJP walks the query chunks last to first; for each it recomputes q_i, the chunk's
output o_i and log-sum-exp (attention.attend_rows), takes the out projection's VJP
(do_i), the flash backward of the chunk's rows (attention.grad_rows: dq_i, and dk, dv of the
key chunks it sees), the q projection's VJP, and then, key chunk i being complete (no earlier
query sees it), the k/v projections' VJP; dx_i is written once (tokenwise.write_rows).
About 4.3 [L, D] in all. The extra compute is one attention forward per step (o_i,
recomputed in the backward), where the separate functions recomputed the half's forward.
The forward runs the same per-chunk computations (k, v whole, then per query chunk q_i, o_i
and y_i), so its outputs are those of the separate functions, and it holds x, k, v and y.
`attention_half_reference` is the same computation under plain autodiff.

Kept attention output (`--keep-attention`, on by default): under `record()` the forward also
returns each half's o and log-sum-exp (o as [B, H, L, hd] in the compute dtype, lse [B, H, L]
float32: one [L, q] and one [L, H] per attention half), which the engine stores with the
boundaries (RAM or disk, spill.py); under `reuse(kept)` the recompute takes them instead of
running attend_rows again. That skips the one attention forward per step the VJP otherwise
repeats (~0.9 s of a SmolLM2 block's 2.4 s at 2048 tokens); the gradients are the same bits,
since o and lse are the very arrays the forward computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from .attention import Span, attend_rows, attention_reference, grad_rows
from .tokenwise import assemble, bind, spans, write_rows


@dataclass(frozen=True)
class HalfFns:
    """The family's token-wise parts of an attention half, on one token chunk.

    q(start, x [B, n, D]) -> [B, H, n, hd]; kv(start, x) -> (k, v) [B, Hkv, n, hd] (both
    rotated: `start` is the chunk's first position); out(start, x, o [B, H, n, hd]) -> y
    [B, n, D], the half's output (o projection, post norm, residual with x).
    """

    q: Callable
    kv: Callable
    out: Callable
    scale: float
    window: int | None = None


Kept = tuple[mx.array, mx.array]  # (o [B, H, L, hd], lse [B, H, L]) of one attention half
_scope: list[tuple[str, list[Kept]]] = []  # the active record / reuse scope, innermost last


@contextmanager
def record() -> Iterator[list[Kept]]:
    """Attention halves built inside append their forward's (o, lse) to the yielded list, in
    call order (lazy arrays: evaluate them with the output)."""
    kept: list[Kept] = []
    _scope.append(("record", kept))
    try:
        yield kept
    finally:
        _scope.pop()


@contextmanager
def reuse(kept: list[Kept]) -> Iterator[None]:
    """Attention halves built inside take, in call order, the (o, lse) that `record` gave for
    the same halves on the same input; their VJP then skips recomputing them."""
    pending = list(kept)
    _scope.append(("reuse", pending))
    try:
        yield
    finally:
        _scope.pop()
    if pending:
        raise RuntimeError(f"{len(pending)} kept attention outputs were not used")


def attention_half(fns: HalfFns, modules: Sequence[nn.Module], x: mx.array, chunk: int) -> mx.array:
    """The half's output y [B, L, D] for x [B, L, D] over query chunks of `chunk` tokens, with
    the VJP of the module docstring. `modules`: those whose trainable parameters (LoRA) the
    functions use; their gradients come back as with tokenwise.tokenwise."""
    params = [p for m in modules for _, p in tree_flatten(m.trainable_parameters())]
    plan = _Plan(bind(fns.q, modules), bind(fns.kv, modules), bind(fns.out, modules), fns, chunk)
    mode, kept = _scope[-1] if _scope else ("", [])
    if mode == "reuse" and not kept:
        raise RuntimeError("an attention half has no kept output to reuse")
    saved = kept.pop(0) if mode == "reuse" else None
    # a tuple: a list of cotangents
    f = mx.custom_function(lambda x, *p: _forward(plan, x, p, mode == "record"))

    def vjp(primals, cotangents, outputs):
        return _backward(plan, primals[0], primals[1:], cotangents[0], saved)

    f.vjp(vjp)
    y, *o_lse = f(x, *params)
    if mode == "record":
        kept.append(tuple(o_lse))
    return y


@dataclass(frozen=True)
class _Plan:
    q: Callable  # (start, chunks, params) -> outputs, the params set on the modules
    kv: Callable
    out: Callable
    fns: HalfFns
    chunk: int


def _group(a: mx.array, kv: int) -> mx.array:
    """[B, H, n, ...] -> [B, Hkv, rep*n, ...]: query heads grouped by their KV head (the layout
    of attention._rows)."""
    B, H, n = a.shape[:3]
    return a.reshape(B, kv, (H // kv) * n, *a.shape[3:])


def _ungroup(a: mx.array, H: int, n: int) -> mx.array:
    return a.reshape(a.shape[0], H, n, *a.shape[3:])


def _keys(plan: _Plan, x: mx.array, params, ss: list[Span]) -> tuple[mx.array, mx.array]:
    """k, v [B, Hkv, L, hd] of the whole sequence, chunk by chunk."""
    ks, vs, last = [], [], []
    for s, e in ss:
        xi = x[:, s:e]
        if last:
            xi = mx.depends(xi, last)
        k, v = plan.kv(s, [xi], params)
        ks.append(k)
        vs.append(v)
        last = [k, v]
    return assemble(ks, ss, 2), assemble(vs, ss, 2)


def _forward(plan: _Plan, x: mx.array, params, keep: bool) -> tuple[mx.array, ...]:
    """(y,), or with `keep` (y, o [B, H, L, hd], lse [B, H, L]); o and lse are written chunk by
    chunk into their buffers as they come, as dx is in the backward."""
    ss = spans(x.shape[1], plan.chunk)
    k, v = _keys(plan, x, params, ss)
    ys, last, kept = [], [k, v], []
    for i, (s, e) in enumerate(ss):
        xi = mx.depends(x[:, s:e], last)  # finish the previous chunk before this one starts
        (q,) = plan.q(s, [xi], params)
        B, H = q.shape[:2]
        o, lse = attend_rows(_group(q, k.shape[1]), k, v, ss, i, H // k.shape[1], *_sw(plan))
        o = _ungroup(o, H, e - s)
        (y,) = plan.out(s, [xi, o], params)
        ys.append(y)
        last = [y]
        if keep:
            if not kept:
                kept = [
                    mx.zeros((B, H, x.shape[1], o.shape[3]), o.dtype),
                    mx.zeros((B, H, x.shape[1]), lse.dtype),
                ]
            kept = [
                write_rows(kept[0], o, s, 2),
                write_rows(kept[1], _ungroup(lse, H, e - s), s, 2),
            ]
            last += kept
    return (assemble(ys, ss, 1), *kept)


def _sw(plan: _Plan) -> tuple[float, int | None]:
    return plan.fns.scale, plan.fns.window


def _backward(plan: _Plan, x: mx.array, params, cot: mx.array, saved: Kept | None):
    ss = spans(x.shape[1], plan.chunk)
    k, v = _keys(plan, x, params, ss)
    kv = k.shape[1]
    dkv: list = [None] * len(ss)  # [dk_j, dv_j] float32, while key chunk j is incomplete
    dx = mx.zeros(x.shape, x.dtype)
    dps: list = [None] * len(params)
    last = [k, v]
    for i in reversed(range(len(ss))):
        s, e = ss[i]
        xi = mx.depends(x[:, s:e], last)  # finish the previous chunk before this one starts
        (q,) = plan.q(s, [xi], params)
        H = q.shape[1]
        qg = _group(q, kv)
        if saved is None:
            o, lse = attend_rows(qg, k, v, ss, i, H // kv, *_sw(plan))
        else:  # the forward's, kept: the same arrays attend_rows would give
            o, lse = (_group(a[:, :, s:e], kv) for a in saved)
        # the out projection (and residual): dx's share through it, do, its parameters
        dxi, do, *dp = _vjp(plan.out, s, [xi, _ungroup(o, H, e - s)], params, [cot[:, s:e]])
        dq = grad_rows(qg, k, v, o, lse, _group(do, kv), ss, i, dkv, *_sw(plan))
        dxq, *dq_p = _vjp(plan.q, s, [xi], params, [_ungroup(dq, H, e - s)])
        dk, dv = dkv[i]  # complete: queries before chunk i never see its keys
        dkv[i] = None
        dxk, *dk_p = _vjp(plan.kv, s, [xi], params, [dk.astype(k.dtype), dv.astype(v.dtype)])
        dxi = dxi + dxq + dxk
        dps = [_sum(t, a, b, c) for t, a, b, c in zip(dps, dp, dq_p, dk_p)]
        dx = write_rows(dx, dxi, s, 1)
        last = [dxi, *dps, *(t for pair in dkv if pair for t in pair)]
    return (dx, *dps)


def _vjp(fn, start: int, chunks: list, params, cotangents: list) -> list[mx.array]:
    """d/d(chunks, params) of fn(start, chunks) at `cotangents`: [*d_chunks, *d_params]."""
    n = len(chunks)
    _, grads = mx.vjp(lambda *a: fn(start, a[:n], a[n:]), [*chunks, *params], cotangents)
    return list(grads)


def _sum(total, *terms):
    out = sum(terms[1:], terms[0])
    return out if total is None else total + out


def attention_half_reference(fns: HalfFns, x: mx.array) -> mx.array:
    """The same half under plain autodiff, unchunked: k, v, q of all tokens, causal
    (windowed) softmax attention, out."""
    k, v = fns.kv(0, x)
    o, _ = attention_reference(fns.q(0, x), k, v, fns.scale, fns.window)
    return fns.out(0, x, o)
