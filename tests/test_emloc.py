"""EMLoC: the activation-aware emulator (full rank is W; never worse than plain SVD on the
calibration data), the LoRA correction (A'B' = AB; emulator + LoRA on span(A), W off it), and
the pipeline end to end: a cached emulator, an mlx-lm adapter for the original model."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import build_tiny_model, make_tiny_tokenizer, write_tiny_model_dir
from mlx.utils import tree_flatten

from mlx_edgelora import emulator
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.emloc import correct, emloc
from mlx_edgelora.errors import UserError
from mlx_edgelora.fuse import fuse
from mlx_edgelora.lora import load_adapters


def _problem(out=24, inp=16, tokens=200, seed=0):
    """W and activations X with very uneven channel scales (what real activations have)."""
    mx.random.seed(seed)
    w = mx.random.normal((out, inp))
    x = mx.random.normal((tokens, inp)) * mx.exp(mx.linspace(-3, 2, inp))
    return w, x, x.T @ x


def test_full_rank_reproduces_w():
    w, _, h = _problem()
    w_u, w_v = emulator.aware_factors(w, h, min(w.shape))
    assert mx.allclose(w_u @ w_v, w, atol=2e-4)


def test_calibration_error_is_at_most_plain_svds_at_every_rank():
    w, x, h = _problem()
    for r in range(1, min(w.shape) + 1):
        aware = mx.linalg.norm((w - mx.matmul(*emulator.aware_factors(w, h, r))) @ x.T).item()
        plain = mx.linalg.norm((w - mx.matmul(*emulator.plain_factors(w, r))) @ x.T).item()
        assert aware <= plain * (1 + 1e-4) + 1e-4, (r, aware, plain)
        if r < min(w.shape) // 2:
            assert aware < 0.9 * plain  # and clearly better where it matters


def test_aware_factors_of_a_tall_w_build_no_out_by_out_matrix():
    """A thin decomposition: MLX's svd returned the full [out, out] U, which (with its slow
    CPU eigh) made SmolLM2's calibration take minutes per block."""
    import tracemalloc

    mx.random.seed(0)
    w, x = mx.random.normal((2048, 64)), mx.random.normal((256, 64))
    h = x.T @ x
    mx.eval(w, h)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tracemalloc.start()
    w_u, w_v = emulator.aware_factors(w, h, 16)
    mx.eval(w_u, w_v)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full_u = 2048 * 2048 * 4
    assert mx.get_peak_memory() - base < full_u / 4 and numpy_peak < full_u / 4


def test_rank_keeps_the_ratio_of_parameters():
    assert emulator.rank_for(576, 1536, 0.4) == 167  # 0.4 * 576 * 1536 / 2112
    assert emulator.rank_for(64, 64, 0.4) == 12


def _lora(inp=16, out=24, r=4, seed=1):
    mx.random.seed(seed)
    return mx.random.normal((inp, r)), mx.random.normal((r, out))


def test_correction_keeps_ab_and_is_zero_when_the_emulator_is_exact():
    w, _, _ = _problem()
    a, b = _lora()
    a1, b2 = correct(a, b, 2.0, w, w)
    assert mx.allclose(a1 @ b2, a @ b, atol=1e-4)  # A'B' = AB (C = 0 for W_emu = W)
    assert mx.allclose(a1.T @ a1, mx.eye(a.shape[1]), atol=1e-5)  # A' orthonormal


def test_unclamped_corrected_merge_is_emulator_plus_lora_on_span_a_and_w_off_it():
    w, _, h = _problem()
    w_emu = mx.matmul(*emulator.aware_factors(w, h, 3))
    a, b = _lora()
    s = 2.0
    a1, b2 = correct(a, b, s, w, w_emu, clamp=float("inf"))
    mx.random.seed(5)
    x_in = mx.random.normal((7, a.shape[1])) @ a.T  # rows in span(A)
    x_any = mx.random.normal((7, a.shape[0]))
    x_off = x_any - (x_any @ a1) @ a1.T  # rows orthogonal to span(A)

    def merged(x):
        return x @ w.T + s * (x @ a1) @ b2

    assert mx.allclose(merged(x_in), x_in @ w_emu.T + s * (x_in @ a) @ b, atol=1e-3)
    assert mx.allclose(merged(x_off), x_off @ w.T, atol=1e-3)
    # clamp 0 removes the correction: back to the plain adapter AB
    _, b3 = correct(a, b, s, w, w_emu, clamp=0.0)
    assert mx.allclose(a1 @ b3, a @ b, atol=1e-4)


