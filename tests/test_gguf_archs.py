"""GGUF architectures qwen3 and gemma3, a K-quant mix, and files whose metadata lies.

Files are written the way llama.cpp's convert_hf_to_gguf.py writes them: qwen3 and gemma3
rows are not permuted; gemma3 norm weights are stored as 1 + w (Gemma's (1 + w) RMSNorm
folded in). mlx-lm's own model classes are the reference.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_tiny_model
from mlx.utils import tree_flatten
from test_gguf import (
    _NAMES,
    gguf_metadata,
    llama_cpp_permute,
    logits_of,
    to_mx_metadata,
    write_gguf,
)
from test_gguf_quants import KIND, random_blocks

from mlx_edgelora.errors import UserError
from mlx_edgelora.loading import load_model

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as reference  # noqa: E402

_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
NAMES = {
    "qwen3": _NAMES | _QK_NORM,
    "gemma3_text": _NAMES
    | _QK_NORM
    | {
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
}
GEMMA3 = dict(  # 6 layers: 5 sliding-window layers and 1 global one, as llama.cpp assumes
    num_hidden_layers=6,
    head_dim=16,
    num_key_value_heads=1,
    sliding_window=4,
    sliding_window_pattern=6,
    rope_local_base_freq=10000.0,
    query_pre_attn_scalar=16,
    rope_theta=1e6,
)


def gguf_name(name: str, arch: str) -> str:
    module, suffix = name.rsplit(".", 1)
    names = NAMES.get(arch, _NAMES)
    if module.startswith("model.layers."):
        _, _, index, part = module.split(".", 3)
        return f"blk.{index}.{names[part]}.{suffix}"
    return f"{names[module]}.{suffix}"


def arch_metadata(cfg: dict, tmp_path) -> dict:
    meta = gguf_metadata(cfg, tmp_path / "tok")
    gguf_arch = "gemma3" if cfg["model_type"] == "gemma3_text" else cfg["model_type"]
    meta = {k.replace(f"{cfg['model_type']}.", f"{gguf_arch}."): v for k, v in meta.items()}
    meta["general.architecture"] = gguf_arch
    meta[f"{gguf_arch}.attention.key_length"] = cfg["head_dim"]
    if gguf_arch == "gemma3":
        meta["gemma3.attention.sliding_window"] = cfg["sliding_window"]
    return meta


def _tiny(arch: str, **extra):
    """A tiny random mlx-lm model of `arch` (built here: conftest's shapes are the engine's)."""
    from mlx_lm.utils import _get_classes

    cfg = dict(model_type=arch, hidden_size=64, num_hidden_layers=4, intermediate_size=128)
    cfg |= dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    cfg |= dict(vocab_size=300, rope_theta=10000.0, max_position_embeddings=4096)
    cfg |= dict(tie_word_embeddings=True, **extra)
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(cfg))
    model.sanitize({})  # Gemma 3 drops its lm_head: the head is tied
    mx.eval(model.parameters())
    return model.eval(), cfg


@pytest.mark.parametrize("arch,extra", [("qwen3", {"head_dim": 16}), ("gemma3_text", GEMMA3)])
def test_float_gguf_round_trips_to_mlx_lm_logits(tmp_path, arch, extra):
    model, cfg = _tiny(arch, **extra)
    tensors = {}
    for name, w in tree_flatten(model.parameters()):
        if arch == "gemma3_text" and name.endswith("norm.weight"):
            w = w + 1  # convert_hf_to_gguf's Gemma norm shift
        tensors[gguf_name(name, arch)] = w
    path = tmp_path / "tiny.gguf"
    mx.save_gguf(str(path), tensors, to_mx_metadata(arch_metadata(cfg, tmp_path)))

    loaded = load_model(str(path))
    assert loaded.config["model_type"] == arch
    for key, value in extra.items():
        assert loaded.config[key] == value, key
    tokens = (5, 17, 42, 99, 250, 7, 3, 64, 8, 9)  # longer than the sliding window
    np.testing.assert_allclose(logits_of(loaded.model, tokens), logits_of(model, tokens), atol=1e-4)


K_MIX = {  # every quantized type once, as a Q4_K_M-like mix would spread them
    "attn_q": "Q4_K",
    "attn_k": "Q5_K",
    "attn_v": "Q6_K",
    "attn_output": "Q5_0",
    "ffn_gate": "Q5_1",
    "ffn_up": "Q3_K",
    "ffn_down": "Q2_K",
    "token_embd": "Q8_0",
    "output": "Q4_1",
}
REQUANT_BITS = {"Q2_K": 4, "Q3_K": 6, "Q6_K": 8}


def test_k_quant_mix_loads_every_type_quantized_and_matches_the_reference(tmp_path):
    """Random blocks of every type in one llama file (Q/K rows permuted, as llama.cpp stores).

    Each loaded weight, as the quantized matmul sees it, equals the `gguf` package's
    dequantization (un-permuted independently here) exactly, or within half a re-quantization
    step for the 16-weight-group types.
    """
    model, cfg = build_tiny_model("llama", hidden_size=256, intermediate_size=512)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    tensors, want = {}, {}
    for i, (name, w) in enumerate(tree_flatten(model.parameters())):
        gname = gguf_name(name, "llama")
        part = gname.split(".")[-2]
        if w.ndim == 1:
            tensors[gname] = (0, np.array(w).tobytes(), w.shape)
            continue
        kind = K_MIX[part]
        blocks = random_blocks(kind, *w.shape, wide=False, seed=i)
        tensors[gname] = (KIND[kind], blocks.tobytes(), w.shape)
        deq = reference(blocks, gguf.GGMLQuantizationType[kind]).reshape(w.shape)
        if part in heads:  # file row r holds HF row perm[r]
            perm = llama_cpp_permute(np.arange(w.shape[0]), heads[part])
            deq = deq[np.argsort(perm)]
        want[name] = (kind, deq)
    path = tmp_path / "mix.gguf"
    write_gguf(path, tensors, gguf_metadata(cfg, tmp_path / "tok"))

    loaded = load_model(str(path))
    modules = dict(loaded.model.named_modules())
    for name, (kind, deq) in want.items():
        m = modules[name.removesuffix(".weight")]
        bits = REQUANT_BITS.get(kind, {"Q8_0": 8, "Q4_K": 4, "Q4_1": 4}.get(kind, 5))
        assert (m.bits, m.group_size) == (bits, 32), name
        eye = mx.eye(deq.shape[1])
        got = np.array(mx.quantized_matmul(eye, m.weight, m.scales, m.biases, True, 32, bits).T)
        if kind in REQUANT_BITS:
            groups = deq.reshape(deq.shape[0], -1, 32)  # [rows, cols] -> [rows, groups, 32]
            half = (groups.max(-1) - groups.min(-1)) / (2 * (2**bits - 1))
            err = np.abs(got - deq).reshape(groups.shape).max(-1)
            assert np.all(err <= half * 1.001 + 1e-6), name
        else:
            np.testing.assert_array_equal(got, deq, err_msg=name)


def test_metadata_that_disagrees_with_a_tensor_names_the_tensor(tmp_path):
    model, cfg = build_tiny_model("qwen2")
    tensors = {gguf_name(n, "qwen2"): w for n, w in tree_flatten(model.parameters())}
    meta = gguf_metadata(cfg, tmp_path / "tok")
    meta["qwen2.feed_forward_length"] = 96  # the tensors say 128
    path = tmp_path / "liar.gguf"
    mx.save_gguf(str(path), tensors, to_mx_metadata(meta))
    with pytest.raises(UserError, match=r"'blk\.\d\.ffn_(gate|up)\.weight' has shape \[128, 64\]"):
        load_model(str(path))


def test_a_layer_the_metadata_promises_but_the_file_lacks_is_named(tmp_path):
    model, cfg = build_tiny_model("qwen2")
    tensors = {gguf_name(n, "qwen2"): w for n, w in tree_flatten(model.parameters())}
    del tensors["blk.3.ffn_up.weight"]
    path = tmp_path / "short.gguf"
    mx.save_gguf(str(path), tensors, to_mx_metadata(gguf_metadata(cfg, tmp_path / "tok")))
    with pytest.raises(UserError, match=r"'blk\.3\.ffn_up\.weight' is missing"):
        load_model(str(path))


def test_gemma_without_a_chat_template_gets_gemmas_and_stops_at_end_of_turn():
    """Gemma GGUFs often omit tokenizer.chat_template (the real 270M file does)."""
    from tokenizers import pre_tokenizers

    from mlx_edgelora.gguf_tokenizer import build_tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
    meta = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([3] * 5 + [1] * (len(tokens) - 5), np.int32),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
    }
    tok = build_tokenizer(meta)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi "},
        {"role": "assistant", "content": "hello"},
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    want = "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"
    assert text == want + "<start_of_turn>model\nhello<end_of_turn>\n"
    assert tok.eos_token_ids == {1, 4}
    meta["general.architecture"] = "llama"  # no guessing outside Gemma
    assert build_tokenizer(meta).chat_template is None


def test_a_tokenizer_larger_than_the_embedding_names_the_tensor(tmp_path):
    model, cfg = build_tiny_model("qwen2", vocab_size=200)  # the tokenizer has 259 tokens
    tensors = {gguf_name(n, "qwen2"): w for n, w in tree_flatten(model.parameters())}
    path = tmp_path / "small-embd.gguf"
    mx.save_gguf(str(path), tensors, to_mx_metadata(gguf_metadata(cfg, tmp_path / "tok")))
    with pytest.raises(UserError, match="'token_embd.weight' has 200 rows but the tokenizer"):
        load_model(str(path))
