"""fused_lora.py: the fused LoRA-linear VJP equals autodiff of the plain formula."""

import mlx.core as mx
import pytest
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from mlx_edgelora import emulator, fused_lora, quant


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def make_lora(base: str, bias: bool = False, dropout: float = 0.0) -> LoRALinear:
    """LoRA r=4 over a 96 -> 80 base (float, quantized, or EMLoC's rank-32 emulator of
    either; prepared: through quant.prepare_for_training), lora_b non-zero."""
    mx.random.seed(0)
    lin = nn.Linear(96, 80, bias=bias)
    if base.startswith("emulator"):
        bits = int(base.split("-")[1][0]) if base.count("-") > 1 else None
        w_u, w_v = 0.2 * mx.random.normal((80, 32)), 0.2 * mx.random.normal((32, 96))
        lin = emulator.make_layer(w_u, w_v, lin.get("bias"), bits)
        m = lin.to_lora(r=4, scale=2.0, dropout=dropout)
    elif base != "float":
        lin = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=int(base[0]))
    if not base.startswith("emulator"):
        m = LoRALinear.from_base(lin, r=4, scale=2.0, dropout=dropout)
    m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    m.freeze(keys=["linear"], recurse=True)
    if base.endswith("prepared"):  # the DequantLinear base, in a FusedLoRALinear
        holder = nn.Sequential(m)
        quant.prepare_for_training(holder)
        m = holder.layers[0]
    mx.eval(m.parameters())
    return m


def grads(fn, x, m, dy):
    """(y, dx, dA, dB) of fn(x, a, b) with cotangent dy, by mx.vjp."""
    (y,), (dx, da, db) = mx.vjp(lambda *p: [fn(*p)], [x, m.lora_a, m.lora_b], [dy])
    return y, dx, da, db


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "base",
    ["float", "4bit", "8bit", "4bit-prepared", "8bit-prepared"]
    + ["emulator-prepared", "emulator-4bit-prepared"],
)
def test_fused_vjp_matches_autodiff(base, bias, monkeypatch):
    monkeypatch.setattr(quant, "TILE_BYTES", 40 * 96 * 4)  # three column tiles of W
    m = make_lora(base, bias)
    x, dy = mx.random.normal((2, 7, 96)), mx.random.normal((2, 7, 80))

    def ref(x, a, b):
        return fused_lora.lora_linear_reference(x, m.linear, a, b, m.scale)

    def fused(x, a, b):
        return fused_lora.lora_linear(x, m.linear, a, b, m.scale)

    for got, want in zip(grads(fused, x, m, dy), grads(ref, x, m, dy)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel(got, want) < 1e-5


def test_prepare_swaps_lora_linear_and_keeps_its_output():
    m = make_lora("4bit")
    x = mx.random.normal((1, 5, 96))
    before = m(x)
    model = nn.Sequential(m)
    quant.prepare_for_training(model)
    assert type(model.layers[0]) is fused_lora.FusedLoRALinear
    assert type(model.layers[0].linear) is quant.DequantLinear
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert list(trainable) == ["layers.0.lora_a", "layers.0.lora_b"]
    assert trainable["layers.0.lora_a"] is m.lora_a and trainable["layers.0.lora_b"] is m.lora_b
    assert _rel(model(x), before) < 1e-5
    assert fused_lora.use_fused_vjp(model) == 0  # idempotent


def test_active_dropout_keeps_mlx_lm_call():
    """Dropout draws a mask per call: the fused VJP (which recomputes x·A) is not used; the
    swapped module then gives LoRALinear's own result for the same random state."""
    m = make_lora("4bit-prepared", dropout=0.5)
    x = mx.random.normal((1, 5, 96))
    mx.random.seed(3)
    want = LoRALinear.__call__(m, x)
    mx.random.seed(3)
    got = m(x)
    assert type(m) is fused_lora.FusedLoRALinear
    assert _rel(got, want) == 0.0
    m.eval()  # dropout off: the fused call again, same as the formula
    ref = fused_lora.lora_linear_reference(x, m.linear, m.lora_a, m.lora_b, m.scale)
    assert _rel(m(x), ref) < 1e-6


def test_a_lora_on_emlocs_emulator_takes_the_fused_vjp(monkeypatch):
    """EMLoC trains LoRA on its emulator: before the fix that LoRA fell back to mlx-lm's
    autodiff (an extra [tokens, in] buffer per linear: the 2048-token SmolLM2 step peaked
    3% above LoRA's, bench/results/methods.md)."""
    m = make_lora("emulator-4bit-prepared")
    calls = []
    real = fused_lora.lora_linear
    monkeypatch.setattr(fused_lora, "lora_linear", lambda *a: calls.append(1) or real(*a))
    x = mx.random.normal((1, 5, 96))
    ref = fused_lora.lora_linear_reference(x, m.linear, m.lora_a, m.lora_b, m.scale)
    assert type(m) is fused_lora.FusedLoRALinear and calls == []
    assert _rel(m(x), ref) < 1e-6 and calls == [1]
