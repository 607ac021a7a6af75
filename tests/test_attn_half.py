"""attn_half.py, and the long-context memory of each peak phase (issue 17).

The fused attention half against its plain-autodiff reference (values and gradients, with
grouped queries, a sliding window and partial chunks); then, on a tiny model at 4096 tokens,
the peak above resident memory of the attention half's recompute, the MLP half's and the
tiled loss head with row blocks, in units of one [L, D] float32 array: bounds the code before
these changes exceeded (attention half 6.5 units, loss head 7.0).
"""

import gc
from functools import partial

# isort: off
import mlx_edgelora  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

# isort: on
import numpy as np
import pytest
from conftest import build_tiny_model
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_edgelora import blocks, engine, loss, quant
from mlx_edgelora.attn_half import HalfFns, attention_half, attention_half_reference
from mlx_edgelora.batching import Batch
from mlx_edgelora.config import DEFAULT_LORA_KEYS, TrainConfig


def _lora_model(arch: str = "llama", layers: int = 2, **kw):
    model, _ = build_tiny_model(arch, quantize_bits=4, num_hidden_layers=layers, **kw)
    model.freeze()
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": DEFAULT_LORA_KEYS}
    linear_to_lora_layers(model, layers, lora)
    mx.random.seed(3)
    for layer in blocks.layers(model):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = getattr(layer.self_attn, name)
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    quant.prepare_for_training(model)
    mx.eval(model.parameters())
    return model


