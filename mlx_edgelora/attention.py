"""Long-context layer recompute: flash attention by query chunks, MLP over token chunks.

Paper: "Going beyond the paper" (long-context layer recompute), serving technique 2
(checkpointing): when a block is recomputed in the backward pass, no tensor of size L x L
(attention scores) or L x intermediate (SwiGLU) exists at once.
Why: MLX's fused attention has no fused backward, so autodiff of `layer(x, "causal")`
holds [B, H, L, L] scores and probabilities; autodiff of the MLP holds every token's
[intermediate] activations. Here attention is FlashAttention-2 style, one query chunk (row
block) at a time: `attend_rows` is its online-softmax forward (o and the log-sum-exp, scores
tile by tile), `grad_rows` its backward (P recomputed tile by tile); attn_half.py composes
them into the attention half's custom VJP. The MLP (with its half's norms) has a custom VJP
that recomputes one token chunk at a time (tokenwise.py). Both sit next to a plain
reference (`attention_reference`, `mlp_reference`); `attention_core` is the unchunked path.
`mx.depends` chains the tiles so that MLX's evaluator finishes one tile (and frees its
scores) before starting the next; without it, tiles feeding two accumulators stay alive.
Sliding-window layers (Gemma 3's local layers, Mistral's `layer_types`) mask keys older than
the window and skip the tiles wholly outside it. What a family puts around this core (q/k
norms, RoPE, the scale) lives in models/.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from .errors import UserError
from .lora import has_active_dropout
from .quant import fused_available, matmul
from .tokenwise import tokenwise, tokenwise_reference

# ----------------------------------------------------------------------------- attention


def attention_core(
    q: mx.array, k: mx.array, v: mx.array, scale: float, window: int | None = None
) -> mx.array:
    """Causal (optionally sliding-window) attention of rotated q [B, H, L, hd] and k, v
    [B, Hkv, L, hd] through MLX's fused kernel: the unchunked path (the chunked one is the
    attention half's, attn_half.py, built from attend_rows and grad_rows below)."""
    L = q.shape[2]
    mask = "causal" if window is None or window >= L else window_mask(L, window)
    if q.dtype == mx.float32 or fused_available():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    # CPU, half precision: MLX's fallback would run half matmuls without BLAS
    f32 = (a.astype(mx.float32) for a in (q, k, v))
    o = mx.fast.scaled_dot_product_attention(*f32, scale=scale, mask=mask)
    return o.astype(q.dtype)


def window_mask(L: int, window: int) -> mx.array:
    """[L, L] bool: key j visible to query i iff i - window < j <= i (mlx-lm's rule)."""
    i, j = mx.arange(L)[:, None], mx.arange(L)[None, :]
    return (i >= j) & (i < j + window)


def attention_reference(q, k, v, scale: float, window: int | None = None):
    """Plain causal (sliding-window) attention: full L x L scores, repeated K/V; (o, lse),
    autodiff only."""
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    L = q.shape[2]
    s = (q * scale) @ k.swapaxes(-1, -2)
    s = mx.where(window_mask(L, window or L), s, -mx.inf)
    lse = mx.logsumexp(s, axis=-1)
    return mx.exp(s - lse[..., None]) @ v, lse


Span = tuple[int, int]  # [start, end) token positions of one chunk
# A masked score. Finite, not -inf: with a sliding window a row of a tile can be masked
# whole, and exp(-inf - -inf) would be NaN; exp(MASKED - m) underflows to 0 instead.
MASKED = float(mx.finfo(mx.float32).min)


def _visible(qs: Span, ks: Span, window: int | None) -> bool:
    """Whether any key of span ks is visible to any query of span qs."""
    causal = ks[0] <= qs[1] - 1  # the first key is not after the last query
    return causal and (window is None or qs[0] - window < ks[1] - 1)


def _scores(qi: mx.array, kj: mx.array, qs: Span, ks: Span, rep: int, scale: float, window):
    """Scaled scores of one tile [B, Hkv, rep*n, m] in float32, MASKED where key j is not
    visible to query i (j > i, or j <= i - window).

    The scale is applied to the tile, not to q: a scaled copy of q would be one more
    [B, H, L, hd] tensor alive for the whole pass.
    """
    s = matmul(qi, kj.swapaxes(-1, -2), mx.float32) * scale
    after = ks[1] - 1 > qs[0]  # some key is after some query (diagonal tiles)
    outside = window is not None and qs[1] - 1 - ks[0] >= window  # some pair out of window
    if after or outside:
        i, j = mx.arange(*qs)[:, None], mx.arange(*ks)[None, :]
        keep = (i >= j) & (i < j + (window or qs[1]))  # [n, m]
        s = mx.where(mx.tile(keep, (rep, 1)), s, MASKED)
    return s


