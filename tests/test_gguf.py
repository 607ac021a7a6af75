"""GGUF reading: synthetic llama.cpp-style files round-trip to the source model's logits.

The files are written here the way llama.cpp's convert_hf_to_gguf.py writes them (llama Q/K
rows rotary-permuted, qwen2 not), float ones with `mx.save_gguf`, quantized ones (Q8_0 /
Q4_0 / Q4_1 blocks, which mx.save_gguf cannot write) with a small writer below.
"""

import io
import struct

import mlx.core as mx
import numpy as np
import pytest
from conftest import CHAT_TEMPLATE, build_tiny_model, make_tiny_tokenizer
from mlx.utils import tree_flatten

from mlx_edgelora.errors import UserError
from mlx_edgelora.gguf import build_tokenizer, unpermute_rows
from mlx_edgelora.loading import load_model

_NAMES = {  # mlx-lm module -> GGUF tensor (llama.cpp's tensor map), written independently
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
F32, F16, Q4_0, Q4_1, Q5_K, Q8_0 = 0, 1, 2, 3, 13, 8  # ggml tensor types


def gguf_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    module, suffix = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, index, part = module.split(".", 3)
        return f"blk.{index}.{_NAMES[part]}.{suffix}"
    return f"{_NAMES[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute: HF half-split rows -> interleaved rotary pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model, cfg: dict) -> dict[str, np.ndarray]:
    """The model's float tensors under GGUF names, Q/K permuted for llama as llama.cpp does."""
    out = {}
    for name, w in tree_flatten(model.parameters()):
        w = np.array(w)
        if cfg["model_type"] == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, cfg["num_attention_heads"])
        if cfg["model_type"] == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, cfg["num_key_value_heads"])
        out[gguf_name(name)] = w
    return out


