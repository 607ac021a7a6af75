"""Flash attention by query rows / chunked MLP (long-context layer recompute) vs references.

Tolerance: 1e-5 of the largest reference magnitude, float32. The chunked paths only reorder
float32 sums (online softmax, tile-wise gradient accumulation), so errors are ~1e-7.
"""

from functools import partial

import mlx.core as mx
import pytest
from conftest import build_tiny_model
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_edgelora import blocks
from mlx_edgelora.attention import (
    attend_rows,
    attention_core,
    attention_reference,
    chunked_mlp,
    grad_rows,
    mlp_reference,
    window_mask,
)
from mlx_edgelora.config import DEFAULT_LORA_KEYS
from mlx_edgelora.errors import UserError
from mlx_edgelora.tokenwise import spans

L, CHUNK = 30, 8  # L not a multiple of the chunk: the last tile is partial


def assert_close(got: mx.array, want: mx.array, rel: float = 1e-5) -> None:
    err, ref = mx.abs(got - want).max().item(), mx.abs(want).max().item()
    assert err <= rel * max(ref, 1e-6), f"max error {err:.3g} vs max magnitude {ref:.3g}"


def assert_trees_close(got, want) -> None:
    got, want = dict(tree_flatten(got)), dict(tree_flatten(want))
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name])


def qkv(heads: int, kv_heads: int, hd: int = 16, seed: int = 0):
    mx.random.seed(seed)
    shape_q, shape_kv = (2, heads, L, hd), (2, kv_heads, L, hd)
    return mx.random.normal(shape_q), mx.random.normal(shape_kv), mx.random.normal(shape_kv)


