"""quant.py: the dequantize-on-the-fly matmul against its references, and the module swap."""

import mlx.core as mx
import pytest
from conftest import build_tiny_model
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_edgelora import blocks, quant
from mlx_edgelora.config import DEFAULT_LORA_KEYS


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def _quantized(out_dims: int, in_dims: int, bits: int, seed: int = 0):
    """(w, scales, biases) with float16 scales, as in most checkpoints."""
    mx.random.seed(seed)
    w, s, b = mx.quantize(mx.random.normal((out_dims, in_dims)) * 0.05, 32, bits)
    return w, s.astype(mx.float16), b.astype(mx.float16)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_custom_vjp_matches_reference_values_and_gradients(bits, tiled, monkeypatch):
    if tiled:  # 96 rows x 64 cols in tiles of 40 rows (the last one partial)
        monkeypatch.setattr(quant, "TILE_BYTES", 40 * 64 * 4)
        assert len(quant._row_tiles(96, 64)) == 3
    w, s, b = _quantized(96, 64, bits)
    x = mx.random.normal((2, 5, 64))
    cot = mx.random.normal((2, 5, 96))
    fmt = (32, bits, "affine")
    y, (dx,) = mx.vjp(lambda x: quant.dequant_matmul(x, w, s, b, *fmt), [x], [cot])[0:2]
    y_ref, (dx_ref,) = mx.vjp(
        lambda x: quant.dequant_matmul_reference(x, w, s, b, *fmt), [x], [cot]
    )[0:2]
    assert y[0].dtype == mx.float32 and dx.dtype == mx.float32
    assert _rel(y[0], y_ref[0]) < 1e-6 and _rel(dx, dx_ref) < 1e-6
    # and the same numbers as mlx's own quantized kernel
    fused = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=bits)
    assert _rel(y[0], fused) < 1e-5


def test_custom_vjp_does_not_keep_dequantized_weights_for_backward():
    """Over a stack of layers, the reference holds every float32 weight until backward."""
    layers = [_quantized(1024, 1024, 4, seed=i) for i in range(4)]
    x = mx.random.normal((8, 1024))
    mx.eval(layers, x)

    def peak(matmul) -> int:
        def loss(x):
            for w, s, b in layers:
                x = mx.tanh(matmul(x, w, s, b, 32, 4, "affine"))
            return x.sum()

        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(loss)(x))
        return mx.get_peak_memory() - base

    weight_bytes = 1024 * 1024 * 4  # one float32 weight
    # measured on CPU: ~2 weights' worth of dequantize transients vs ~4 kept + transients
    assert peak(quant.dequant_matmul) + 2 * weight_bytes < peak(quant.dequant_matmul_reference)


def test_dequantize_once_shares_small_weights_and_gives_the_same_numbers(monkeypatch):
    """Inside the scope, token chunks (and the VJP's dL/dx, with a LoRA term) share one
    float32 copy of a small weight: the values equal the tiled kernel's, and the weight is
    dequantized once; a weight over ONCE_WEIGHT_BYTES (or the budget) keeps its tiles."""
    monkeypatch.setattr(quant, "TILE_BYTES", 40 * 64 * 4)  # 3 row tiles outside the scope
    small, big = _quantized(96, 64, 4), _quantized(96, 64, 4, seed=1)
    g, a = mx.random.normal((6, 3)), mx.random.normal((64, 3))
    x, cot = mx.random.normal((2, 6, 64)), mx.random.normal((2, 6, 96))
    fmt = (32, 4, "affine")

    def chunks(x, w):  # three token chunks of 2, as tokenwise runs them
        return mx.concatenate(
            [quant.dequant_matmul(x[:, i : i + 2], *w, *fmt) for i in (0, 2, 4)], 1
        )

    def run(w):
        y, (dx,) = mx.vjp(lambda x: chunks(x, w), [x], [cot])
        lin = nn.QuantizedLinear(64, 96, bias=False, group_size=32, bits=4)
        lin.update({"weight": w[0], "scales": w[1], "biases": w[2]})
        quant.prepare_for_training(lin_holder := nn.Sequential(lin))
        dx_lr = quant.linear_input_grad(lin_holder.layers[0], cot[0], low_rank=(g, a))
        return [y[0], dx, dx_lr]

    calls = []
    dequantize = quant.dequantize
    monkeypatch.setattr(quant, "dequantize", lambda *a: calls.append(a[0].shape) or dequantize(*a))
    want = run(small)
    tiles = len(calls)
    calls.clear()
    with quant.dequantize_once():
        got = run(small)
    assert calls == [(96, 8)]  # once, whole (64 4-bit columns packed in 8 uint32)
    for u, v in zip(got, want):
        assert _rel(u, v) < 1e-6
    calls.clear()
    monkeypatch.setattr(quant, "ONCE_WEIGHT_BYTES", 96 * 64 * 4 - 1)
    with quant.dequantize_once():
        run(big)
    assert len(calls) == tiles
    assert quant.once_bytes([(96, 64), (10, 10)], budget=10**6) == 10 * 10 * 4


