"""precision.py and --dtype: what is stored and computed in half precision, and what stays float32.

Tolerances of the bf16-vs-fp32 comparisons: bfloat16 keeps 8 significant bits (relative
rounding 2^-9 = 0.2% per operation). Measured on the 4-block tiny models (llama/qwen2, float
and INT4): loss within 1.5e-4 relative, all LoRA gradients together within 1.1e-2 relative
L2 (bf16 compute; 0.7e-2 with float32 compute on bf16 boundaries and weights), the worst
single tensor 6e-2 max-relative. The bounds leave ~3x room; float32 compute in the same
code matches to 1e-5 (test_engine).
"""

import io
import json

# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)
import mlx.core as mx

# isort: on
import numpy as np
import pytest
from conftest import build_tiny_model, make_tiny_tokenizer, requires_smollm2, smollm2_path
from mlx.utils import tree_flatten
from test_engine import make_batch, make_model, reference_head
from test_trainer import _cfg, _StopAt, notes  # noqa: F401  (notes: a fixture)

from mlx_edgelora import attention, blocks, checkpoint, engine, loss, plan, precision, quant, spill
from mlx_edgelora.config import TrainConfig, parse_config
from mlx_edgelora.errors import UserError
from mlx_edgelora.loading import load_model
from mlx_edgelora.precision import Precision
from mlx_edgelora.report import Reporter
from mlx_edgelora.state import ADAPTERS, OPTIMIZER
from mlx_edgelora.stream import WeightStream
from mlx_edgelora.trainer import train

BF16 = Precision(mx.bfloat16, mx.bfloat16, "test")
CPU_AUTO = Precision(mx.bfloat16, mx.float32, "test")
FP16 = Precision(mx.float16, mx.float16, "test")


def _rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


# ------------------------------------------------------------------------- resolving --dtype


def test_auto_follows_the_model_and_computes_in_float32_on_a_cpu():
    cpu = precision.resolve("auto", mx.bfloat16, gpu=False)
    assert (cpu.storage, cpu.compute) == (mx.bfloat16, mx.float32)
    assert "auto" in cpu.describe() and "compute float32" in cpu.describe()
    gpu = precision.resolve("auto", mx.bfloat16, gpu=True)
    assert (gpu.storage, gpu.compute) == (mx.bfloat16, mx.bfloat16)
    for native in (mx.float32, mx.int8):  # a GGUF's auto is float32 (loading.py decides)
        p = precision.resolve("auto", native, gpu=True)
        assert (p.storage, p.compute) == (mx.float32, mx.float32)
    for name, dt in precision.DTYPES.items():
        p = precision.resolve(name, mx.float32, gpu=False)
        assert (p.storage, p.compute) == (dt, dt)  # explicit: everywhere


