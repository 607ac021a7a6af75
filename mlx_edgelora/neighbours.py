"""Semantic neighbour table of the LM-head rows, cached on disk (paper technique 3).

table[t] = the n tokens whose LM-head rows are most cosine-similar to token t's row (t itself
excluded), nearest first. The subset loss fills its softmax with the neighbours of the step's
targets: the hard negatives the model actually confuses. Built once per model, tile by tile
(a [BLOCK, VOCAB_CHUNK] similarity tile at a time, never V x V), cached on disk under a hash
of the head weight. Building it evaluates (mx.eval): it is a one-time precompute, not a graph.

Two methods (`auto` picks exact on a GPU, or when V*V*D <= EXACT_MAX_MACS):
- exact: every pair's cosine, V*V*D multiply-adds. SmolLM2 (49152 x 576): 229 s on this
  2-core Linux CPU (shared). Llama-3.2-3B (128256 x 3072): ~41 min here (19 s per block of
  1024 rows, measured), so on CPU it is left to the approximation; a Mac GPU does it in minutes.
- approx: unit rows projected onto the top-APPROX_RANK principal directions of the head (real
  LM heads are far from isotropic); APPROX_CANDIDATES x n candidates per row found there, then
  re-ranked by their exact full-dimension cosine. V*V*rank + V*candidates*D multiply-adds.
  On SmolLM2's real head (n 64), recall@64 vs exact: 0.89 (rank 256, 256 candidates; 0.94
  with 512; 0.80 with 128). Llama-3.2-3B size (random 4-bit head): 861 s wall / 701 CPU-s
  on the shared 2-core CPU (~3.9 s per 1024-row block at low load, so ~8.5 min alone); a
  random head has no low-rank structure (recall 0.03 there), so it is a timing test only.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from .blocks import head_module, head_shape, head_weight_rows
from .files import atomic_path

DEFAULT_NEIGHBOURS = 64  # round-robin fill: n x distinct targets is usually >> subset_k
EXACT_MAX_MACS = 2e12  # CPU: above this many multiply-adds, `auto` uses the approximation
BLOCK = 1024  # query rows per block; a [BLOCK, VOCAB_CHUNK] float32 tile is 64 MB
VOCAB_CHUNK = 16384  # head rows dequantized at a time
GROUP = 8  # columns per group in the two-stage top-k (see _top_columns)
PCA_ROWS = 16384  # head rows sampled to estimate the principal directions
APPROX_RANK = 256  # principal directions searched by `approx`
APPROX_CANDIDATES = 4  # x n candidates per row re-ranked exactly by `approx`


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """cache_dir, else $EDGELORA_CACHE/neighbours, else ~/.cache/mlx_edgelora/neighbours."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("EDGELORA_CACHE")
    return Path(root) / "neighbours" if root else Path.home() / ".cache/mlx_edgelora/neighbours"


def head_fingerprint(model: nn.Module) -> str:
    """sha256 of the head's raw weight/scales/biases bytes, shapes, dtypes and quant config."""
    m = head_module(model)
    quant = [getattr(m, a, None) for a in ("bits", "group_size", "mode")]
    h = hashlib.sha256(f"{'scales' in m}:{quant}".encode())  # not the class: quant.py swaps it
    for name in ("weight", "scales", "biases"):
        a = m.get(name)
        if a is not None:
            h.update(f"{name}{a.shape}{a.dtype}".encode())
            h.update(memoryview(a))
    return h.hexdigest()[:24]


def neighbour_table(
    model: nn.Module,
    n_neighbours: int = DEFAULT_NEIGHBOURS,
    cache_dir: str | Path | None = None,
    method: str = "auto",
) -> np.ndarray:
    """[V, n] int32 nearest LM-head rows by cosine (self excluded), from cache or computed."""
    V, D = head_shape(model)
    n = min(n_neighbours, V - 1)
    if method == "auto":
        gpu = mx.default_device().type == mx.gpu
        method = "exact" if gpu or V * V * D <= EXACT_MAX_MACS else "approx"
    path = cache_root(cache_dir) / f"{head_fingerprint(model)}-{method}-n{n}.npy"
    try:
        table = np.load(path)
        if table.shape == (V, n):
            return table
    except (OSError, ValueError):
        pass  # absent or unreadable: rebuild
    print(f"building the {method} neighbour table ({V} x {n}), cached at {path}", file=sys.stderr)
    build = exact_neighbours if method == "exact" else approx_neighbours
    table = build(model, n)
    _save_atomic(path, table)
    return table


