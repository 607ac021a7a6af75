"""export.py / gguf_write.py: GGUF files that equal base + adapter, read back and reloaded."""

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from conftest import requires_smollm2, write_tiny_model_dir
from mlx import nn
from test_fuse import PROMPT, base_plus_adapter_logits, make_adapter
from test_gemma3_gguf import requires_gemma

from mlx_edgelora import UserError
from mlx_edgelora.export import export, main, write_model
from mlx_edgelora.fuse import fuse, fuse_lora
from mlx_edgelora.gguf import _mlx_name, unpermute_rows
from mlx_edgelora.gguf_header import read_header
from mlx_edgelora.gguf_write import mlx_blocks, permute_rows
from mlx_edgelora.loading import load_model
from mlx_edgelora.lora import load_adapters
from mlx_edgelora.ollama import UNTRANSLATED

TEXT = "Bartholomew the starter needs feeding, 3 times a day!"


def logits(path) -> np.ndarray:
    return np.array(load_model(str(path)).model(mx.array([PROMPT])))


def f16_scaled_q4_dir(path, arch, **overrides):
    """A tiny 4-bit group-32 model whose scales/biases are float16, like a Q4_1 GGUF's."""
    folder = write_tiny_model_dir(path, arch, quantize_bits=4, **overrides)
    weights = mx.load(str(folder / "model.safetensors"))
    half = {
        k: v.astype(mx.float16) if k.endswith((".scales", ".biases")) else v
        for k, v in weights.items()
    }
    mx.save_safetensors(str(folder / "model.safetensors"), half)
    return folder


def test_f32_export_is_exactly_base_plus_adapter(tmp_path, arch):
    """Names, Q/K permutation and hyper-parameters: an F32 GGUF reloads as the same model."""
    model_dir = write_tiny_model_dir(tmp_path / "base", arch)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "f32")

    want = base_plus_adapter_logits(model_dir, adapter)
    np.testing.assert_allclose(logits(path), want, atol=1e-5, rtol=1e-5)  # float32 rounding only
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == 4
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


def test_f16_export_equals_the_fused_mlx_lm_model_exactly(tmp_path, arch):
    """With float16 scales (as from a GGUF base) the fused weights are float16: no rounding."""
    model_dir = f16_scaled_q4_dir(tmp_path / "base", arch)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    fused = fuse(str(model_dir), str(adapter), str(tmp_path / "fused"), dequantize=True)
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "f16")

    np.testing.assert_array_equal(logits(path), logits(fused))


def test_q4_1_keeps_untouched_4bit_blocks_exact(tmp_path):
    """The embedding (no LoRA) is copied block for block; merged layers are re-quantized."""
    model_dir = f16_scaled_q4_dir(tmp_path / "base", "qwen2")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "q4_1")

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type == gguf.GGMLQuantizationType.Q4_1
    emb = load_model(str(model_dir)).model.model.embed_tokens
    f32 = [emb.scales.astype(mx.float32), emb.biases.astype(mx.float32)]  # as ggml computes
    want = mx.dequantize(emb.weight, *f32, 32, 4)
    got = gguf.quants.dequantize(embd.data, embd.tensor_type)
    np.testing.assert_array_equal(got, np.array(want))
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    # re-quantized merged layers: lossy like fuse.py's default (its test uses the same bound)
    got, want = logits(path), base_plus_adapter_logits(model_dir, adapter)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95


@pytest.mark.parametrize("qtype, bound", [("q8_0", 0.03), ("bf16", 0.03), ("q4_0", None)])
def test_requantized_types_are_close(tmp_path, qtype, bound):
    model_dir = write_tiny_model_dir(tmp_path / "base", "llama")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), qtype)

    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types == {qtype.upper(), "F32"}  # F32: the norms
    got, want = logits(path), base_plus_adapter_logits(model_dir, adapter)
    if bound:  # ~8 bits per weight: logits within 3% of their range (measured: ~1%)
        assert np.abs(got - want).max() < bound * np.abs(want).max()
    else:  # 4 bits: the same bound as fuse.py's re-quantized test
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95


def test_mlx_blocks_match_the_gguf_reference_dequantizer():
    """MLX 4/8-bit group-32 layouts -> Q4_0, Q4_1 and Q8_0 bytes, exactly."""
    mx.random.seed(0)
    w = mx.random.normal((8, 64)).astype(mx.float16)
    for bits, qtype in [(4, gguf.GGMLQuantizationType.Q4_1), (8, None), (4, None)]:
        q, s, b = mx.quantize(w, 32, bits)
        if qtype is None:  # symmetric: bias = -2^(bits-1) * scale, as MLX loads Q4_0 / Q8_0
            b = -(2 ** (bits - 1)) * s
            qtype = gguf.GGMLQuantizationType.Q8_0 if bits == 8 else gguf.GGMLQuantizationType.Q4_0
        want = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), 32, bits))
        got = gguf.quants.dequantize(mlx_blocks(q, s, b, qtype), qtype)
        np.testing.assert_array_equal(got, want)