def attend_rows(qi, k, v, spans: list[Span], i: int, rep: int, scale: float, window):
    """(o, lse) of query chunk i (grouped rows qi [B, Hkv, rep*n, hd]) over the visible key
    chunks of k, v [B, Hkv, L, hd]: one row block of the online-softmax forward."""
    m = l = acc = None
    for j in range(i + 1):
        if not _visible(spans[i], spans[j], window):
            continue
        ks, ke = spans[j]
        if acc is not None:  # finish the previous tile before this one starts
            qi = mx.depends(qi, [acc, l])
        t = _scores(qi, k[:, :, ks:ke], spans[i], spans[j], rep, scale, window)
        m_new = t.max(axis=-1) if m is None else mx.maximum(m, t.max(axis=-1))
        p = mx.exp(t - m_new[..., None])
        pv = matmul(p.astype(v.dtype), v[:, :, ks:ke], mx.float32)
        if acc is None:
            l, acc = p.sum(axis=-1), pv
        else:
            alpha = mx.exp(m - m_new)
            l = alpha * l + p.sum(axis=-1)
            acc = alpha[..., None] * acc + pv
        m = m_new
    return (acc / l[..., None]).astype(qi.dtype), m + mx.log(l)


def grad_rows(qi, k, v, oi, lse_i, doi, spans: list[Span], i: int, dkv: list, scale, window):
    """dq of query chunk i (grouped rows, as attend_rows) from its output's cotangent doi;
    adds its share of dk, dv to dkv[j] = [dk_j, dv_j] (float32) of each visible key chunk j.
    The FlashAttention-2 backward of one row block: P = exp(S - lse) recomputed per tile."""
    rep = qi.shape[2] // (spans[i][1] - spans[i][0])
    d_i = (doi * oi).sum(axis=-1).astype(mx.float32)  # rowsum(dO * O)
    dq, last = None, []
    for j in range(i + 1):
        if not _visible(spans[i], spans[j], window):
            continue
        ks, ke = spans[j]
        kj, vj = k[:, :, ks:ke], v[:, :, ks:ke]
        if last:  # finish the previous tile before this one starts
            qi = mx.depends(qi, last)
        t = _scores(qi, kj, spans[i], spans[j], rep, scale, window)
        p = mx.exp(t - lse_i[..., None])
        ds = p * (matmul(doi, vj.swapaxes(-1, -2), mx.float32) - d_i[..., None])
        p, ds = p.astype(qi.dtype), (ds * scale).astype(qi.dtype)  # d(scores) / d(q k^T)
        dk, dv = dkv[j] or (None, None)
        dv = _acc(dv, matmul(p.swapaxes(-1, -2), doi, mx.float32))  # sums over rep heads
        dk = _acc(dk, matmul(ds.swapaxes(-1, -2), qi, mx.float32))
        dkv[j] = [dk, dv]
        dq = _acc(dq, matmul(ds, kj, mx.float32))
        last = [dq, dk, dv]
    return dq.astype(qi.dtype)


def _acc(total: mx.array | None, term: mx.array) -> mx.array:
    return term if total is None else total + term


# ----------------------------------------------------------------------------------- MLP


def mlp_forward(
    mlp: nn.Module, x: mx.array, chunk: int, norm=None, post=None, residual=None
) -> mx.array:
    """residual(x, post(mlp(norm(x)))) (norm, post: optional token-wise modules, e.g. the
    half's RMSNorms; residual: e.g. the block's x + r, None = the branch alone), over token
    chunks with a recomputing VJP when 0 < chunk < B*L."""
    if chunk <= 0 or chunk >= x.shape[0] * x.shape[1]:
        return _mlp_call(mlp, x, norm, post, residual)
    return chunked_mlp(mlp, x, chunk, norm, post, residual)


def mlp_reference(mlp: nn.Module, x: mx.array, chunk: int) -> mx.array:
    """Plain reference: the same token chunks, autodiff through the loop (keeps all)."""
    flat = x.reshape(1, -1, x.shape[-1])  # [1, B*L, D]
    (y,) = tokenwise_reference(lambda s, t: (mlp(t),), [flat], [1], [1], chunk)
    return y.reshape(*x.shape[:-1], -1)


def chunked_mlp(
    mlp: nn.Module, x: mx.array, chunk: int, norm=None, post=None, residual=None
) -> mx.array:
    """residual(x, post(mlp(norm(x)))) whose VJP recomputes each chunk's [chunk,
    intermediate] SwiGLU activations (tokenwise.py); chunks run over all B*L tokens. With the
    residual inside, the VJP's dx is written once, chunk by chunk: outside, the half's
    backward would hold the branch's dx and the sum with the cotangent as two more [L, D]."""
    _check_no_dropout(mlp)
    flat = x.reshape(1, -1, x.shape[-1])  # [1, B*L, D]
    modules = [m for m in (norm, mlp, post) if m is not None]
    fn = lambda s, t: (_mlp_call(mlp, t, norm, post, residual),)  # noqa: E731
    (y,) = tokenwise(fn, modules, [flat], [1], [1], chunk)
    return y.reshape(*x.shape[:-1], -1)


def _mlp_call(mlp: nn.Module, x: mx.array, norm, post, residual=None) -> mx.array:
    y = mlp(x if norm is None else norm(x))
    y = y if post is None else post(y)
    return y if residual is None else residual(x, y)


def _check_no_dropout(mlp: nn.Module) -> None:
    """Recompute would draw a second dropout mask; refuse instead of a silent mismatch."""
    if has_active_dropout(mlp):
        raise UserError(
            "--lora-dropout: active dropout cannot be recomputed by --mlp-chunk; "
            "set --lora-dropout 0 or --mlp-chunk 0"
        )