def test_bad_dtype_is_a_one_line_user_error(capsys):
    with pytest.raises(UserError, match="--dtype must be one of auto, float32") as e:
        TrainConfig(dtype="bf16").validate()
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--dtype"):
        precision.resolve("half", mx.float32)
    with pytest.raises(SystemExit) as e:
        parse_config(["--dtype", "bf16"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err.splitlines()[-1]


def _bf16_int4_folder(path, arch="llama"):
    """A tiny mlx-community-style INT4 folder: group 32, bfloat16 scales, biases and norms."""
    model, cfg = build_tiny_model(arch, quantize_bits=4)
    path.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(cfg))
    make_tiny_tokenizer(path)
    return path


def test_loaded_model_knows_its_own_dtype_though_it_computes_in_float32(tmp_path):
    loaded = load_model(str(_bf16_int4_folder(tmp_path / "m")))
    assert loaded.dtype == mx.bfloat16
    norm = blocks.layers(loaded.model)[0].input_layernorm.weight
    assert norm.dtype == mx.float32  # load_model's model is float32 (generate, fuse)
    model, _ = build_tiny_model("llama")
    assert precision.model_dtype(model) == mx.float32


@requires_smollm2
def test_a_gguf_model_is_float32_under_auto():
    """F16 block scales, F32 norms: llama.cpp computes in F32, so auto means float32."""
    assert load_model(smollm2_path(), lazy=True).dtype == mx.float32


# ---------------------------------------------------------------- what is stored in the dtype


def _record_boundaries(monkeypatch) -> list:
    """(dtype, nbytes, file bytes) of every boundary a BoundaryStore writes to disk."""
    seen = []
    write = spill.BoundaryStore._write

    def recording(self, io):
        write(self, io)
        seen.append((io.dtype, io.path.stat().st_size))

    monkeypatch.setattr(spill.BoundaryStore, "_write", recording)
    return seen


@pytest.mark.parametrize("prec", [BF16, CPU_AUTO, FP16], ids=["bf16", "cpu-auto", "fp16"])
def test_spilled_boundaries_have_the_storage_dtype_and_half_the_bytes(tmp_path, monkeypatch, prec):
    model, batch = make_model("llama", 4), make_batch()
    files = {}
    for p in (Precision(), prec):
        seen = _record_boundaries(monkeypatch)
        cfg = TrainConfig(activations="disk", spill_dir=str(tmp_path), out=str(tmp_path))
        engine.make_step(model, cfg, reference_head(model), precision=p)(batch)
        assert {dt for dt, _ in seen} == {p.storage}
        files[p.storage] = sum(size for _, size in seen)
        assert list(tmp_path.iterdir()) == []
    header = 128 * 8  # np.save's header, per file (8 boundaries: 4 blocks x 2 halves)
    assert files[prec.storage] - header / 2 < (files[mx.float32] - header) / 2 + header


def test_ram_boundaries_have_the_storage_dtype(tmp_path, monkeypatch):
    kept = []
    put = spill.BoundaryStore.put
    monkeypatch.setattr(
        spill.BoundaryStore, "put", lambda self, i, x: (kept.append(x.dtype), put(self, i, x))
    )
    model, batch = make_model("qwen2", 4), make_batch()
    cfg = TrainConfig(activations="ram", out=str(tmp_path))
    engine.make_step(model, cfg, reference_head(model), precision=CPU_AUTO)(batch)
    assert kept and set(kept) == {mx.bfloat16}


def test_plan_counts_boundaries_and_activations_by_the_dtype():
    model = make_model("llama", 4)
    cfg = TrainConfig(activations="ram", max_seq_len=256).validate()
    fp32, half = plan.estimate(model, cfg), plan.estimate(model, cfg, precision=BF16)
    auto = plan.estimate(model, cfg, precision=CPU_AUTO)
    key = "segment boundaries"
    assert half.parts[key] == pytest.approx(fp32.parts[key] / 2)
    assert auto.parts[key] == pytest.approx(fp32.parts[key] / 2)
    phase = next(k for k in fp32.parts if k.endswith("(peak phase)"))  # recompute or loss head
    assert half.parts.get(phase, 0) <= fp32.parts[phase] and half.total_gb < fp32.total_gb
    # fp32 compute; a recompute also holds its input cast from the bf16 boundary to float32
    x_f32 = 0 if phase.startswith("loss head") else 256 * blocks.shape(model).D * 4 / plan.GB
    assert auto.parts[phase] == pytest.approx(fp32.parts[phase] + x_f32)


def test_streamed_weight_files_hold_the_storage_dtype(tmp_path):
    written = {}
    for dt in (mx.float32, mx.bfloat16):
        model = make_model("llama", None)  # float linears: the weights that can halve
        precision.cast_weights(model, dt)
        with WeightStream(model, str(tmp_path / str(dt)), str(tmp_path)) as stream:
            stream.offload(head=True)
            written[dt] = stream.stats.bytes_written
            files = list(stream.folder.iterdir())
            tensors = [v for f in files for v in mx.load(str(f)).values()]
            assert {v.dtype for v in tensors} == {dt}
    assert written[mx.bfloat16] == written[mx.float32] // 2


def test_weights_are_cast_but_scales_and_lora_are_not():
    model = make_model("llama", 4)
    precision.cast_weights(model, mx.bfloat16)
    params = dict(tree_flatten(model.parameters()))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert params["model.layers.0.input_layernorm.weight"].dtype == mx.bfloat16
    assert params["model.layers.0.self_attn.q_proj.linear.scales"].dtype == mx.float32
    assert trainable and all(v.dtype == mx.float32 for v in trainable.values())


# ---------------------------------------------------------- bf16 matches fp32; float32 islands


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("prec", [BF16, CPU_AUTO], ids=["bf16", "cpu-auto"])
def test_half_precision_step_matches_float32_within_tolerance(tmp_path, arch, bits, prec):
    model, batch = make_model(arch, bits), make_batch()
    cfg = TrainConfig(spill_dir=str(tmp_path), out=str(tmp_path), attn_chunk=8, mlp_chunk=8)
    head = loss.exact_loss_head(model, cfg)  # float32 whatever h's dtype
    ref = engine.make_step(model, cfg, head)(batch)
    precision.cast_weights(model, prec.storage)
    step = engine.make_step(model, cfg, head, precision=prec)
    got = step(batch)
    assert abs(got[0] - ref[0]) <= 1e-3 * abs(ref[0])
    g, r = dict(tree_flatten(got[2])), dict(tree_flatten(ref[2]))
    assert all(v.dtype == mx.float32 for v in g.values())  # LoRA gradients stay float32
    err = sum(((g[k] - r[k]) ** 2).sum().item() for k in r)
    assert (err / sum((r[k] ** 2).sum().item() for k in r)) ** 0.5 < 3e-2
    assert max(_rel(g[k], r[k]) for k in r) < 0.2
    val = step.forward_loss(head, batch)
    assert val[0] == pytest.approx(ref[0], rel=1e-3)


def test_graph_engine_takes_the_dtype_too():
    model, batch = make_model("llama", 4), make_batch()
    cfg = TrainConfig(engine="graph")
    head = loss.exact_loss_head(model, cfg)
    ref = engine.make_step(model, cfg, head)(batch)
    precision.cast_weights(model, mx.bfloat16)
    step = engine.make_step(model, cfg, head, None, BF16)
    assert step(batch)[0] == pytest.approx(ref[0], rel=1e-3)


def test_loss_head_normalizes_and_takes_logits_in_float32():
    """Rows with logits of a few hundred: in bfloat16 (8 significant bits) the normed rows
    alone would move each logit by ~1 and the loss by far more than 1e-5."""
    model = make_model("llama", 4)
    head = blocks.head_module(model)
    head.update({"scales": head.scales * 200})  # logits of a few hundred
    precision.cast_weights(model, mx.bfloat16)
    mx.random.seed(3)
    batch = make_batch(1)
    h = mx.random.normal((1, batch.inputs.shape[1], 64)).astype(mx.bfloat16)
    for kind in ("full", "chunked"):
        lh = loss.make_loss_head(model, kind, TrainConfig())
        got, ref = lh(h, batch), lh(h.astype(mx.float32), batch)
        assert got.dtype == mx.float32 and ref.item() > 100
        assert got.item() == pytest.approx(ref.item(), rel=1e-6)
        rounded = blocks.final_norm(model)(h.reshape(-1, 64)).astype(mx.float32)  # bf16 norm
        exact = blocks.final_norm(model)(h.reshape(-1, 64).astype(mx.float32))
        assert _rel(blocks.head_logits(model, rounded), blocks.head_logits(model, exact)) > 1e-4


def test_attention_softmax_and_lse_are_float32_for_half_inputs():
    mx.random.seed(0)
    q, k, v = (mx.random.normal((1, 4, 40, 16)).astype(mx.bfloat16) for _ in range(3))
    spans = [(s, min(s + 8, 40)) for s in range(0, 40, 8)]
    rows = [
        attention.attend_rows(q[:, :, s:e], k, v, spans, i, 1, 0.25, None)
        for i, (s, e) in enumerate(spans)
    ]
    o, lse = (mx.concatenate([r[n] for r in rows], axis=2) for n in (0, 1))
    ro, rlse = attention.attention_reference(*(a.astype(mx.float32) for a in (q, k, v)), 0.25)
    assert o.dtype == mx.bfloat16 and lse.dtype == mx.float32
    assert _rel(lse, rlse) < 1e-5  # scores and softmax statistics in float32
    assert _rel(o, ro) < 1e-2  # o rounded once, to bfloat16
    full = attention.attention_core(q, k, v, 0.25)  # the unchunked (fused) path
    assert full.dtype == mx.bfloat16 and _rel(full, ro) < 1e-2


def test_cpu_matmul_of_half_operands_is_exact_upcast_then_float32():
    a = mx.random.normal((33, 17)).astype(mx.bfloat16)
    b = mx.random.normal((17, 9)).astype(mx.bfloat16)
    got = quant.matmul(a, b, mx.float32)
    assert mx.allclose(got, a.astype(mx.float32) @ b.astype(mx.float32), atol=1e-6)
    assert quant.matmul(a, b).dtype == mx.bfloat16
    lin = make_model("llama", 4).layers[0].mlp.down_proj.linear
    assert lin(mx.zeros((1, 3, 128), mx.bfloat16)).dtype == mx.bfloat16


# ------------------------------------------------------------------------------ float16


def test_norm_statistics_do_not_overflow_float16():
    x = (mx.random.normal((4, 64)) * 1000).astype(mx.float16)  # x^2 > 65504
    y = mx.fast.rms_norm(x, mx.ones((64,), mx.float16), 1e-5)
    assert mx.all(mx.isfinite(y)).item()


def test_float16_runs_at_realistic_magnitudes_and_refuses_an_overflow(tmp_path):
    model, batch = make_model("llama", 4), make_batch()
    cfg = TrainConfig(activations="ram", out=str(tmp_path), attn_chunk=8, mlp_chunk=8)
    head = loss.exact_loss_head(model, cfg)
    ref = engine.make_step(model, cfg, head)(batch)
    precision.cast_weights(model, mx.float16)
    got = engine.make_step(model, cfg, head, precision=FP16)(batch)
    assert np.isfinite(got[0]) and got[0] == pytest.approx(ref[0], rel=1e-3)
    emb = model.model.embed_tokens
    emb.update({"scales": emb.scales * 1e5})  # embeddings of ~1e5: past float16's 65504
    step = engine.make_step(model, cfg, head, precision=FP16)
    with pytest.raises(UserError, match="--dtype float16: the activations overflowed"):
        step(batch)
    with pytest.raises(UserError, match="use --dtype bfloat16"):
        step.forward_loss(head, batch)


# ------------------------------------------------------------------------ the real trainer


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_trainer_keeps_lora_and_optimizer_float32_and_resumes(tmp_path, notes, dtype):  # noqa: F811
    folder = _bf16_int4_folder(tmp_path / "m", "qwen2")
    full = tmp_path / "full"
    said = io.StringIO()
    train(
        _cfg(folder, notes, full, dtype=dtype, steps=4, eval_every=0),
        reporter=Reporter(4, stream=said),
    )
    assert "dtype: weights and boundaries bfloat16" in said.getvalue()
    adapter = mx.load(str(full / "adapters.safetensors"))
    ck = checkpoint.latest(full)
    opt = mx.load(str(ck / OPTIMIZER))
    tensors = [*adapter.values(), *mx.load(str(ck / ADAPTERS)).values()]
    tensors += [v for k, v in opt.items() if k.endswith((".m", ".v"))]
    assert len(tensors) > len(adapter) and all(v.dtype == mx.float32 for v in tensors)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(folder, notes, cut, dtype=dtype, steps=4, eval_every=0), reporter=_StopAt(2, 4))
    result = train(_cfg(folder, notes, cut, dtype=dtype, steps=4, eval_every=0, resume=True))
    assert [r["step"] for r in result.history if "loss" in r] == [3, 4]
    resumed = mx.load(str(cut / "adapters.safetensors"))
    for k in adapter:
        assert mx.allclose(adapter[k], resumed[k], atol=1e-6), k