def grouped(a: mx.array, kv: int, s: int, e: int) -> mx.array:
    """Rows s:e of [B, H, L, ...] as [B, Hkv, rep*(e-s), ...] (query heads grouped by KV)."""
    B, H = a.shape[:2]
    return a[:, :, s:e].reshape(B, kv, (H // kv) * (e - s), *a.shape[3:])


def flash(q, k, v, scale: float, chunk: int, window=None, do=None):
    """(o, lse) of attend_rows over every query chunk; with `do`, also (dq, dk, dv) of
    grad_rows over every query chunk (last to first, as attn_half's VJP walks them)."""
    B, H, L, hd = q.shape
    kv = k.shape[1]
    ss = spans(L, chunk)
    rows = [
        attend_rows(grouped(q, kv, s, e), k, v, ss, i, H // kv, scale, window)
        for i, (s, e) in enumerate(ss)
    ]
    o = mx.concatenate([r[0].reshape(B, H, -1, hd) for r in rows], axis=2)
    lse = mx.concatenate([r[1].reshape(B, H, -1) for r in rows], axis=2)
    if do is None:
        return o, lse
    dkv, dq = [None] * len(ss), [None] * len(ss)
    for i in reversed(range(len(ss))):
        s, e = ss[i]
        g = [grouped(a, kv, s, e) for a in (q, o, lse, do)]
        dq[i] = grad_rows(g[0], k, v, g[1], g[2], g[3], ss, i, dkv, scale, window)
    dq = mx.concatenate([d.reshape(B, H, -1, hd) for d in dq], axis=2)
    dk, dv = (mx.concatenate([d[n] for d in dkv], axis=2) for n in (0, 1))
    return o, lse, (dq, dk, dv)


def check_flash(q, k, v, scale: float, chunk: int, window=None) -> None:
    """attend_rows / grad_rows against attention_reference and its autodiff (lse's cotangent
    zero: the attention half never differentiates through lse)."""
    do = mx.random.normal(q.shape)
    o, lse, got = flash(q, k, v, scale, chunk, window, do)
    ref_o, ref_lse = attention_reference(q, k, v, scale, window)
    assert_close(o, ref_o)
    assert_close(lse, ref_lse)
    _, want = mx.vjp(
        lambda *a: attention_reference(*a, scale, window), [q, k, v], [do, mx.zeros_like(lse)]
    )
    for g, w in zip(got, want):
        if mx.abs(w).max().item() > 0:
            assert_close(g, w)
        else:  # a 1-token window: every softmax over one key, dq is 0 up to rounding
            assert mx.abs(g).max().item() < 1e-5


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_flash_rows_match_reference(heads, kv_heads):
    q, k, v = qkv(heads, kv_heads)
    scale = q.shape[-1] ** -0.5
    check_flash(q, k, v, scale, CHUNK)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    assert_close(flash(q, k, v, scale, CHUNK)[0], fused)
    assert_close(attention_core(q, k, v, scale), fused)


@pytest.mark.parametrize("window,chunk", [(5, CHUNK), (8, CHUNK), (13, CHUNK), (1, 4), (3, 1)])
def test_sliding_window_matches_reference(window, chunk):
    """Windows smaller than, equal to and straddling the chunk: tiles wholly outside are
    skipped, rows masked whole inside a tile must not turn into NaN."""
    q, k, v = qkv(4, 2, seed=2)
    scale = q.shape[-1] ** -0.5
    check_flash(q, k, v, scale, chunk, window)
    mask = window_mask(L, window)
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    assert_close(attention_core(q, k, v, scale, window), fused)
    assert_close(flash(q, k, v, scale, chunk, window)[0], fused)


def test_tiles_outside_the_window_are_skipped(monkeypatch):
    """L 30, chunk 8 (4 query chunks): causal visits 10 tiles; with a 4-token window only the
    diagonal and the one before it (7), forward and backward alike."""
    from mlx_edgelora import attention

    calls = []
    scores = attention._scores
    monkeypatch.setattr(attention, "_scores", lambda *a: calls.append(1) or scores(*a))
    q, k, v = qkv(4, 2)
    for window, tiles in [(None, 10), (4, 7)]:
        calls.clear()
        mx.eval(flash(q, k, v, 0.25, CHUNK, window))
        assert len(calls) == tiles
        mx.eval(flash(q, k, v, 0.25, CHUNK, window, mx.ones(q.shape))[2])
        assert len(calls) == 3 * tiles  # the forward again, then the backward


def test_window_mask_is_mlx_lms():
    from mlx_lm.models.base import create_causal_mask

    assert mx.array_equal(window_mask(L, 7), create_causal_mask(L, window_size=7))


@pytest.mark.parametrize("chunk", [1, 29])
def test_flash_rows_edge_chunks(chunk):
    q, k, v = qkv(4, 2, seed=1)
    check_flash(q, k, v, 0.25, chunk)


def lora_tiny(arch: str, bits: int | None):
    """A tiny model, frozen, with LoRA on every projection and nonzero random lora_b."""
    model, _ = build_tiny_model(arch, quantize_bits=bits)
    model.freeze()
    config = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": DEFAULT_LORA_KEYS}
    linear_to_lora_layers(model, -1, config)
    mx.random.seed(3)
    model.update(tree_map(lambda p: 0.1 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def block_vjp(layer: nn.Module, forward, x: mx.array, dy: mx.array):
    """Output and cotangents w.r.t. x and the layer's LoRA parameters."""

    saved = layer.trainable_parameters()
    names, arrays = zip(*tree_flatten(saved))

    def fn(x, *arrays):
        layer.update(tree_unflatten(list(zip(names, arrays))))
        return [forward(layer, x)]

    (y,), (dx, *grads) = mx.vjp(fn, [x, *arrays], [dy])
    layer.update(saved)
    return y, dx, tree_unflatten(list(zip(names, grads)))


@pytest.mark.parametrize("bits", [None, 4], ids=["fp32", "int4"])
def test_block_forward_matches_layer(arch, bits):
    model = lora_tiny(arch, bits)
    layer = model.model.layers[1]
    assert len(layer.trainable_parameters()["mlp"]) == 3  # LoRA inside the MLP too
    mx.random.seed(4)
    x, dy = mx.random.normal((2, L, 64)), mx.random.normal((2, L, 64))
    want = block_vjp(layer, lambda m, x: m(x, mask="causal"), x, dy)
    for attn_chunk, mlp_chunk in [(CHUNK, CHUNK), (0, 0), (64, 7)]:
        run = partial(blocks.block_forward, model, 1, attn_chunk=attn_chunk, mlp_chunk=mlp_chunk)
        got = block_vjp(layer, lambda _, x, run=run: run(x), x, dy)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
        assert_trees_close(got[2], want[2])


def test_chunked_mlp_matches_autodiff_loop():
    mlp = lora_tiny("llama", 4).model.layers[0].mlp
    mx.random.seed(5)
    x, dy = mx.random.normal((1, L, 64)), mx.random.normal((1, L, 64))
    before = dict(tree_flatten(mlp.parameters()))
    results = [block_vjp(mlp, partial(f, chunk=CHUNK), x, dy) for f in (chunked_mlp, mlp_reference)]
    for got, want in zip(*results):
        assert_trees_close(got, want)
    after = dict(tree_flatten(mlp.parameters()))
    assert all(after[n] is before[n] for n in before)  # the module is left as it was


def test_chunked_mlp_refuses_active_dropout():
    model, _ = build_tiny_model("llama")
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 2.0, "dropout": 0.1})
    model.train()
    with pytest.raises(UserError, match="--lora-dropout"):
        chunked_mlp(model.model.layers[0].mlp, mx.zeros((1, L, 64)), CHUNK)