def test_permute_rows_inverts_the_load_side_unpermute():
    w = np.arange(4 * 16 * 3).reshape(64, 3)
    np.testing.assert_array_equal(np.array(unpermute_rows(mx.array(permute_rows(w, 4)), 4)), w)


def test_tokenizer_and_template_survive_export(tmp_path, arch):
    model_dir = write_tiny_model_dir(tmp_path / "base", arch)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "f16")

    original, exported = load_model(str(model_dir)).tokenizer, load_model(str(path)).tokenizer
    assert exported.encode(TEXT) == original.encode(TEXT)
    assert exported.chat_template == original.chat_template
    assert exported.eos_token_ids == original.eos_token_ids
    text = (path.parent / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert "<|im_start|>{{ .Role }}" in text


def llama_cpp_lora_logits(base_gguf, adapter_gguf) -> np.ndarray:
    """What llama.cpp computes: W + alpha / rank * B A, with B A in the file's row order.

    Independent of gguf_write: it reads the adapter file raw and follows llama.cpp's convention
    (a: ne [in, r] = numpy [r, in]; b: ne [r, out] = numpy [out, r]; scale alpha / b.ne[0]);
    W is the base as gguf.py loads it (rows un-permuted), so B A is un-permuted the same way.
    """
    from mlx.utils import tree_unflatten

    reader = gguf.GGUFReader(adapter_gguf)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    arch = reader.fields["general.architecture"].contents()
    lora = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    loaded = load_model(str(base_gguf))
    cfg = loaded.config
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    modules = dict(loaded.model.named_modules())
    updates = []
    for name in sorted({n.rsplit(".", 1)[0] for n in lora}):  # 'blk.0.attn_q.weight'
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        delta = alpha / b.shape[1] * (b @ a)
        if arch == "llama" and (part := name.split(".")[2]) in heads:
            delta = np.array(unpermute_rows(mx.array(delta), heads[part]))
        path = _mlx_name(name, arch, "x").removesuffix(".weight")
        old = modules[path]
        w = old.weight
        if "scales" in old:
            w = mx.dequantize(w, old.scales, old.biases, old.group_size, old.bits, mode=old.mode)
        new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in old)
        new.weight = mx.array(np.array(w.astype(mx.float32)) + delta)
        if "bias" in old:
            new.bias = old.bias
        updates.append((path, new))
    loaded.model.update_modules(tree_unflatten(updates))
    return np.array(loaded.model(mx.array([PROMPT])))


def test_lora_gguf_applies_like_llama_cpp(tmp_path, arch):
    base = tmp_path / "base.gguf"
    model_dir = write_tiny_model_dir(tmp_path / "tiny", arch)
    write_model(load_model(str(model_dir)), base, "f32")
    adapter = make_adapter(base, tmp_path / "adapter")
    path = export(None, str(adapter), str(tmp_path / "out"), lora_only=True)

    fields = gguf.GGUFReader(path).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == pytest.approx(2.0 * 4)  # scale * rank
    want = base_plus_adapter_logits(base, adapter)
    np.testing.assert_allclose(llama_cpp_lora_logits(base, path), want, atol=1e-4, rtol=1e-4)
    text = (path.parent / "Modelfile").read_text()
    assert text.startswith(f"FROM {base.resolve()}\nADAPTER adapter.gguf\n")
    # merged from the GGUF base: its tokenizer keys are copied unchanged
    merged = export(None, str(adapter), str(tmp_path / "merged"), "f32")
    np.testing.assert_allclose(logits(merged), want, atol=1e-5, rtol=1e-5)
    old, new = gguf.GGUFReader(base).fields, gguf.GGUFReader(merged).fields
    keys = [k for k in old if k.startswith("tokenizer.")]
    assert len(keys) > 5 and all(new[k].contents() == old[k].contents() for k in keys)
    assert all(new[k].types == old[k].types for k in keys)  # value types too


