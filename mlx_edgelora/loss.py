"""Loss heads on the trainable rows only: full reference, exact vocabulary-chunked, top-k subset.

Paper technique 4 (logits masking): the hidden states of the trainable positions are selected
*before* the final norm and the LM head, so logits exist only for rows that carry loss and no
sequence x vocabulary tensor is ever built. Paper technique 3 (softmax over a vocabulary
subset): `subset` takes the softmax over the step's targets plus k - |targets| more tokens: by
default those the model itself predicts most this step (found by two no-gradient passes over
the head, `predicted_scores`), or, as in the paper, the targets' nearest LM-head neighbours
(neighbours.py). Measured on SmolLM2 at k = 1000 (bench/subset_quality.py): the
neighbour fill leaves 32% of the softmax mass outside S (dL/dh cosine 0.913 with the exact
gradient), the predicted fill 10% (cosine 0.995); with the rest of the vocabulary as one
pseudo-token (`subset_tail_ce`, the default) cosine 0.9997 and, after 20 training steps, a
held-out exact loss 0.13% above exact training (renormalized: +5.1%) on the bundled data,
but +2.2% after 60 steps on an outside FAQ set (issue 21): not a general quality claim. The
scoring pass costs about what the exact loss does; `--subset-refresh N` (PredictedSubset)
runs it only every N calls, the calls in between cost only the k-row head
(bench/results/subset_cost.md) and report an approximate loss value; `--subset-fill sampled`
(subset_sampled.py) replaces their one-direction tail model by importance-sampled negatives.
Our exact alternative,
`chunked`, is a vocabulary-chunked log-sum-exp with its own VJP (as in Cut Cross-Entropy):
the forward keeps only one [rows, chunk] block of logits alive and stores just the per-row
LSE; the backward recomputes each block's softmax. A quantized head is dequantized one chunk
(or only the needed rows) at a time. Every head returns the SUM of token cross-entropies.

Peak memory of the loss head alone (loss + dL/dh; SmolLM2's real head: V 49152, D 576,
8-bit, --vocab-chunk 8192; 2048 rows of real chat targets; MB above the inputs; mlx 0.32.4
CPU):  full 1566 -> 1411, chunked 566 -> 140, subset (k 1000) 65 -> 57-64 (noise).
(A block's backward at 2048 tokens is 293 MB, so the chunked head is no longer a step's peak.)
Three causes, three fixes: (a) dequantizing from float16 scales and then casting holds
float16 and float32 copies of a chunk: scales/biases are cast to float32 first (quant.py's
recipe); (b) MLX schedules ops ~100 ahead, so it dequantized and multiplied many vocabulary
chunks before reducing any: each tile now waits (`mx.depends`) for the previous tile's
result, in the forward, in the VJP and across row passes; (c) MLX still *allocates* a few
tiles ahead of the compute, so the peak scales with the tile: ROW_BLOCK_ELEMENTS went from
2^24 (64 MB tiles; 298 MB after (a)+(b)) to 2^22 (16 MB; 140 MB) and then to 2^20 (4 MB).
Smaller tiles cost little (the frozen head is re-dequantized once per row pass): 2^24 / 2^23 /
2^22 / 2^21 measured 289 / 163 / 131 / 113 MB (random targets) at 19-23 / 29-31 / 25-27 /
24-25 s per call on the shared, loaded 2-core CPU (load ~5, so the timings are +-20%). Later,
Q4_1 head (loss + dL/dh, 2048 random rows, load ~2): 2^22 / 2^21 / 2^20 / 2^19 = 129 / 72 /
56 / 56 MB at 19-21 / 22 / 23-24 / 27 s. At 2^20 the head is below a block's backward (~100
MB at 2048 tokens), and a 512-token validation pass fell from 87 to 27 MB above the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from .blocks import final_norm, head_logits, head_shape, head_weight_rows
from .errors import UserError
from .neighbours import neighbour_table

# Size of one rows x vocab-tile logits tile in the chunked loss (2^20 fp32 = 4 MB); it also caps
# the dequantized head tile (vocab_tile). MLX allocates a few tiles ahead of the compute, so
# the head's peak scales with this (see the docstring); below 2^20 it stopped falling.
ROW_BLOCK_ELEMENTS = 1 << 20

# Rows x D of one block of rows of the tiled head (LossHead.value_and_grad): 2^22 float32 =
# 16 MB per [rows, D] array (1365 rows at D = 3072); each block re-reads the head's tiles, so
# blocks much smaller than a vocabulary tile's work would cost dequantizing time.
HEAD_ROW_ELEMENTS = 1 << 22

CrossEntropy = Callable[[mx.array, np.ndarray], mx.array]


def head_rows(D: int) -> int:
    """Rows per block of the tiled head: HEAD_ROW_ELEMENTS // D (at least 256)."""
    return max(256, HEAD_ROW_ELEMENTS // D)


def vocab_tile(chunk: int, D: int) -> int:
    """Head rows per vocabulary tile: --vocab-chunk, capped so that one dequantized float32
    tile [tile, D] is at most ROW_BLOCK_ELEMENTS (4 MB). Why: at D = 3072 (Llama-3.2-3B) an
    8192-row tile would be a 100 MB temporary, more than the logits tile it feeds."""
    return max(1, min(chunk, ROW_BLOCK_ELEMENTS // D))


def full_ce(x: mx.array, w: mx.array, targets: mx.array) -> mx.array:
    """Reference per-row CE: logits [N, V] = x @ w.T over the whole vocabulary."""
    return logits_ce(x @ w.T, targets)


def logits_ce(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row CE of logits [N, V] (autodiff keeps them and their softmax: the paper's
    baseline head, before techniques 3 and 4)."""
    target = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return mx.logsumexp(logits, axis=-1) - target


def chunked_lse(
    x: mx.array, chunk_rows: Callable[..., mx.array], V: int, chunk: int, rows: int = 0
) -> mx.array:
    """logsumexp(x @ W.T, axis=-1) [N], W read in vocabulary chunks, with a recomputing VJP.

    `chunk_rows(start, stop, after)` returns W[start:stop] as float32, read only once the
    arrays `after` are computed; W is a constant (frozen head). Rows go through the
    vocabulary `rows` at a time (0 = all at once). Every tile is chained on the previous
    tile's result with `mx.depends`, in forward and backward: MLX otherwise schedules the
    dequantize and matmul of many chunks ahead and holds their tiles at once.
    """
    rows = rows or x.shape[0]
    blocks = [(r, min(r + rows, x.shape[0])) for r in range(0, x.shape[0], rows)]
    starts = range(0, V, chunk)

    @mx.custom_function
    def lse(x):
        outs, prev = [], None
        for r, e in blocks:
            out = None
            for s in starts:
                w = chunk_rows(s, min(s + chunk, V), prev)  # [chunk, D]
                part = mx.logsumexp(x[r:e] @ w.T, axis=-1)  # [rows]
                out = prev = part if out is None else mx.logaddexp(out, part)
            outs.append(out)
        return mx.concatenate(outs)

    @lse.vjp
    def lse_vjp(x, cotangent, out):
        # d lse / d x = softmax(x W^T) @ W, accumulated chunk by chunk.
        dxs, prev = [], cotangent
        for r, e in blocks:
            xb, ob, cb = x[r:e], out[r:e, None], cotangent[r:e, None]
            dx = None
            for s in starts:
                w = chunk_rows(s, min(s + chunk, V), prev)  # [chunk, D], dropped after use
                g = (mx.exp(xb @ w.T - ob) * cb) @ w  # [rows, chunk] @ [chunk, D]
                dx = prev = g if dx is None else dx + g
            dxs.append(dx)
        return mx.concatenate(dxs)

    return lse(x)


def chunked_ce(x: mx.array, targets: np.ndarray, model: nn.Module, chunk: int) -> mx.array:
    """Exact CE summed over rows; each pass over the vocabulary takes a block of rows."""
    V, D = head_shape(model)
    chunk = vocab_tile(chunk, D)
    rows = max(1, ROW_BLOCK_ELEMENTS // chunk)

    def chunk_rows(s: int, e: int, after: Any) -> mx.array:
        return head_weight_rows(model, slice(s, e), after)

    lse = chunked_lse(x, chunk_rows, V, chunk, rows)
    # target logits [N]: the gathered rows [N, D] are small; dequantized after the LSE passes
    target = (x * head_weight_rows(model, targets, after=lse)).sum(-1)
    return (lse - target).sum()


def tiled_ce(
    x: mx.array,
    targets: np.ndarray,
    weight_rows: Callable[..., mx.array],
    V: int,
    tile: int,
    grad: bool = True,
) -> tuple[mx.array, mx.array | None]:
    """(summed exact CE, dCE/dx or None) of x [N, D] against the head W, evaluated tile by tile.

    The same sums as chunked_ce, computed eagerly instead of as one lazy graph: each
    vocabulary tile W[s:e] (`weight_rows(slice)`, float32) is read, used and freed before the
    next is read, and nothing is traced. Why: the lazy graph's VJP holds several [N, D]
    partial sums at once (0.14 GB above its inputs at 2048 x 3072), and the tiles can come
    from disk (WeightStream.head_reader), so the loss never needs the whole head in memory:
    on the Llama-3.2-3B shape the head (0.21 GB at INT4) was the step's largest tensor.
    One pass over the vocabulary, as an online softmax (FlashAttention's rescaling): with
    the running log-sum-exp `lse` of the tiles so far, dx_acc = sum_v exp(z_v - lse) W_v is
    rescaled by exp(lse_old - lse_new) whenever a tile raises lse. Why: a second pass
    (the row LSEs first, then sum_v softmax_v W_v) recomputed every logit and re-read and
    re-dequantized every tile, a third of the head's time. The loss is the same sum of
    per-tile logsumexps as that first pass, bit for bit; dx is equal up to rounding. One
    [N, tile] buffer per tile, as in that second pass: the tile's logits are evaluated with
    their logsumexp, then overwritten by their softmax (MLX reuses an unreferenced buffer).
    """
    lse = dx = None
    for s in range(0, V, tile):
        w = weight_rows(slice(s, min(s + tile, V)))  # [tile, D]
        z = x @ w.T  # [N, tile]
        part = mx.logsumexp(z, axis=-1)
        new = part if lse is None else mx.logaddexp(lse, part)
        if not grad:
            lse = new
            mx.eval(lse)
            continue
        mx.eval(z, new)  # then z's buffer becomes the tile's softmax in place
        p = mx.exp(z - new[:, None])  # softmax over the tiles so far [N, tile]
        del z
        dx = p @ w if dx is None else mx.addmm(dx * mx.exp(lse - new)[:, None], p, w)
        del p, w
        lse = new
        mx.eval(dx)
    w_t = weight_rows(targets)  # [N, D]: the targets' head rows
    loss = (lse - (x * w_t).sum(-1)).sum()
    if not grad:
        return loss, None
    dx = dx - w_t
    mx.eval(loss, dx)
    return loss, dx


def _fill(targets: np.ndarray, order: np.ndarray, k: int, V: int) -> np.ndarray:
    """Every distinct target, then tokens from `order` (best first) until |S| = min(k, V)."""
    if k >= V:
        return np.arange(V, dtype=np.int32)
    uniq = np.unique(targets)
    if uniq.size >= k:
        return uniq.astype(np.int32)
    chosen = np.zeros(V, dtype=bool)
    chosen[uniq] = True
    order = order[~chosen[order]]
    order = order[np.sort(np.unique(order, return_index=True)[1])]  # first occurrence wins
    chosen[order[: k - uniq.size]] = True
    return np.flatnonzero(chosen).astype(np.int32)


def subset_for(targets: np.ndarray, table: np.ndarray, k: int, V: int) -> np.ndarray:
    """S for --subset-fill neighbours (sorted int32): every distinct target plus neighbours.

    |S| = min(k, V) exactly, unless there are more distinct targets than k: then S is exactly
    the targets. Filling is round-robin over the targets (most frequent target first), each
    contributing its nearest not-yet-chosen neighbour of rank 0, then rank 1, ... so every
    target gets its hardest negatives. If the table runs out (few distinct targets), the rest
    is the lowest unchosen token ids (BPE vocabularies put the most frequent tokens first).
    """
    if k >= V:
        return np.arange(V, dtype=np.int32)
    uniq, counts = np.unique(targets, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    ranked = table[order].T.ravel()  # rank 0 of every target, then rank 1, ...
    return _fill(targets, np.concatenate([ranked, np.arange(V)]), k, V)


@dataclass
class Scores:
    """What one no-gradient pass over the head tells about a step's rows (predicted_scores)."""

    mass: np.ndarray  # [V] float64: softmax probability of each token, summed over rows
    lse: mx.array  # [N] exact log-sum-exp of each row's logits
    pull: mx.array  # [D] sum over tokens of mass[v] * W[v] (the expected head row, x N)


def predicted_scores(x: mx.array, model: nn.Module, chunk: int) -> Scores:
    """Exact per-token predicted mass, row LSEs and mass-weighted head row, without gradient.

    Two passes over the vocabulary per block of rows (the row LSEs, then exp(logit - LSE)
    summed over rows), tile by tile as in the chunked loss: one [rows, chunk] tile is alive
    at a time. Cost: about two chunked-loss forwards; nothing is kept for the backward.
    """
    # A fresh array, not stop_gradient: inside a grad trace (the loss segment's VJP) every
    # tile evaluated from a traced x stays alive until the trace ends (1.4 GB instead of
    # 0.13 GB for SmolLM2's head at 2048 rows, measured).
    x = mx.array(np.array(x.astype(mx.float32)))
    V, D = head_shape(model)
    chunk = vocab_tile(chunk, D)
    rows = max(1, ROW_BLOCK_ELEMENTS // chunk)
    mass = np.zeros(V, dtype=np.float64)
    lses, pull = [], mx.zeros((D,))
    for r in range(0, x.shape[0], rows):
        xb = x[r : r + rows]
        lse = chunked_lse(xb, lambda s, e, a: head_weight_rows(model, slice(s, e), a), V, chunk)
        mx.eval(lse)
        lses.append(lse)
        for s in range(0, V, chunk):
            w = head_weight_rows(model, slice(s, min(s + chunk, V)))
            part = mx.exp(xb @ w.T - lse[:, None]).sum(0)  # [chunk]
            pull = pull + part @ w
            mx.eval(part, pull)
            mass[s : s + part.size] += np.array(part, dtype=np.float64)
    return Scores(mass, mx.concatenate(lses), pull)


def predicted_mass(x: mx.array, model: nn.Module, chunk: int) -> np.ndarray:
    """[V] sum over rows of the model's exact softmax probability of each token (no gradient)."""
    return predicted_scores(x, model, chunk).mass


def subset_predicted(x: mx.array, targets: np.ndarray, model: nn.Module, k: int, chunk: int):
    """S for --subset-fill predicted: the targets plus the tokens the model itself expects most.

    Tokens are ranked by their predicted probability summed over the step's rows, so S holds
    the most softmax mass a k-subset can (the renormalized softmax then errs least). Measured
    on SmolLM2 (bench/subset_quality.py): at k = 1000 it leaves ~10% of the mass outside S and
    dL/dh cosine 0.995, where the targets' semantic neighbours leave 32% (cosine 0.913).
    """
    V, _ = head_shape(model)
    if k >= V:
        return np.arange(V, dtype=np.int32)
    return _most_expected(targets, predicted_mass(x, model, chunk), k)


def _most_expected(targets: np.ndarray, mass: np.ndarray, k: int) -> np.ndarray:
    """The targets, then the tokens of highest predicted mass, up to k (sorted int32)."""
    return _fill(targets, np.argsort(-mass, kind="stable"), k, mass.size)


def subset_tail_ce(x: mx.array, targets: np.ndarray, subset: np.ndarray, model, scores: Scores):
    """CE over S plus one pseudo-token for the rest: exact value, approximate gradient.

    Renormalizing over S (the paper's subset loss) never pushes down tokens outside S, so in
    training their mass grows and the exact loss drifts up (SmolLM2, k 1000, 20 steps: held-out
    exact loss +5% vs exact training; mass outside S 10% -> 25%). Here the rest of the
    vocabulary is one extra logit per row whose exp is the row's exact outside-S sum (from the
    scoring pass's exact LSE), and whose gradient direction is the step's mass-weighted mean
    head row outside S. The loss value is the exact CE; dL/dx = sum_S p_v w_v + p_out c - w_y
    with exact (not renormalized) p, only the per-row outside-S direction averaged.
    """
    w = head_weight_rows(model, subset)  # [k, D]
    z = x @ w.T  # [N, k]
    log_out = scores.lse + mx.log(_outside_fraction(z, scores.lse))  # [N] log outside-S sum
    c = _tail_direction(scores, subset, w)
    return _ce_with_tail(x, targets, subset, z, log_out, c)


def _outside_fraction(z: mx.array, lse: mx.array) -> mx.array:
    """[N] share of each row's softmax mass outside S (z = the logits over S)."""
    out = 1 - mx.exp(mx.logsumexp(mx.stop_gradient(z), axis=-1) - lse)
    return mx.maximum(out, 1e-12)  # float error can make it <= 0 when S holds all the mass


def _tail_direction(scores: Scores, subset: np.ndarray, w: mx.array) -> mx.array:
    """[D] the scored rows' mass-weighted mean head row over the tokens outside S."""
    out_mass = scores.mass.sum() - scores.mass[subset].sum()
    return (scores.pull - mx.array(scores.mass[subset], mx.float32) @ w) / max(out_mass, 1e-12)


def _ce_with_tail(x, targets, subset, z, log_out, c) -> mx.array:
    """Summed CE over [z | tail logit]: the tail's value is log_out [N], its gradient c [D]."""
    xc = x @ mx.stop_gradient(c)  # [N]
    z_out = xc + mx.stop_gradient(log_out - xc)
    logits = mx.concatenate([z, z_out[:, None]], axis=1)
    pos = mx.array(np.searchsorted(subset, targets).astype(np.int32))
    target = mx.take_along_axis(z, pos[:, None], axis=-1)[:, 0]
    return (mx.logsumexp(logits, axis=-1) - target).sum()


class PredictedSubset:
    """--subset-fill predicted as a callable (x, targets) -> summed CE, with --subset-refresh.

    The scoring pass (predicted_scores: two no-gradient passes over the whole head) runs on
    the first call and then every `refresh` calls (one call per micro-batch); in between, the
    last pass's token mass ranks the fill (S = this call's targets + the k most expected
    tokens then), and the tail pseudo-token's log outside-S sum of a row is x . c + b, with c
    the cached outside-S direction and b the mean of (exact log outside sum - x . c) over the
    scored rows: a first-order model of the tail's LSE, refitted at each refresh. Those calls
    cost only the k-row head (no pass over V) and their loss value is approximate:
    `last_exact` says which. The cached pass (call count, token mass, outside direction,
    offset) is saved with each checkpoint (`state_dict`): a resumed run continues as an
    unbroken one.
    """

    def __init__(self, model: nn.Module, k: int, chunk: int, tail: bool, refresh: int = 1):
        self.model, self.k, self.chunk, self.tail, self.refresh = model, k, chunk, tail, refresh
        self.calls, self.scores, self.offset = 0, None, 0.0
        self.last_exact = tail  # a renormalized subset's value is never the exact CE

    def __call__(self, x: mx.array, targets: np.ndarray) -> mx.array:
        fresh = self.scores is None or self.calls % self.refresh == 0
        self.calls += 1
        if fresh:
            self.scores = predicted_scores(x, self.model, self.chunk)
            self.order = np.argsort(-self.scores.mass, kind="stable")
        s = self.last_subset = _fill(targets, self.order, self.k, self.scores.mass.size)
        self.last_exact = self.tail and fresh
        if not self.tail:
            return subset_ce(x, targets, s, self.model)
        if fresh:
            if self.refresh > 1:
                self.offset = self._fit_offset(x, s)
            return subset_tail_ce(x, targets, s, self.model, self.scores)
        w = head_weight_rows(self.model, s)  # [k, D]
        c = _tail_direction(self.scores, s, w)
        log_out = x @ mx.stop_gradient(c) + self.offset  # approximate: no pass over V
        return _ce_with_tail(x, targets, s, x @ w.T, log_out, c)

    def state_dict(self) -> dict:
        """JSON-able running state: what the calls between scoring passes reuse."""
        from .subset_sampled import _pack

        sc = self.scores
        return {
            "fill": "predicted",
            "calls": self.calls,
            "offset": self.offset,
            "mass": None if sc is None else _pack(sc.mass),
            "pull": None if sc is None else _pack(np.array(sc.pull, np.float64)),
        }

    def load_state_dict(self, state: dict) -> None:
        from .subset_sampled import _unpack

        if state.get("fill") != "predicted":
            return  # a checkpoint of another head: start afresh (the first call scores)
        self.calls, self.offset = int(state["calls"]), float(state["offset"])
        if state["mass"] is not None:
            pull = mx.array(_unpack(state["pull"]).astype(np.float32))
            self.scores = Scores(_unpack(state["mass"]), None, pull)
            self.order = np.argsort(-self.scores.mass, kind="stable")

    def _fit_offset(self, x: mx.array, s: np.ndarray) -> float:
        """b = mean over the scored rows of (exact log outside-S sum - x . c), evaluated now
        on a fresh copy of x (outside any grad trace; N x k x D, small next to the pass)."""
        x = mx.array(np.array(x.astype(mx.float32)))
        w = head_weight_rows(self.model, s)
        log_out = self.scores.lse + mx.log(_outside_fraction(x @ w.T, self.scores.lse))
        b = (log_out - x @ _tail_direction(self.scores, s, w)).mean()
        return b.item()


def subset_ce(x: mx.array, targets: np.ndarray, subset: np.ndarray, model: nn.Module):
    """CE summed over rows, with the softmax renormalized over the sorted token subset."""
    w = head_weight_rows(model, subset)  # [k, D]: only S's rows are dequantized
    pos = mx.array(np.searchsorted(subset, targets).astype(np.int32))
    return full_ce(x, w, pos).sum()


class LossHead:
    """head(h [B, L, D] before the final norm, batch) -> SUM of CE over trainable positions."""

    def __init__(self, model: nn.Module, kind: str, ce: CrossEntropy, vocab_chunk: int = 8192):
        self.model, self.kind, self.ce, self.vocab_chunk = model, kind, ce, vocab_chunk
        self.vocab_size, self.width = head_shape(model)  # (read before any streaming)
        self.all_exact = True  # every value since pop_exact() was the exact CE

    def pop_exact(self) -> bool:
        """Whether every loss value since the last call was the exact CE (then reset): the
        trainer marks a step's reported loss approximate otherwise."""
        exact, self.all_exact = self.all_exact, True
        return exact

    def __call__(self, h: mx.array, batch: Any) -> mx.array:
        idx = self._positions(h, batch)
        if idx.size == 0:
            return h.sum() * 0  # no trainable row: zero loss that still has a gradient path
        targets = self._targets(batch, idx)
        value = self.ce(self._head_input(h, mx.array(idx.astype(np.int32))), targets)
        self.all_exact &= self._exact()
        return value

    @property
    def tiled(self) -> bool:
        """Whether value_and_grad can run this head tile by tile (the exact chunked CE)."""
        return self.kind == "chunked"

    def value_and_grad(
        self, h: mx.array, batch: Any, read: Any = None, grad: bool = True
    ) -> tuple[mx.array, mx.array | None]:
        """(this head's value, dL/dh) for a `tiled` head, evaluated with one vocabulary
        tile of the head in memory at a time (loss.tiled_ce), its rows read through `read`
        (WeightStream.head_reader, or the module's own). Only the final norm and the row
        selection go through autodiff.

        The CE is a sum over rows, so the rows go through the head `head_rows(D)` at a time
        (each block re-reads the head's tiles): what is whole is only h and dL/dh [B*L, D]
        (in h's dtype), never the head's float32 [rows, D] input, its gradient, the targets'
        head rows and the norm's VJP (7 [rows, D] float32 arrays: 5.6 GB at 64K tokens on
        the Llama-3.2-3B shape)."""
        idx = self._positions(h, batch)
        if idx.size == 0:  # no trainable row
            return mx.array(0.0), (mx.zeros_like(h) if grad else None)
        targets = self._targets(batch, idx)
        V, D = self.vocab_size, self.width
        tile = vocab_tile(self.vocab_chunk, D)
        flat = h.reshape(-1, D)  # [B*L, D]
        dh = mx.zeros_like(flat) if grad else None
        value, step = mx.array(0.0), head_rows(D)

        def weight_rows(sel):
            return head_weight_rows(self.model, sel, read=read)

        for r in range(0, idx.size, step):
            select = mx.array(idx[r : r + step].astype(np.int32))
            hr = flat[select]  # [n, D]
            x = self._normed(hr)
            mx.eval(x)
            v, dx = tiled_ce(x, targets[r : r + step], weight_rows, V, tile, grad)
            value = value + v
            if grad:
                del x
                _, (dhr,) = mx.vjp(self._normed, [hr], [dx])
                dh = dh.at[select].add(dhr)  # distinct rows: a placement, dh's buffer reused
            mx.eval(value, dh if grad else [])
        return value, (dh.reshape(h.shape) if grad else None)

    def state_dict(self) -> dict | None:
        """The head's running state (a cached scoring pass, sample tables), JSON-able, saved
        with each checkpoint so that --resume continues as the unbroken run; None if none."""
        get = getattr(self.ce, "state_dict", None)
        return None if get is None else get()

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None and hasattr(self.ce, "load_state_dict"):
            self.ce.load_state_dict(state)

    @staticmethod
    def _positions(h: mx.array, batch: Any) -> np.ndarray:
        """Flat indices of the positions that carry loss (technique 4: only they reach the
        head)."""
        mask = np.asarray(batch.mask).reshape(-1).astype(bool)
        if mask.size != h.shape[0] * h.shape[1]:
            raise ValueError(f"mask has {mask.size} positions, hidden states {h.shape[:2]}")
        return np.flatnonzero(mask)

    def _head_input(self, h: mx.array, select: mx.array) -> mx.array:
        """The selected rows of h [B, L, D] after the final norm: the head's input [N, D].
        RMSNorm is per row: exact."""
        return self._normed(h.reshape(-1, h.shape[-1])[select])

    def _normed(self, rows: mx.array) -> mx.array:
        """Rows [N, D] of h after the final norm, in float32 whatever h's dtype (--dtype):
        the head's logits can be large, where bfloat16 would be off by whole units."""
        return final_norm(self.model)(rows.astype(mx.float32)).astype(mx.float32)

    def _targets(self, batch: Any, idx: np.ndarray) -> np.ndarray:
        targets = np.asarray(batch.targets).reshape(-1)[idx]
        if targets.min() < 0 or targets.max() >= self.vocab_size:
            raise UserError(
                f"data: target token id {int(targets.max())} is outside the model's vocabulary "
                f"of {self.vocab_size}; use the tokenizer that belongs to the model"
            )
        return targets

    def _exact(self) -> bool:
        """full / chunked always; a subset head only when its ce says so (`last_exact`)."""
        return self.kind != "subset" or getattr(self.ce, "last_exact", False)


def make_loss_head(model: nn.Module, kind: str, cfg: Any) -> LossHead:
    """A loss head of kind full | chunked | subset (cfg supplies vocab_chunk and subset_k)."""
    V, _ = head_shape(model)
    if kind == "full":
        return LossHead(
            model, kind, lambda x, t: logits_ce(head_logits(model, x), mx.array(t)).sum()
        )
    if kind == "chunked":
        return LossHead(
            model, kind, lambda x, t: chunked_ce(x, t, model, cfg.vocab_chunk), cfg.vocab_chunk
        )
    return LossHead(model, kind, subset_loss(model, cfg))


def subset_loss(model: nn.Module, cfg: Any, table: np.ndarray | None = None) -> CrossEntropy:
    """The subset CE of cfg.subset_fill (predicted | neighbours; `table` overrides the cache)."""
    V, _ = head_shape(model)
    k, fill = cfg.subset_k, getattr(cfg, "subset_fill", "predicted")
    if fill == "predicted":
        if k >= V:

            def whole(x: mx.array, t: np.ndarray) -> mx.array:
                return subset_ce(x, t, np.arange(V, dtype=np.int32), model)

            whole.last_exact = True  # S = the whole vocabulary: the exact CE
            return whole
        tail, refresh = getattr(cfg, "subset_tail", True), getattr(cfg, "subset_refresh", 1)
        return PredictedSubset(model, k, cfg.vocab_chunk, tail, refresh)
    if fill == "sampled":
        from .subset_sampled import SampledSubset  # it builds on this module's helpers

        if k >= V:
            return subset_loss(model, _replace(cfg, subset_fill="predicted"), table)
        refresh = getattr(cfg, "subset_refresh", 1)
        samples = getattr(cfg, "subset_samples", 0)
        return SampledSubset(model, k, cfg.vocab_chunk, refresh, samples, getattr(cfg, "seed", 0))
    if table is None and k < V:
        table = neighbour_table(model)
    if table is None:
        table = np.zeros((V, 0), np.int32)
    return lambda x, t: subset_ce(x, t, subset_for(t, table, k, V), model)


def _replace(cfg: Any, **changes: Any) -> Any:
    """A copy of cfg (TrainConfig or a SimpleNamespace in tests) with `changes`."""
    from types import SimpleNamespace

    return SimpleNamespace(**(vars(cfg) | changes))


def exact_loss_head(model: nn.Module, cfg: Any) -> LossHead:
    """The exact (chunked) head that validation always uses, whatever --loss trains with."""
    return make_loss_head(model, "chunked", cfg)