def _fns(model, i: int, window):
    """The Llama family's q / kv / out functions of block i (as models/base.py builds them)."""
    layer = blocks.layers(model)[i]
    attn, norm = layer.self_attn, layer.input_layernorm
    B = 2

    def heads(t, n, c):
        return t.reshape(B, n, c, -1).transpose(0, 2, 1, 3)

    def q(s, x):
        return (attn.rope(heads(attn.q_proj(norm(x)), x.shape[1], attn.n_heads), offset=s),)

    def kv(s, x):
        xn = norm(x)
        k = heads(attn.k_proj(xn), x.shape[1], attn.n_kv_heads)
        return attn.rope(k, offset=s), heads(attn.v_proj(xn), x.shape[1], attn.n_kv_heads)

    def out(s, x, o):
        return (x + attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, o.shape[2], -1)),)

    mods = [norm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    return HalfFns(q, kv, out, attn.scale, window), mods


@pytest.mark.parametrize("chunk,window", [(8, None), (7, None), (7, 6), (30, None)])
def test_attention_half_matches_its_reference(chunk, window):
    """Same output, same dx and LoRA gradients as plain autodiff of the unchunked half (4
    query heads over 2 KV heads; 30 tokens: partial last chunk; a window of 6 skips tiles)."""
    model = _lora_model()
    fns, mods = _fns(model, 1, window)
    ref_fns = HalfFns(
        lambda s, x: fns.q(s, x)[0], fns.kv, lambda s, x, o: fns.out(s, x, o)[0], fns.scale, window
    )
    layer = blocks.layers(model)[1]
    x = mx.random.normal((2, 30, 64))
    dy = mx.random.normal((2, 30, 64))
    params = layer.trainable_parameters()

    def run(f):
        def loss_of(x, p):
            layer.update(p)
            return (f(x) * dy).sum()

        try:
            return mx.value_and_grad(loss_of, argnums=(0, 1))(x, params)
        finally:
            layer.update(params)

    got = run(lambda x: attention_half(fns, mods, x, chunk))
    ref = run(lambda x: attention_half_reference(ref_fns, x))
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert mx.allclose(got[1][0], ref[1][0], rtol=1e-4, atol=1e-5)
    g, r = dict(tree_flatten(got[1][1])), dict(tree_flatten(ref[1][1]))
    assert g.keys() == r.keys() and len(r) == 14  # A and B of the 7 projections
    for k in r:
        assert mx.allclose(g[k], r[k], rtol=1e-4, atol=1e-5), k


L_LONG, D_LONG = 4096, 256


@pytest.fixture(scope="module")
def long_setup():
    """A 2-block tiny Llama (D 256, 8 heads over 2 KV heads), x and dy at 4096 tokens."""
    model = _lora_model(
        hidden_size=D_LONG, intermediate_size=2 * D_LONG, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=L_LONG,
    )  # fmt: skip
    mx.random.seed(0)
    x, dy = mx.random.normal((1, L_LONG, D_LONG)), mx.random.normal((1, L_LONG, D_LONG))
    mx.eval(x, dy)
    return model, x, dy


def _units_above(fn) -> float:
    """Peak above the active memory while fn() evaluates, in [L, D] float32 arrays."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    del out
    return (mx.get_peak_memory() - before) / (L_LONG * D_LONG * 4)


def _half_vjp(model, x, dy, half: str):
    cfg = TrainConfig(attn_chunk=64, mlp_chunk=64, stream_weights=False)
    step = engine.SegmentStep(model, cfg, lambda h, b: h.sum())
    us, grads = [(1, (half,))], [{}, {}]
    dx = step._segment_vjp(us, x, dy, grads)
    return [dx, grads[1]]


def test_long_context_attention_half_recompute_holds_about_four_rows_of_l_by_d(long_setup):
    """Above x and its cotangent: dx, k, v and their float32 gradients (kv width D/4 here)
    and per-chunk tiles: about 2.2 [L, D]. The separate custom functions held 6.5."""
    model, x, dy = long_setup
    assert _units_above(partial(_half_vjp, model, x, dy, "attn")) < 3.0


def test_long_context_mlp_half_recompute_holds_dx_once(long_setup):
    """Above x and its cotangent: dx, written in place chunk by chunk, and one chunk's SwiGLU
    recompute (1.9 measured; on this tiny model the chunk's dequantized weights are ~0.6 of
    it). The custom function over the chunks (tokenwise.py) held dx twice: 2.35."""
    model, x, dy = long_setup
    step = engine.SegmentStep(model, TrainConfig(mlp_chunk=64), lambda h, b: h.sum())
    assert step._by_rows([(1, ("mlp",))], x)
    assert _units_above(partial(_half_vjp, model, x, dy, "mlp")) < 2.1


@pytest.mark.parametrize("keep", [False, True])
def test_long_context_backward_holds_one_cotangent_and_one_boundary(long_setup, tmp_path, keep):
    """A whole step (2 blocks, 2048 tokens, disk boundaries in bfloat16): as each backward
    unit starts, only its cotangent and its stored boundary are alive above the resident
    weights (1.5 [L, D] float32); the loss head's dL/dh stayed alive through the whole
    backward (2.5). With --keep-attention an attention half also has its kept output o
    (one more [L, D] float32 here) and log-sum-exp."""
    from mlx_edgelora import precision

    model, L = long_setup[0], 2048
    cfg = TrainConfig(
        attn_chunk=256, mlp_chunk=256, stream_weights=False, activations="disk",
        spill_dir=str(tmp_path), out=str(tmp_path), max_seq_len=L, keep_attention=keep,
    )  # fmt: skip
    p = precision.Precision(storage=mx.bfloat16, compute=mx.float32)
    step = engine.SegmentStep(model, cfg, loss.make_loss_head(model, "chunked", cfg), None, p)
    ids = np.random.default_rng(0).integers(0, 1024, size=(1, L)).astype(np.int32)
    batch = Batch(ids, ids, np.ones((1, L), bool))
    gc.collect()
    base, at_start = mx.get_active_memory(), []
    unit_vjp = step._segment_vjp

    def recorded(us, x, cot, grads, need_dx=True):
        at_start.append((mx.get_active_memory() - base) / (L * D_LONG * 4))
        return unit_vjp(us, x, cot, grads, need_dx)

    step._segment_vjp = recorded
    step(batch)
    # the backward's units: block 1's MLP and attention halves, then block 0's
    assert len(at_start) == 4 and max(at_start[0::2]) < 1.75, at_start
    assert max(at_start[1::2]) < (2.75 if keep else 1.75), at_start


def test_long_context_tiled_head_goes_through_rows_in_blocks(long_setup, monkeypatch):
    """Rows in blocks of 512: above h, only dL/dh and one block's arrays (2.2 measured); the
    whole-rows head held 7 [rows, D] float32 arrays. The loss is the same sum."""
    model, x, _ = long_setup
    cfg = TrainConfig(vocab_chunk=256)
    head = loss.make_loss_head(model, "chunked", cfg)
    ids = np.random.default_rng(0).integers(0, 1024, size=(1, L_LONG)).astype(np.int32)
    batch = Batch(ids, ids, np.ones((1, L_LONG), bool))
    whole, _ = head.value_and_grad(x, batch, grad=False)
    monkeypatch.setattr(loss, "head_rows", lambda D: 512)
    assert _units_above(lambda: head.value_and_grad(x, batch)) < 2.75
    blocked, _ = head.value_and_grad(x, batch, grad=False)
    assert blocked.item() == pytest.approx(whole.item(), rel=1e-5)