def llama3_rope_freqs(scaling: dict, head_dim: int, base: float) -> np.ndarray:
    """convert_hf_to_gguf's `rope_freqs` factors for Llama 3 rope scaling."""
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    out = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def gguf_metadata(cfg: dict, tokenizer_dir) -> dict:
    """llama.cpp metadata keys (plain Python values) for a tiny config and tokenizer."""
    arch, fast = cfg["model_type"], make_tiny_tokenizer(tokenizer_dir)
    vocab = fast.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    return {
        "general.architecture": arch,
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": cfg["num_attention_heads"],
        f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
        f"{arch}.rope.freq_base": cfg["rope_theta"],
        f"{arch}.context_length": cfg["max_position_embeddings"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([3] * 3 + [1] * (len(tokens) - 3), np.int32),
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|endoftext|>"],
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def to_mx_metadata(meta: dict) -> dict:
    """Plain Python metadata -> what mx.save_gguf takes."""
    typed = {int: mx.uint32, float: mx.float32}
    out = {}
    for key, value in meta.items():
        if type(value) in typed:
            value = mx.array(value, dtype=typed[type(value)])
        elif isinstance(value, np.ndarray):
            value = mx.array(value)
        out[key] = value
    return out


def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _value(v) -> bytes:
    """One GGUF metadata value with its type tag."""
    if isinstance(v, str):
        return struct.pack("<I", 8) + _string(v)
    if isinstance(v, bool):
        return struct.pack("<IB", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_string(s) for s in v)
    kind = {np.dtype(np.int32): 5, np.dtype(np.float32): 6}[v.dtype]
    return struct.pack("<IIQ", 9, kind, v.size) + v.tobytes()


def write_gguf(path, tensors: dict[str, tuple[int, bytes, tuple]], meta: dict) -> None:
    """A GGUF v3 file: tensors = name -> (ggml type, raw block bytes, shape in MLX order)."""
    head = io.BytesIO()
    head.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for key, value in meta.items():
        head.write(_string(key) + _value(value))
    data, offset = io.BytesIO(), 0
    for name, (kind, raw, shape) in tensors.items():
        dims = b"".join(struct.pack("<Q", d) for d in reversed(shape))  # ggml: innermost first
        head.write(_string(name) + struct.pack("<I", len(shape)) + dims)
        head.write(struct.pack("<IQ", kind, offset))
        padded = raw + b"\0" * (-len(raw) % 32)
        data.write(padded)
        offset += len(padded)
    head.write(b"\0" * (-head.tell() % 32))  # data section starts aligned
    path.write_bytes(head.getvalue() + data.getvalue())


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_block(w: np.ndarray, kind: int) -> tuple[bytes, np.ndarray]:
    """(llama.cpp block bytes, dequantized values) for Q8_0 / Q4_0 / Q4_1 or F16."""
    if kind == F16:
        return w.astype(np.float16).tobytes(), w.astype(np.float16).astype(np.float32)
    b = w.reshape(-1, 32)  # one row per 32-weight block
    if kind == Q8_0:
        d = (np.abs(b).max(1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        q = np.round(b / d).clip(-127, 127).astype(np.int8)
        raw = np.concatenate([_fp16_bytes(d), q.view(np.uint8)], 1)
        return raw.tobytes(), (q * d).reshape(w.shape)
    if kind == Q4_0:
        peak = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
        d = (peak / -8).astype(np.float16).astype(np.float32)
        q = np.round(b / d + 8).clip(0, 15).astype(np.uint8)
        packed = q[:, :16] | (q[:, 16:] << 4)  # low nibbles: first 16 weights
        raw = np.concatenate([_fp16_bytes(d), packed], 1)
        return raw.tobytes(), ((q.astype(np.float32) - 8) * d).reshape(w.shape)
    lo = b.min(1, keepdims=True).astype(np.float16).astype(np.float32)
    d = ((b.max(1, keepdims=True) - lo) / 15).astype(np.float16).astype(np.float32)
    q = np.round((b - lo) / d).clip(0, 15).astype(np.uint8)
    raw = np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), q[:, :16] | (q[:, 16:] << 4)], 1)
    return raw.tobytes(), (q * d + lo).reshape(w.shape)


def logits_of(model, tokens=(5, 17, 42, 99, 250, 7, 3, 64)) -> mx.array:
    out = model(mx.array([list(tokens)]))
    mx.eval(out)
    return out


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for shape in [(4 * 16, 24), (4 * 16,)]:  # weight rows and a bias vector
        w = rng.standard_normal(shape).astype(np.float32)
        back = unpermute_rows(mx.array(llama_cpp_permute(w, 4)), 4)
        np.testing.assert_array_equal(np.array(back), w)


@pytest.mark.parametrize(
    "arch,rope",
    [("llama", None), ("llama", LLAMA3_ROPE), ("qwen2", None)],
    ids=["llama", "llama-rope-llama3", "qwen2"],
)
def test_float_gguf_round_trips_to_source_logits(tmp_path, arch, rope):
    model, cfg = build_tiny_model(arch, rope_scaling=rope)
    tensors = gguf_tensors(model, cfg)
    if rope:
        tensors["rope_freqs.weight"] = llama3_rope_freqs(rope, 16, cfg["rope_theta"])
    path = tmp_path / "tiny.gguf"
    meta = to_mx_metadata(gguf_metadata(cfg, tmp_path / "tok"))
    mx.save_gguf(str(path), {k: mx.array(v) for k, v in tensors.items()}, meta)

    loaded = load_model(str(path))
    assert loaded.kind == "gguf" and loaded.config["rope_scaling"] == rope
    assert loaded.config["tie_word_embeddings"] == cfg["tie_word_embeddings"]
    assert "quantization" not in loaded.config
    np.testing.assert_allclose(logits_of(loaded.model), logits_of(model), atol=1e-4)
    reference = make_tiny_tokenizer(tmp_path / "ref")
    text = "<|im_start|>user\nhi there<|im_end|>"
    assert loaded.tokenizer.encode(text) == reference.encode(text)
    assert loaded.tokenizer.eos_token_id == reference.convert_tokens_to_ids("<|im_end|>")


def test_quantized_gguf_keeps_blocks_quantized_and_matches_dequantized_source(tmp_path):
    """Q8_0 embedding, Q4_0/Q4_1 linears, F16 head: the SmolLM2 mix plus the other types."""
    model, cfg = build_tiny_model("llama")
    kinds = {"token_embd": Q8_0, "output": F16, "attn_k": Q4_0, "ffn_down": Q4_0}
    file_order = gguf_tensors(model, cfg)  # Q/K rows permuted as llama.cpp stores them
    tensors, reference = {}, []
    for name, w in tree_flatten(model.parameters()):
        gname = gguf_name(name)
        kind = F32 if w.ndim == 1 else kinds.get(gname.split(".")[-2], Q4_1)
        if kind == F32:
            tensors[gname], deq = (F32, file_order[gname].tobytes(), w.shape), np.array(w)
        else:  # blocks run along rows, so quantizing commutes with the row permutation
            tensors[gname] = (kind, quantize_block(file_order[gname], kind)[0], w.shape)
            deq = quantize_block(np.array(w), kind)[1]
        reference.append((name, mx.array(deq)))
    path = tmp_path / "tiny-q.gguf"
    write_gguf(path, tensors, gguf_metadata(cfg, tmp_path / "tok"))

    loaded = load_model(str(path))
    layer = loaded.model.model.layers[0]
    assert (layer.self_attn.q_proj.bits, layer.self_attn.k_proj.group_size) == (4, 32)
    assert loaded.model.model.embed_tokens.bits == 8
    assert loaded.model.lm_head.weight.dtype == mx.float32  # F16 -> float, then FP32
    assert loaded.config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    model.load_weights(reference)  # the source model holding the dequantized values
    # Same values, different arithmetic: the quantized embedding returns float16 rows (its
    # scales' dtype); measured max |diff| 1.2e-3 on logits of size ~1.7.
    np.testing.assert_allclose(logits_of(loaded.model), logits_of(model), atol=5e-3)


def _gpt2_meta(pre: str) -> dict:
    from tokenizers import pre_tokenizers

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe", "12", "123"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "1 2", "12 3"],
        "tokenizer.ggml.token_type": mx.array([3, 3, 3] + [1] * (len(tokens) - 3)),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
    }