def _save_atomic(path: Path, table: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, table)


def _vocab_chunks(V: int):
    return [slice(s, min(s + VOCAB_CHUNK, V)) for s in range(0, V, VOCAB_CHUNK)]


def inverse_norms(model: nn.Module) -> mx.array:
    """1 / |row| of every head row [V] (an all-zero row gets 0 similarity to everything)."""
    V, _ = head_shape(model)
    norms = [
        _evaluated(mx.linalg.norm(head_weight_rows(model, c), axis=-1)) for c in _vocab_chunks(V)
    ]
    inv = 1.0 / mx.maximum(mx.concatenate(norms), 1e-12)
    mx.eval(inv)
    return inv


def exact_neighbours(model: nn.Module, n: int) -> np.ndarray:
    """Exact cosine top-n of every row, one [BLOCK, VOCAB_CHUNK] similarity tile at a time."""
    V, _ = head_shape(model)
    inv = inverse_norms(model)

    def unit_rows(c: slice) -> mx.array:
        return head_weight_rows(model, c) * inv[c, None]

    return _table(unit_rows, unit_rows, V, n, lambda s, e, cand: cand)


def approx_neighbours(
    model: nn.Module, n: int, rank: int = APPROX_RANK, candidates: int = 0
) -> np.ndarray:
    """Top-n via a rank-`rank` PCA projection, then exact re-ranking of the candidates."""
    V, D = head_shape(model)
    rank, cands = min(rank, D), min(candidates or APPROX_CANDIDATES * n, V - 1)
    inv = inverse_norms(model)
    basis = mx.array(_pca_basis(model, inv, rank))  # [D, r]
    proj = [
        _evaluated((head_weight_rows(model, c) * inv[c, None]) @ basis) for c in _vocab_chunks(V)
    ]
    proj = mx.concatenate(proj)  # [V, r] unit rows in principal coordinates
    mx.eval(proj)

    def rerank(s: int, e: int, cand: mx.array) -> mx.array:
        sims = _row_dots(model, s, e, cand) * inv[cand]  # exact cosine x |row s| (constant)
        return mx.take_along_axis(cand, mx.argsort(-sims, axis=-1), axis=-1)

    return _table(lambda c: proj[c], lambda c: proj[c], V, n, rerank, cands + 1)


def _table(queries, keys, V: int, n: int, rerank, n_cand: int = 0) -> np.ndarray:
    """[V, n]: for each BLOCK of rows, the n_cand nearest keys, re-ranked, self removed."""
    out = np.empty((V, n), dtype=np.int32)
    for s in range(0, V, BLOCK):
        e = min(s + BLOCK, V)
        cand = _nearest(queries(slice(s, e)), keys, V, max(n_cand, n + 1))
        top = rerank(s, e, cand)[:, : n + 1]
        mx.eval(top)
        out[s:e] = _drop_self(np.array(top), np.arange(s, e), n)
    return out


def _nearest(q: mx.array, keys, V: int, k: int) -> mx.array:
    """Ids [b, k] of the k largest q @ keys(c).T per row, merged over vocabulary chunks c."""
    vals, ids = [], []
    for c in _vocab_chunks(V):
        sims = q @ keys(c).T  # [b, chunk]: the only similarity tile alive
        top = _top_columns(sims, min(k, c.stop - c.start))
        vals.append(mx.take_along_axis(sims, top, axis=-1))
        ids.append(top + c.start)
        mx.eval(vals[-1], ids[-1])  # this chunk's float rows and tile go before the next
    best = _top_columns(mx.concatenate(vals, axis=1), k)
    return mx.take_along_axis(mx.concatenate(ids, axis=1), best, axis=-1)