def test_calibration_accumulates_xtx_of_real_tokens_only():
    model, _ = build_tiny_model("llama")
    layer = model.model.layers[0]
    rows = [(np.arange(9) % 50, np.ones(9, bool)), (np.arange(9) + 3, np.r_[[1] * 5, [0] * 4])]
    tokens, weights = emulator.calibration_batches(rows, last_is_final=True)
    assert weights.tolist() == [[1] * 8, [1] * 4 + [0] * 4]  # padding after the last target
    h = model.model.embed_tokens(mx.array(tokens))
    out, acc = emulator._calibrate_block(
        model, 0, h, weights, ["self_attn.q_proj", "mlp.down_proj"]
    )
    x = layer.input_layernorm(h) * mx.array(weights)[..., None]
    x = x.reshape(-1, x.shape[-1])
    assert mx.allclose(acc["self_attn.q_proj"], x.T @ x, rtol=1e-4, atol=1e-4)
    assert acc["mlp.down_proj"].shape == (128, 128)
    assert mx.allclose(out, layer(h, mask="causal"), atol=1e-5)
    assert type(layer.self_attn.q_proj).__name__ == "Linear"  # recorders removed


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(8):
        (folder / f"day{i}.txt").write_text(f"Day {i}. The keeper writes down the tide. " * 8)
    return folder


def _cfg(model_dir, notes, out, **kw):
    base = dict(model=str(model_dir), data=str(notes), out=str(out), steps=3, max_seq_len=64)
    base.update(batch_size=2, lr=1e-2, warmup=1, rank=4, eval_every=0, eval_batches=2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("bits", [None, 4])
def test_emloc_writes_a_corrected_mlx_lm_adapter_and_reuses_its_emulator(
    tmp_path, notes, bits, monkeypatch
):
    kw = dict(hidden_size=256, intermediate_size=512) if bits else {}
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    tiny, cfg = build_tiny_model("llama", quantize_bits=bits, **kw)
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(tiny.parameters())))
    (model_dir / "config.json").write_text(json.dumps(cfg))
    make_tiny_tokenizer(model_dir)
    cache = tmp_path / "cache"
    r = emloc(_cfg(model_dir, notes, tmp_path / "out"), ratio=0.4, emulator_dir=str(cache))
    assert r.emulator_path.parent == cache and r.emulator_path.is_file()
    built = emulator.load(r.emulator_path)
    assert "model.layers.3.mlp.down_proj" not in built  # the last down-projection stays whole
    assert len(built) == 4 * 7 - 1
    acfg = json.loads((r.out / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == "lora" and acfg["emloc"]["ratio"] == 0.4
    theirs, _ = mlx_lm.load(str(model_dir), adapter_path=str(r.out))
    ours, _ = mlx_lm.load(str(model_dir))
    load_adapters(ours, r.out)
    toks = mx.array([[5, 17, 33, 2, 9]])
    assert mx.allclose(theirs(toks), ours(toks), atol=1e-4)
    fuse(str(model_dir), str(r.out), str(tmp_path / "fused"), dequantize=True)
    # a second run with the same model, data and ratio reuses the emulator
    monkeypatch.setattr(emulator, "build", lambda *a, **k: pytest.fail("emulator rebuilt"))
    again = emloc(_cfg(model_dir, notes, tmp_path / "out2"), ratio=0.4, emulator_dir=str(cache))
    assert again.emulator_path == r.emulator_path


def test_bad_emloc_options_are_user_errors(tmp_path, notes):
    model_dir = write_tiny_model_dir(tmp_path / "m", "llama")
    with pytest.raises(UserError, match="--ratio"):
        emloc(_cfg(model_dir, notes, tmp_path / "o"), ratio=1.5)
    with pytest.raises(UserError, match="--adapter"):
        emloc(_cfg(model_dir, notes, tmp_path / "o", adapter="lars"))