def test_gpt2_tokenizer_matches_a_reference_byte_level_bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers

    meta = _gpt2_meta("gpt-2")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ref = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = build_tokenizer(meta)
    for text in ["the theme", "Hello  wörld 123!\n\nx", "a<|im_start|>b<|im_end|>"]:
        ids = tok.encode(text)
        if "<|" not in text:
            assert ids == ref.encode(text).ids
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [1] and tok.eos_token_ids == {2}
    assert tok.decode(tok.encode("a<|im_end|>"), skip_special_tokens=True) == "a"


@pytest.mark.parametrize("pre,pieces", [("gpt-2", 1), ("smollm", 3), ("qwen2", 3)])
def test_pre_tokenizer_follows_ggml_pre(pre, pieces):
    """'smollm' and 'qwen2' split digits one by one before BPE; GPT-2 keeps '123' whole."""
    assert len(build_tokenizer(_gpt2_meta(pre)).encode("123")) == pieces


def _train_sentencepiece():
    spm = pytest.importorskip("sentencepiece")
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, tiny corpus."] * 50
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=proto,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def test_sentencepiece_tokenizer_matches_sentencepiece():
    sp = _train_sentencepiece()
    n = sp.get_piece_size()
    kinds = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        for i in range(n)
    ]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": mx.array([sp.get_score(i) for i in range(n)]),
        "tokenizer.ggml.token_type": mx.array(kinds, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(sp.bos_id(), dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(sp.eos_id(), dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(sp.unk_id(), dtype=mx.uint32),
    }
    tok = build_tokenizer(meta)
    for text in ["The quick fox", "Hello wörld ✓  lazy dogs", "over the lazy dog."]:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text)  # add_bos_token defaults on for SPM
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_unsupported_architecture_is_a_user_error(tmp_path):
    path = tmp_path / "gemma.gguf"
    mx.save_gguf(
        str(path), {"token_embd.weight": mx.zeros((4, 32))}, {"general.architecture": "gemma"}
    )
    with pytest.raises(UserError, match="'gemma' is not supported.*gemma3, llama, qwen2, qwen3"):
        load_model(str(path))


def test_unsupported_tensor_type_names_it_and_lists_the_supported(tmp_path):
    path = tmp_path / "iq2.gguf"
    iq2_xxs = 16
    write_gguf(
        path,
        {"token_embd.weight": (iq2_xxs, bytes(66), (1, 256))},
        {"general.architecture": "llama"},
    )
    with pytest.raises(UserError, match="token_embd.weight.*IQ2_XXS.*Q4_K.*Q6_K"):
        load_model(str(path))


@pytest.mark.parametrize("content", [b"not a gguf at all" * 10, b"GGUF" + bytes(40)])
def test_corrupt_gguf_is_a_user_error(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(UserError, match="broken.gguf"):
        load_model(str(path))


def test_truncated_gguf_is_a_user_error(tmp_path):
    model, cfg = build_tiny_model("qwen2")
    path = tmp_path / "cut.gguf"
    tensors = {k: mx.array(v) for k, v in gguf_tensors(model, cfg).items()}
    mx.save_gguf(str(path), tensors, to_mx_metadata(gguf_metadata(cfg, tmp_path / "tok")))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="cut.gguf"):
        load_model(str(path))


def test_lazy_gguf_load_holds_one_block_and_equals_the_eager_load(tmp_path, monkeypatch):
    """load_model(lazy=True) converts a GGUF one unit at a time into unlinked temp files:
    streaming then offloads it holding about one block (the eager load holds every tensor,
    so the measure tells them apart), and every tensor equals the eager load's, bit for bit."""
    import tempfile

    from mlx_edgelora.stream import WeightStream

    shape = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=1024)
    model, cfg = build_tiny_model("llama", **shape)
    tensors = {}
    for gname, w in gguf_tensors(model, cfg).items():
        kind = F32 if w.ndim == 1 else (Q8_0 if gname.startswith("token_embd") else Q4_1)
        raw = w.tobytes() if kind == F32 else quantize_block(w, kind)[0]
        tensors[gname] = (kind, raw, w.shape)
    path = tmp_path / "deep.gguf"
    write_gguf(path, tensors, gguf_metadata(cfg, tmp_path / "tok"))
    del model
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    peaks, params = {}, {}
    for lazy in (True, False):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loaded = load_model(str(path), lazy=lazy)
        stream = WeightStream(loaded.model, str(tmp_path))
        stream.offload(head=True)
        peaks[lazy] = mx.get_peak_memory() - base
        stream.restore()
        stream.close()
        params[lazy] = dict(tree_flatten(loaded.model.parameters()))
        del loaded
    total = sum(v.nbytes for v in params[False].values())
    block = sum(v.nbytes for k, v in params[False].items() if k.startswith("model.layers.0."))
    assert peaks[False] > 0.9 * total
    assert peaks[True] < 2 * block < total / 3
    assert params[True].keys() == params[False].keys()
    for k, v in params[True].items():
        assert v.dtype == params[False][k].dtype and mx.array_equal(v, params[False][k]), k
    assert list(scratch.iterdir()) == []  # the converted files are gone


def test_lazy_gguf_load_on_a_full_disk_is_refused_up_front(tmp_path, monkeypatch):
    """The per-unit files need the model's bytes in $TMPDIR: refused before any is written."""
    import shutil
    import tempfile

    model, cfg = build_tiny_model("llama")
    tensors = {
        k: (F32, w.astype(np.float32).tobytes(), w.shape)
        for k, w in gguf_tensors(model, cfg).items()
    }
    path = tmp_path / "m.gguf"
    write_gguf(path, tensors, gguf_metadata(cfg, tmp_path / "tok"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(UserError, match="TMPDIR") as err:
        load_model(str(path), lazy=True)
    assert "\n" not in str(err.value)
    assert list(scratch.iterdir()) == []