def test_non_lora_adapter_is_refused(tmp_path, capsys):
    model_dir = write_tiny_model_dir(tmp_path / "base", "llama")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "lars"}))
    with pytest.raises(UserError, match="'lars' adapter cannot be exported"):
        export(str(model_dir), str(adapter), str(tmp_path / "out"))
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "o2"), "--lora"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
@requires_smollm2
def test_trained_smollm2_adapter_exports_both_ways(tmp_path):
    """The quick start's base and a few training steps: merged F16 / Q4_1 and the LoRA file."""
    from conftest import smollm2_path

    from mlx_edgelora import TrainConfig, train

    adapter = tmp_path / "adapter"
    cfg = TrainConfig(
        out=str(adapter),
        steps=3,
        rank=4,
        max_seq_len=64,
        eval_every=0,
        eval_batches=1,
        save_every=0,
        activations="ram",
        stream_weights=False,
    )  # the quick start's base and data; short rows keep this test quick
    train(cfg, keep_model=False)
    fused = load_model(None)  # what `fuse --dequantize` saves (test_fuse checks the folder)
    load_adapters(fused.model, adapter)
    fuse_lora(fused.model, dequantize=True)
    want = np.array(fused.model(mx.array([PROMPT])))

    f32 = export(None, str(adapter), str(tmp_path / "f32"), "f32")
    exported = load_model(str(f32))
    np.testing.assert_array_equal(np.array(exported.model(mx.array([PROMPT]))), want)
    assert exported.tokenizer.encode(TEXT) == fused.tokenizer.encode(TEXT)
    assert exported.tokenizer.chat_template == fused.tokenizer.chat_template
    # F16: merged layers are float16 already (the base's Q4_1 scales are); the Q8_0 embedding
    # dequantizes to float32 (gguf.py keeps it exact) and rounds to float16 here
    f16 = logits(export(None, str(adapter), str(tmp_path / "f16"), "f16"))
    # measured: 0.019 at a largest logit of 30.6; bound 1% of the largest logit
    assert np.abs(f16 - want).max() < 0.01 * np.abs(want).max()

    q41 = export(None, str(adapter), str(tmp_path / "q41"), "q4_1")
    types = {t.name: t.type_name for t in read_header(str(q41)).tensors}
    assert types["token_embd.weight"] == "Q8_0"  # the base's Q8_0 embedding, copied exactly
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    # merged layers re-quantized to Q4_1 lose about what MLX's own 4-bit re-quantization
    # (fuse without --dequantize) loses; 1.5x leaves room for float16 d/m instead of float32
    requant = load_model(None)
    load_adapters(requant.model, adapter)
    fuse_lora(requant.model)
    mlx_err = np.abs(np.array(requant.model(mx.array([PROMPT]))) - want).max()
    assert np.abs(logits(q41) - want).max() < 1.5 * mlx_err

    lora = export(None, str(adapter), str(tmp_path / "lora"), lora_only=True)
    # llama.cpp adds B A in float32 to the dequantized base; fuse rounds the sum to float16
    got = llama_cpp_lora_logits(smollm2_path(), lora)
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0)


def test_qwen3_exports_with_its_q_k_norms(tmp_path):
    """Qwen3 (q/k RMSNorm, head_dim != hidden / heads) reloads as base + adapter."""
    model_dir = write_tiny_model_dir(tmp_path / "base", "qwen3")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "f32")

    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "qwen3"
    assert fields["qwen3.attention.key_length"].contents() == 24
    assert "blk.0.attn_q_norm.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    want = base_plus_adapter_logits(model_dir, adapter)
    np.testing.assert_allclose(logits(path), want, atol=1e-5, rtol=1e-5)


