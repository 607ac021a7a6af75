"""LARS: the gate's custom VJP equals autodiff of the plain formula and finite differences;
V = 0 is the base model; it trains in every engine path, resumes, saves, loads and generates;
fuse refuses it."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import write_tiny_model_dir
from mlx.utils import tree_flatten
from test_engine import CASES, FIELDS, make_batch, reference_head

from mlx_edgelora import engine, quant
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.errors import UserError
from mlx_edgelora.fuse import fuse
from mlx_edgelora.generate import generate, load_for_generation
from mlx_edgelora.lars import LARSLinear, gate_reference, lars_gate
from mlx_edgelora.lora import apply_adapter, load_adapters, save_adapters
from mlx_edgelora.trainer import train

TOKENS = mx.array([[5, 17, 33, 2, 9, 41, 7, 8]])
LARS = dict(adapter="lars", rank=4, lars_block=16)


def _gate_inputs(d=64, r=4, block=16, shape=(2, 5), seed=0):
    mx.random.seed(seed)
    x = mx.random.normal((*shape, d))
    u = mx.random.normal((d, r)) * 0.3
    v = mx.random.normal((r, d // block)) * 0.3
    return x, u, v, mx.array([0.7])


def test_custom_vjp_equals_autodiff_of_the_plain_formula():
    args = _gate_inputs()
    cot = mx.random.normal(args[0].shape)
    out, grads = mx.vjp(lambda *a: lars_gate(*a), list(args), [cot])
    ref_out, ref_grads = mx.vjp(lambda *a: gate_reference(*a), list(args), [cot])
    assert mx.allclose(out[0], ref_out[0], atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert mx.allclose(g, r, rtol=1e-4, atol=1e-5), (g - r).abs().max()


def test_custom_vjp_matches_finite_differences_in_float64():
    """Central differences of a scalar loss through a tiny layer, in numpy float64."""
    x, u, v, alpha = _gate_inputs(d=8, r=2, block=4, shape=(3,), seed=1)
    w = np.random.default_rng(0).normal(size=(5, 8))

    def loss_np(xn, un, vn, an):
        z = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5)
        g = np.repeat(1 + an * (z @ un @ vn), 4, axis=-1)
        return np.sin((xn * g) @ w.T).sum()

    def loss_mx(*a):
        return mx.sin(lars_gate(*a) @ mx.array(w, dtype=mx.float32).T).sum()

    grads = mx.grad(loss_mx, argnums=(0, 1, 2, 3))(x, u, v, alpha)
    point = [np.array(a, dtype=np.float64) for a in (x, u, v, alpha)]
    for i, g in enumerate(grads):
        fd = np.zeros_like(point[i])
        for idx in np.ndindex(point[i].shape):
            hi = [p.copy() for p in point]
            lo = [p.copy() for p in point]
            hi[i][idx] += 1e-6
            lo[i][idx] -= 1e-6
            fd[idx] = (loss_np(*hi) - loss_np(*lo)) / 2e-6
        np.testing.assert_allclose(np.array(g), fd, rtol=2e-3, atol=2e-4)


def _backward_peak(kind: str, T=512, d=1024, outs=(1024, 512, 512)) -> tuple[int, int]:
    """(peak bytes above resident, bytes of x) of one backward through q/k/v-like quantized
    linears that share their input x, each behind `kind` (rank 16)."""
    from mlx import nn
    from mlx_lm.tuner.lora import LoRALinear

    mx.random.seed(0)
    mods = []
    for o in outs:
        base = nn.QuantizedLinear.from_linear(nn.Linear(d, o, bias=False), 64, 4)
        mods.append(
            LoRALinear.from_base(base, r=16) if kind == "lora" else LARSLinear(base, 16, 32)
        )
    x, cots = mx.random.normal((1, T, d)), [mx.random.normal((1, T, o)) for o in outs]
    mx.eval([m.parameters() for m in mods], x, cots)

    def f(params, x):
        for m, p in zip(mods, params):
            m.update(p)
        return sum((m(x) * c).sum() for m, c in zip(mods, cots))

    params = [m.trainable_parameters() for m in mods]
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(mx.value_and_grad(f, argnums=(0, 1))(params, x))
    return mx.get_peak_memory() - resident, x.nbytes


def test_gate_backward_holds_no_more_than_loras_plus_one_input():
    """The gate's VJP once made [.., d] temporaries (z, repeat(g), x * dy, ...) that lived at
    once: 1.5x LoRA's peak on these shapes (43 vs 28.5 MB), +29% at the Llama-3B shape. Now
    its only extra [.., d] array is the gated input each base linear reads."""
    lora_peak, x_bytes = _backward_peak("lora")
    lars_peak, _ = _backward_peak("lars")
    assert lars_peak <= lora_peak + 2 * x_bytes, (lars_peak / 2**20, lora_peak / 2**20)


@pytest.mark.parametrize("bits", [None, 4])
def test_zero_v_is_exactly_the_base_model(tmp_path, arch, bits):
    path = write_tiny_model_dir(tmp_path / "m", arch, bits)
    model, _ = mlx_lm.load(str(path))
    base = model(TOKENS)
    apply_adapter(model, TrainConfig(**LARS))
    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    assert len(names) == 3 * 7 * len(model.layers)
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lars_v"):
            model.load_weights([(name, mx.zeros_like(p))], strict=False)
    assert mx.array_equal(model(TOKENS), base)


def _lars_model(arch, bits):
    from conftest import build_tiny_model

    model, _ = build_tiny_model(arch, quantize_bits=bits)
    mx.random.seed(3)
    apply_adapter(model, TrainConfig(**LARS))
    for name, p in tree_flatten(model.trainable_parameters()):  # a gate far from 1
        if name.endswith("lars_v"):
            model.load_weights([(name, 0.3 * mx.random.normal(p.shape))], strict=False)
    quant.prepare_for_training(model)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("case", CASES[1::2], ids=lambda c: "-".join(map(str, c)))
def test_segments_match_graph_with_lars(arch, bits, case, tmp_path):
    model, batch = _lars_model(arch, bits), make_batch()
    ref = engine.make_step(model, TrainConfig(engine="graph"), reference_head(model))(batch)
    cfg = TrainConfig(spill_dir=str(tmp_path), out=str(tmp_path), **dict(zip(FIELDS, case)))
    step = engine.make_step(model, cfg, reference_head(model))
    try:
        got = step(batch)
    finally:
        step.close()
    assert got[1] == ref[1] and got[0] == pytest.approx(ref[0], rel=1e-5)
    g, r = dict(tree_flatten(got[2])), dict(tree_flatten(ref[2]))
    assert g.keys() == r.keys() and len(r) == 4 * 7 * 3
    for k in r:
        scale = mx.abs(r[k]).max().item()
        assert mx.abs(g[k] - r[k]).max().item() <= 1e-4 * scale + 1e-9, k
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(6):
        (folder / f"day{i}.txt").write_text(f"Day {i}. The lighthouse keeper logs the tide. " * 6)
    return folder


def _cfg(model_dir, notes, out, **kw):
    base = dict(model=str(model_dir), data=str(notes), out=str(out), steps=4, max_seq_len=64)
    base.update(batch_size=2, lr=1e-2, warmup=1, eval_every=2, eval_batches=2, save_every=2)
    return TrainConfig(**{**base, **LARS, **kw})


@pytest.mark.parametrize("loss", ["full", "chunked", "subset"])
def test_lars_trains_with_every_loss_and_saves_its_own_format(tmp_path, notes, loss):
    model_dir = write_tiny_model_dir(tmp_path / "m", "qwen2", 4)
    out = tmp_path / "out"
    result = train(_cfg(model_dir, notes, out, loss=loss, subset_k=64, steps=6, eval_every=0))
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == "lars"
    assert acfg["lars_parameters"] == {
        "rank": 4,
        "block": 16,
        "keys": acfg["edgelora"]["lora_keys"],
    }
    assert {k.rsplit(".", 1)[-1] for k in mx.load(str(out / "adapters.safetensors"))} == {
        "lars_u",
        "lars_v",
        "lars_alpha",
    }


def test_lars_resume_equals_an_uninterrupted_run(tmp_path, notes):
    model_dir = write_tiny_model_dir(tmp_path / "m", "llama", 4)
    full = train(_cfg(model_dir, notes, tmp_path / "a", steps=4))
    train(_cfg(model_dir, notes, tmp_path / "b", steps=2))
    resumed = train(_cfg(model_dir, notes, tmp_path / "b", steps=4, resume=True))
    assert resumed.val_loss == pytest.approx(full.val_loss, rel=1e-5)
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert all(mx.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(UserError, match="--adapter"):
        train(_cfg(model_dir, notes, tmp_path / "b", steps=5, resume=True, adapter="lora"))


def test_saved_lars_loads_generates_and_fuse_refuses(tmp_path, notes):
    model_dir = write_tiny_model_dir(tmp_path / "m", "llama", 4)
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out, steps=2, eval_every=0), keep_model=False)
    trained, _ = mlx_lm.load(str(model_dir))
    load_adapters(trained, out)
    assert any(isinstance(m, LARSLinear) for _, m in trained.named_modules())
    plain, _ = mlx_lm.load(str(model_dir))
    assert not mx.allclose(trained(TOKENS), plain(TOKENS), atol=1e-5)
    loaded = load_for_generation(str(model_dir), str(out))
    assert isinstance(generate(loaded, "hi", max_tokens=4, chat=False), str)
    with pytest.raises(UserError, match="cannot fuse: a LARS gate depends on the input"):
        fuse(str(model_dir), str(out), str(tmp_path / "fused"))
    assert not (tmp_path / "fused").exists()


def test_lars_block_must_divide_the_input_width(tmp_path):
    path = write_tiny_model_dir(tmp_path / "m", "llama")
    model, _ = mlx_lm.load(str(path))
    with pytest.raises(UserError, match="--lars-block 48"):
        apply_adapter(model, TrainConfig(adapter="lars", lars_block=48))


def test_save_roundtrip_keeps_the_gate(tmp_path):
    path = write_tiny_model_dir(tmp_path / "m", "qwen2")
    model = mlx_lm.load(str(path))[0]
    acfg = apply_adapter(model, TrainConfig(**LARS))
    model.load_weights([("model.layers.0.mlp.up_proj.lars_alpha", mx.array([2.0]))], strict=False)
    ours = model(TOKENS)
    save_adapters(model, tmp_path / "a", acfg)
    again = mlx_lm.load(str(path))[0]
    load_adapters(again, tmp_path / "a")
    assert mx.array_equal(again(TOKENS), ours)


@pytest.mark.parametrize("module", ["lora", "lars", "emloc", "emulator"])
def test_each_adapter_module_imports_first_in_a_fresh_process(module):
    """lora.py once imported blocks at the top: blocks -> models -> attention -> lora was a
    circular import whenever lora was the first module a process imported."""
    import subprocess
    import sys

    code = f"import mlx_edgelora.{module}; from mlx_edgelora import TrainConfig, emloc, train"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-800:]
