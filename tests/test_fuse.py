"""fuse.py: a fused folder is a plain mlx-lm model that equals base + adapter."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import requires_smollm2, write_tiny_model_dir
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import generate
from mlx_lm.sample_utils import make_sampler

from mlx_edgelora import TrainConfig, UserError
from mlx_edgelora.fuse import fuse, main
from mlx_edgelora.loading import load_model
from mlx_edgelora.lora import apply_lora, load_adapters, save_adapters

PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 98, 101, 101, 115]  # a few byte-level ids


def make_adapter(model_dir, folder, quantize=None, seed: int = 1):
    """An adapter with random, non-zero B (a fresh LoRA is a no-op and would prove nothing)."""
    loaded = load_model(str(model_dir), quantize)
    cfg = TrainConfig(model=str(model_dir), quantize=quantize, rank=4, lora_scale=2.0)
    acfg = apply_lora(loaded.model, cfg)
    mx.random.seed(seed)
    b = [
        (k, 0.05 * mx.random.normal(v.shape))
        for k, v in tree_flatten(loaded.model.trainable_parameters())
        if k.endswith("lora_b")
    ]
    loaded.model.update(tree_unflatten(b))
    save_adapters(loaded.model, folder, acfg)
    return folder


def base_plus_adapter_logits(model_dir, adapter, quantize=None) -> np.ndarray:
    loaded = load_model(str(model_dir), quantize)
    load_adapters(loaded.model, adapter)
    return np.array(loaded.model(mx.array([PROMPT])))


def mlx_lm_load(folder):
    """mlx-lm's own loader (no mlx_edgelora code) and its logits on PROMPT."""
    from mlx_lm import load

    model, tokenizer = load(str(folder))
    return model, tokenizer, np.array(model(mx.array([PROMPT])).astype(mx.float32))


@pytest.mark.parametrize("bits", [None, 4])
def test_dequantized_fuse_equals_base_plus_adapter(tmp_path, arch, bits):
    model_dir = write_tiny_model_dir(tmp_path / "base", arch, quantize_bits=bits)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    folder = fuse(str(model_dir), str(adapter), str(tmp_path / "fused"), dequantize=True)

    assert "quantization" not in json.loads((folder / "config.json").read_text())
    want = base_plus_adapter_logits(model_dir, adapter)
    model, tokenizer, got = mlx_lm_load(folder)
    # float32 throughout; differences are summation order only
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not any(hasattr(m, "scales") for _, m in model.named_modules())

    loaded = load_model(str(model_dir))
    load_adapters(loaded.model, adapter)
    greedy = make_sampler(0.0)
    expected = generate(loaded.model, loaded.tokenizer, PROMPT, max_tokens=8, sampler=greedy)
    assert generate(model, tokenizer, PROMPT, max_tokens=8, sampler=greedy) == expected


def test_requantized_fuse_loads_and_runs(tmp_path, arch):
    model_dir = write_tiny_model_dir(tmp_path / "base", arch, quantize_bits=4)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    folder = fuse(None, str(adapter), str(tmp_path / "fused"))  # base: as the adapter records

    quant = json.loads((folder / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["group_size"] == 32
    model, _, got = mlx_lm_load(folder)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.bits == 4 and "lora_a" not in q_proj
    assert np.isfinite(got).all()
    # lossy (re-quantized), but still the fused model, not something else
    want = base_plus_adapter_logits(model_dir, adapter)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95


def test_float_base_trained_with_quantize_is_fused_on_the_same_quantized_base(tmp_path):
    model_dir = write_tiny_model_dir(tmp_path / "base", "qwen2")  # float base
    adapter = make_adapter(model_dir, tmp_path / "adapter", quantize=4)  # trained --quantize 4
    folder = fuse(None, str(adapter), str(tmp_path / "fused"), dequantize=True)

    _, _, got = mlx_lm_load(folder)
    want = base_plus_adapter_logits(model_dir, adapter, quantize=4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - base_plus_adapter_logits(model_dir, adapter)).max() > 1e-3


def test_non_empty_out_needs_overwrite(tmp_path, capsys):
    model_dir = write_tiny_model_dir(tmp_path / "base", "llama")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    out = tmp_path / "fused"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        fuse(str(model_dir), str(adapter), str(out))
    args = ["--model", str(model_dir), "--adapter", str(adapter), "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").is_file()


@pytest.mark.slow
@requires_smollm2
def test_fuse_gguf_default_gives_an_mlx_lm_folder(tmp_path):
    from mlx_lm import load

    adapter = tmp_path / "adapter"
    loaded = load_model(None)
    save_adapters(loaded.model, adapter, apply_lora(loaded.model, TrainConfig(rank=4)))
    folder = fuse(None, str(adapter), str(tmp_path / "fused"))

    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8  # mixed Q8_0 embedding
    model, tokenizer = load(str(folder))
    assert model.model.embed_tokens.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 4
    text = "Bartholomew the starter needs feeding."
    assert tokenizer.encode(text) == loaded.tokenizer.encode(text)
    assert tokenizer.eos_token_ids == loaded.tokenizer.eos_token_ids
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    logits = model(mx.array([tokenizer.encode(text)]))
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()


DEEP = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=1024)  # many small blocks


@pytest.mark.parametrize("dequantize", [False, True])
def test_fuse_writes_tensor_by_tensor_the_same_shards_as_mlx_lm(tmp_path, dequantize):
    """fuse reads, merges, (re-)quantizes and writes one tensor at a time from a lazy model:
    the same shard and index as mlx-lm's save_model of the eagerly fused model, holding about
    one tensor's merge (float weight, update, sum) where the eager path holds the whole model
    (the measure tells them apart); 16 blocks, so the whole model is far above one merge."""
    from mlx_lm.utils import save_model

    from mlx_edgelora.fuse import fuse_lora

    model_dir = write_tiny_model_dir(
        tmp_path / "base", "llama", quantize_bits=4, **{**DEEP, "num_hidden_layers": 16}
    )
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    peaks = {}
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loaded = load_model(str(model_dir))
    load_adapters(loaded.model, adapter)
    fuse_lora(loaded.model, dequantize)
    save_model(tmp_path / "ref", loaded.model)
    peaks["eager"] = mx.get_peak_memory() - base
    del loaded
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    folder = fuse(str(model_dir), str(adapter), str(tmp_path / "fused"), dequantize=dequantize)
    peaks["streamed"] = mx.get_peak_memory() - base

    want, got = (
        mx.load(str(tmp_path / "ref/model.safetensors")),
        mx.load(str(folder / "model.safetensors")),
    )
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and mx.array_equal(got[k], v), k
    index = "model.safetensors.index.json"
    assert json.loads((folder / index).read_text()) == json.loads(
        (tmp_path / "ref" / index).read_text()
    )
    total = sum(v.nbytes for v in want.values())
    assert peaks["eager"] > 0.9 * total, peaks
    assert peaks["streamed"] < total / 3, (peaks, total)