def test_cli_writes_and_names_the_next_commands(tmp_path, capsys):
    model_dir = write_tiny_model_dir(tmp_path / "base", "qwen2")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--adapter", str(adapter), "--out", str(out)]
    assert main(args + ["--type", "f16"]) == 0
    assert "ollama create" in capsys.readouterr().out
    assert main(args) == 2  # not empty now
    assert main(args + ["--overwrite", "--lora"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.gguf", "adapter.gguf", "Modelfile"}
    assert "ADAPTER adapter.gguf" in (out / "Modelfile").read_text()


def test_llama3_rope_factors_read_back_as_the_same_scaling():
    """The rope_freqs tensor we write is what gguf.py recognises as Llama 3 scaling."""
    from mlx_edgelora.gguf import _llama3_scaling
    from mlx_edgelora.gguf_write import llama3_rope_factors

    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = {"hidden_size": 2048, "num_attention_heads": 32, "rope_theta": 500000.0}
    factors = llama3_rope_factors({**config, "rope_scaling": scaling})
    meta = {"llama.rope.freq_base": mx.array(500000.0)}
    assert _llama3_scaling(mx.array(factors), meta, "llama", "x.gguf") == scaling


# Gemma 3 as llama.cpp can run it: 5 local : 1 global layers, queries scaled by head_dim
GEMMA_LLAMA_CPP = {"num_hidden_layers": 6, "sliding_window_pattern": 6, "query_pre_attn_scalar": 32}


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma3"])
def test_gemma3_merged_export_equals_the_fused_model(tmp_path, model_type, capsys):
    """Norms as 1 + w, the implicit embedding scale and tied head, llama.cpp's keys."""
    model_dir = f16_scaled_q4_dir(tmp_path / "base", model_type, **GEMMA_LLAMA_CPP)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    fused = fuse(str(model_dir), str(adapter), str(tmp_path / "fused"), dequantize=True)
    capsys.readouterr()
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "f16")
    np.testing.assert_array_equal(logits(path), logits(fused))
    # the tiny tokenizer's ChatML is not a Gemma format: no TEMPLATE, and one line says so
    assert capsys.readouterr().out == f"{path.parent / 'Modelfile'}: {UNTRANSLATED}\n"
    assert 'TEMPLATE """' not in (path.parent / "Modelfile").read_text()

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    g = "gemma3"
    want = {  # every {arch}.* key, as convert_hf_to_gguf.py's Gemma3Model writes them
        f"{g}.context_length": 4096,
        f"{g}.embedding_length": 96,
        f"{g}.block_count": 6,
        f"{g}.feed_forward_length": 128,
        f"{g}.attention.head_count": 4,
        f"{g}.attention.head_count_kv": 2,
        f"{g}.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        f"{g}.attention.key_length": 32,
        f"{g}.attention.value_length": 32,
        f"{g}.attention.sliding_window": 6,
        f"{g}.rope.freq_base": 1e6,
        f"{g}.rope.freq_base_swa": 1e4,
        f"{g}.rope.dimension_count": 32,
    }
    assert {k: v for k, v in fields.items() if k.startswith(f"{g}.")} == want
    assert fields["general.architecture"] == g
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # the head is the embedding, as in llama.cpp
    per_block = {"attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"}
    assert {f"blk.5.{n}.weight" for n in per_block} <= names
    # the norms are stored as 1 + w (llama.cpp multiplies by the stored weight)
    fused_model = load_model(str(fused)).model
    lm = getattr(fused_model, "language_model", fused_model)
    stored = {t.name: np.array(t.data) for t in reader.tensors if t.name.endswith("norm.weight")}
    np.testing.assert_array_equal(
        stored["blk.2.post_ffw_norm.weight"],
        1 + np.array(lm.model.layers[2].post_feedforward_layernorm.weight),
    )
    np.testing.assert_array_equal(stored["output_norm.weight"], 1 + np.array(lm.model.norm.weight))


def test_gemma3_requantized_q8_0_is_close(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path / "base", "gemma3_text", **GEMMA_LLAMA_CPP)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "q8_0")
    got, want = logits(path), base_plus_adapter_logits(model_dir, adapter)
    # A random Gemma amplifies rounding (sqrt(D) embedding scale, four norms per block): MLX's
    # own affine 8-bit re-quantization moves its logits by ~6% of their range. Q8_0 is
    # symmetric, so its step is up to twice the affine one: bound 2x MLX's error (measured 1.5x).
    mlx8 = load_model(str(model_dir))
    load_adapters(mlx8.model, adapter)
    fuse_lora(mlx8.model, dequantize=True)
    nn.quantize(mlx8.model, group_size=32, bits=8)
    mlx_err = np.abs(np.array(mlx8.model(mx.array([PROMPT]))) - want).max()
    assert np.abs(got - want).max() < 2 * mlx_err


def test_gemma3_lora_gguf_applies_like_llama_cpp(tmp_path):
    base = tmp_path / "base.gguf"
    model_dir = write_tiny_model_dir(tmp_path / "tiny", "gemma3_text", **GEMMA_LLAMA_CPP)
    write_model(load_model(str(model_dir)), base, "f32")
    adapter = make_adapter(base, tmp_path / "adapter")
    path = export(None, str(adapter), str(tmp_path / "out"), lora_only=True)

    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["gemma3.attention.sliding_window"].contents() == 6
    want = base_plus_adapter_logits(base, adapter)
    np.testing.assert_allclose(llama_cpp_lora_logits(base, path), want, atol=1e-4, rtol=1e-4)