def _pca_basis(model: nn.Module, inv: mx.array, rank: int) -> np.ndarray:
    """Top-`rank` eigenvectors [D, rank] of the second moment of (a sample of) unit head rows."""
    V, _ = head_shape(model)
    rows = np.linspace(0, V - 1, min(V, PCA_ROWS)).astype(np.int32)
    cov = 0.0
    for s in range(0, len(rows), BLOCK):  # [D, D] summed over BLOCK sampled rows at a time
        x = (
            head_weight_rows(model, rows[s : s + BLOCK])
            * inv[mx.array(rows[s : s + BLOCK])][:, None]
        )
        cov = _evaluated(cov + x.T @ x)
    _, vecs = np.linalg.eigh(np.array(cov, dtype=np.float64))
    return np.ascontiguousarray(vecs[:, ::-1][:, :rank]).astype(np.float32)


def _evaluated(x: mx.array) -> mx.array:
    """x, computed now: a loop over head chunks then holds one chunk's float rows at a time
    (one lazy graph over all chunks would dequantize the whole head at once)."""
    mx.eval(x)
    return x


def _row_dots(model: nn.Module, s: int, e: int, cand: mx.array) -> mx.array:
    """[b, C] dot products W[s + i] . W[cand[i, j]], without materializing W[cand]."""
    m = head_module(model)
    b, C = cand.shape
    q = head_weight_rows(model, slice(s, e))[:, None, :]  # [b, 1, D]
    lhs = mx.broadcast_to(mx.arange(b)[:, None], (b, C))
    if "scales" not in m:
        w = m.weight[:, :, None]  # [V, D, 1]: each row a one-column matrix (a view)
        dots = mx.gather_mm(q.astype(w.dtype), w, lhs_indices=lhs, rhs_indices=cand)
        return dots.reshape(b, C).astype(mx.float32)
    biases = m.get("biases")
    dots = mx.gather_qmm(
        q,
        m.weight[:, None, :],
        m.scales[:, None, :],
        None if biases is None else biases[:, None, :],
        lhs_indices=lhs,
        rhs_indices=cand,
        transpose=True,
        group_size=m.group_size,
        bits=m.bits,
        mode=getattr(m, "mode", "affine"),
    )
    return dots.reshape(b, C).astype(mx.float32)


def _top_columns(s: mx.array, k: int) -> mx.array:
    """Column indices [b, k] of each row's k largest entries of s [b, V], largest first.

    Two stages, because partitioning a whole [1024, 16384] tile costs as much as computing
    it on CPU: the k largest entries lie inside the k groups (of GROUP columns) with the
    largest maxima, so only those k * GROUP columns are partitioned. (Chunks are multiples of
    GROUP; a ragged last chunk takes the one-stage path.)
    """
    b, V = s.shape
    G = V // GROUP
    cols = None
    if G > k and G * GROUP == V:
        s = s.reshape(b, G, GROUP)
        groups = mx.argpartition(s.max(-1), kth=G - k, axis=-1)[:, G - k :]  # [b, k]
        s = mx.take_along_axis(s, groups[:, :, None], axis=1).reshape(b, k * GROUP)
        cols = (groups[:, :, None] * GROUP + mx.arange(GROUP)).reshape(b, k * GROUP)
    width = s.shape[1]
    idx = mx.argpartition(s, kth=width - k, axis=-1)[:, width - k :]
    order = mx.argsort(-mx.take_along_axis(s, idx, axis=-1), axis=-1)
    idx = mx.take_along_axis(idx, order, axis=-1)
    return idx if cols is None else mx.take_along_axis(cols, idx, axis=-1)


def _drop_self(top: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """[b, n+1] -> [b, n]: remove each row's own id, or its last entry if self is absent."""
    drop = top == rows[:, None]
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True
    return top[~drop].reshape(len(rows), n).astype(np.int32)