def _names(tree: dict) -> list[str]:
    return [k for k, _ in tree_flatten(tree)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora_first", [False, True])
def test_prepare_for_training_swaps_every_quantized_module(arch, lora_first):
    model, _ = build_tiny_model(arch, quantize_bits=4)
    inputs = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    expected = model(inputs)
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": DEFAULT_LORA_KEYS}
    model.freeze()
    if lora_first:
        linear_to_lora_layers(model, 4, lora)
    names, trainable = _names(model.parameters()), _names(model.trainable_parameters())
    n = quant.prepare_for_training(model)
    # same parameter names (mlx-lm saves and loads them), same trainable set
    assert _names(model.parameters()) == names
    assert _names(model.trainable_parameters()) == trainable
    if not lora_first:
        linear_to_lora_layers(model, 4, lora)

    assert n == 4 * 7 + 1 + (arch == "llama")  # 7 projections per block, embedding, lm_head
    assert quant.prepare_for_training(model) == 0  # idempotent
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and type(q_proj.linear) is quant.DequantLinear
    assert type(model.model.embed_tokens) is quant.DequantEmbedding
    out = model(inputs)  # lora_b is zero: the base model's output
    assert out.dtype == mx.float32 and _rel(out, expected) < 1e-5


def test_tied_head_as_linear_uses_the_fast_path_and_is_differentiable():
    model, _ = build_tiny_model("qwen2", quantize_bits=8)
    original = model.model.embed_tokens
    quant.prepare_for_training(model)
    emb = model.model.embed_tokens
    h = mx.random.normal((1, 6, 64))
    assert _rel(emb.as_linear(h), original.as_linear(h)) < 1e-5
    tokens = mx.array([[0, 5, 299]])
    assert emb(tokens).dtype == mx.float32 and _rel(emb(tokens), original(tokens)) < 1e-6

    def loss(h, head):
        return (head(h) ** 2).sum()

    g = mx.grad(lambda h: loss(h, emb.as_linear))(h)
    g_ref = mx.grad(lambda h: loss(h, original.as_linear))(h)
    assert _rel(g, g_ref) < 1e-4


def test_swapped_model_saves_and_loads_like_mlx_lm(tmp_path):
    model, _ = build_tiny_model("llama", quantize_bits=4)
    quant.prepare_for_training(model)
    path = str(tmp_path / "model.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(model.parameters())))
    fresh, _ = build_tiny_model("llama", seed=1, quantize_bits=4)
    fresh.load_weights(path)  # strict: names and shapes must match mlx's own classes
    inputs = mx.array([[1, 2, 3]])
    assert _rel(fresh(inputs), model(inputs)) < 1e-5
    # LoRALinear.fuse still recognizes the base as quantized
    lora = LoRALinear.from_base(model.model.layers[0].mlp.up_proj, r=4)
    assert isinstance(lora.fuse(), nn.QuantizedLinear)


@pytest.mark.skipif(not quant.fused_available(), reason="no Metal/CUDA GPU: fused path unused")
def test_gpu_uses_the_fused_kernel():
    w, s, b = _quantized(64, 64, 4)
    x = mx.random.normal((3, 64))
    fused = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=4)
    assert _rel(quant.dequant_matmul(x, w, s, b, 32, 4, "affine"), fused) < 1e-6


@pytest.mark.parametrize("backward", [False, True])
def test_few_tokens_dequantize_tiles_no_larger_than_their_activations(backward):
    """An MLP half over 16 tokens (tiny Qwen2, I = 4096: each float32 MLP weight is 4 MB):
    its weights are dequantized in TILE_FLOOR tiles, not whole. Before, gate and up were
    dequantized whole side by side (2 x 4 MB, ~2x while dequantizing: 16 MB at the peak);
    now the peak is a few floor tiles. Same output to float rounding (tile widths change how
    BLAS blocks the product)."""
    model, _ = build_tiny_model("qwen2", quantize_bits=4, hidden_size=256, intermediate_size=4096)
    model.freeze()
    x = mx.random.normal((1, 16, 256))
    ct = mx.random.normal((1, 16, 256))
    layer = blocks.layers(model)[0]
    want = x + layer.mlp(layer.post_attention_layernorm(x))  # mlx's own quantized kernel
    quant.prepare_for_training(model)
    mx.eval(model.parameters(), x, ct, want)
    before = mx.get_active_memory()

    def half(x):
        return blocks.block_forward(model, 0, x, 0, 0, ("mlp",))

    mx.reset_peak_memory()
    out = mx.vjp(half, [x], [ct])[1][0] if backward else half(x)
    mx.eval(out)
    peak = mx.get_peak_memory() - before
    # measured: 6.0-6.4 MB forward, 7.3 MB with the backward (gate and up side by side, each
    # tile ~2x while dequantizing, and the activations); whole weights: 16.5 MB, 23.5 MB
    assert peak < 10 * quant.TILE_FLOOR, peak / 2**20
    assert _rel(half(x), want) < 1e-5