def test_gemma3_llama_cpp_cannot_represent_is_refused(tmp_path, capsys):
    """llama.cpp hard-codes the layer pattern (6) and query scale; other values are refused."""
    model_dir = write_tiny_model_dir(tmp_path / "base", "gemma3_text")  # pattern 2, scalar 20
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    with pytest.raises(UserError, match="sliding_window_pattern = 2: llama.cpp's gemma3"):
        export(str(model_dir), str(adapter), str(tmp_path / "out"), lora_only=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@requires_gemma
def test_real_gemma3_exports_both_ways(tmp_path):
    """Gemma 3 270M (Q4_K_M, --model gemma3-270m): the adapter GGUF carries the base file's own
    gemma3.* values and, applied as llama.cpp does it, gives base + adapter; the merged Q8_0
    file keeps the base's tokenizer keys and reloads close to base + adapter."""
    from mlx_edgelora.gguf import read_gguf
    from mlx_edgelora.loading import GEMMA3_270M, gemma3_270m_path

    adapter = make_adapter(GEMMA3_270M, tmp_path / "adapter")
    path = export(None, str(adapter), str(tmp_path / "lora"), lora_only=True)
    ours = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    _, base, _ = read_gguf(gemma3_270m_path())
    shared = [k for k in ours if k.startswith("gemma3.") and k in base]
    assert len(shared) >= 10  # all but rope.dimension_count and rope.freq_base_swa
    for key in shared:
        assert ours[key] == pytest.approx(base[key]), key
    assert ours["gemma3.attention.sliding_window"] == 512
    assert len(gguf.GGUFReader(path).tensors) == 18 * 7 * 2  # lora_a, lora_b of 7 per block
    # each projection's update as llama.cpp forms it (alpha / rank * B A) is mlx-lm's
    # (scale * A B)^T; logits are compared on the tiny models (a 270M model's bfloat16
    # activations blur a dense-vs-quantized comparison)
    lora = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}
    trained = mx.load(str(adapter / "adapters.safetensors"))
    for name in {n.rsplit(".", 1)[0] for n in lora}:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        key = _mlx_name(name, "gemma3", "x").removesuffix("weight")
        ours_a, ours_b = (np.array(trained[key + k]) for k in ("lora_a", "lora_b"))
        update = (2.0 * ours_a @ ours_b).T  # make_adapter's scale 2.0
        got = ours["adapter.lora.alpha"] / b.shape[1] * b @ a
        np.testing.assert_allclose(got, update, atol=1e-6)
    text = (path.parent / "Modelfile").read_text()
    assert "<start_of_turn>user" in text and 'PARAMETER stop "<end_of_turn>"' in text

    merged = export(None, str(adapter), str(tmp_path / "merged"), "q8_0")
    _, meta, _ = read_gguf(str(merged))
    for key in [k for k in base if k.startswith("tokenizer.")]:
        assert np.array_equal(meta[key], base[key]), key
    # the merged layers are Q8_0 (symmetric 8-bit): the bound of the tiny Gemma Q8_0 test
    ref = load_model(GEMMA3_270M)  # one load for both references
    load_adapters(ref.model, adapter)
    want = np.array(ref.model(mx.array([PROMPT])))
    fuse_lora(ref.model, dequantize=True)
    nn.quantize(ref.model, group_size=32, bits=8)
    mlx_err = np.abs(np.array(ref.model(mx.array([PROMPT]))) - want).max()
    got = logits(merged)
    print(f"merged Q8_0 error {np.abs(got - want).max():.3f}, MLX 8-bit {mlx_err:.3f}")
    assert np.abs(got - want).max() < 2 * mlx_err


@pytest.mark.parametrize("qtype", ["q4_1", "f16"])
def test_export_merges_tensor_by_tensor_into_the_same_file(tmp_path, qtype):
    """export loads lazily and writes each tensor (read, merged, converted) before the next:
    the same GGUF bytes as from the resident model, with a peak far under the model's bytes
    (16 blocks; the resident path holds them all, so the measure tells them apart)."""
    from mlx.utils import tree_flatten

    from mlx_edgelora.fuse import fuse_lora
    from mlx_edgelora.lora import load_adapters

    shape = dict(num_hidden_layers=16, hidden_size=256, intermediate_size=1024)
    model_dir = write_tiny_model_dir(tmp_path / "base", "llama", quantize_bits=4, **shape)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    loaded = load_model(str(model_dir))
    total = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    load_adapters(loaded.model, adapter)
    fuse_lora(loaded.model, dequantize=True, rest=False)
    reference = write_model(loaded, tmp_path / "ref.gguf", qtype)
    del loaded
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), qtype)
    peak = mx.get_peak_memory() - base
    assert path.read_bytes() == reference.read_bytes()
    assert peak < total / 3, (peak, total)
