"""GGUF file -> mlx-lm weights, mlx-lm config dict and tokenizer.

Why: the embedded default model (SmolLM2-135M-Instruct Q4_1) and many community models ship
as llama.cpp GGUF files. `mx.load` reads the tensors: Q4_0/Q4_1/Q8_0 come back as MLX affine
triplets (weight/scales/biases, group size 32), so the frozen base stays quantized (paper:
quantized base weights, FP32 compute); F16/BF16/Q2_K/Q4_K/Q6_K come back dequantized to
float16; other types (Q5_*, Q3_K, IQ*) MLX cannot read. Here we rename tensors to mlx-lm's
names, undo llama.cpp's rotary row permutation of Q/K (llama arch only: its converter does not
permute qwen2), build the config, and rebuild the tokenizer from the metadata with
`tokenizers` (transformers' own GGUF reader needs torch).
"""

from __future__ import annotations

import warnings
from collections import Counter
from functools import partial

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from .errors import UserError
from .gguf_header import read_header

ARCHITECTURES = ("llama", "qwen2")
GROUP_SIZE = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4  # llama.cpp token types
_FLOAT_FILE_TYPES = (0, 1, 32)  # general.file_type of all-F32, mostly-F16, mostly-BF16 files

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def load_gguf(
    path: str, will_quantize: bool = False
) -> tuple[dict[str, mx.array], dict, TokenizerWrapper]:
    """Read a llama/qwen2 GGUF: (weights in mlx-lm names, mlx-lm config, tokenizer).

    `will_quantize`: the caller quantizes float weights itself (--quantize), so a K-quant
    file that MLX dequantized needs no warning.
    """
    raw, meta = _read(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{path}: architecture '{arch}' is not supported; use a Llama or Qwen2 GGUF"
        )
    config = model_config(meta, raw, path)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    weights = {}
    for name, w in raw.items():
        if name == "rope_freqs.weight":  # llama3 rope factors, folded into the config
            continue
        key = _mlx_name(name, path)
        proj = key.split(".")[-2]
        if arch == "llama" and proj in heads:  # llama.cpp stores Q/K rows rotary-interleaved
            w = unpermute_rows(w, heads[proj])
        weights[key] = w
    config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in weights
    if quantization := quantization_config(weights):
        config["quantization"] = quantization
    elif not will_quantize and _meta(meta, "general.file_type", 0) not in _FLOAT_FILE_TYPES:
        warnings.warn(
            f"{path}: MLX dequantized this file's K-quant tensors to float (only Q4_0, Q4_1 "
            "and Q8_0 stay quantized); pass --quantize 4 to keep the base small",
            stacklevel=2,
        )
    return weights, config, build_tokenizer(meta, path)


def _read(path: str) -> tuple[dict, dict]:
    read_header(path)  # MLX's reader crashes (SIGSEGV) on a malformed header: check it first
    try:
        return mx.load(path, format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        if "gguf_tensor_to_f16" in str(e):
            raise UserError(
                f"{path}: holds a tensor type MLX cannot read (e.g. Q5_K, Q3_K, IQ*); use a "
                "Q4_0, Q4_1, Q8_0 or F16 GGUF, or an mlx-lm model folder"
            ) from None
        raise UserError(f"{path}: not a readable GGUF file ({e}); re-download it") from None


def _mlx_name(name: str, path: str) -> str:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales'."""
    module, _, suffix = name.rpartition(".")
    target = _TOP.get(module)
    if module.startswith("blk."):
        _, index, part = module.split(".", 2)
        target = _BLOCK.get(part) and f"model.layers.{index}.{_BLOCK[part]}"
    if target is None:
        raise UserError(f"{path}: unexpected tensor '{name}'; only plain Llama/Qwen2 GGUFs load")
    return f"{target}.{suffix}"


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF half-split).

    Rows are output features, so the same permutation applies to quantized weight, scales
    and biases and to a bias vector.
    """
    rows = w.shape[0]
    # [rows, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...] -> [rows, ...]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
    return w.reshape(rows, *w.shape[3:])


def _meta(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def model_config(meta: dict, raw: dict, path: str) -> dict:
    """The mlx-lm config.json dict for this GGUF's hyper-parameters."""
    arch = meta["general.architecture"]

    def get(key: str, default=None):
        value = _meta(meta, f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{path}: GGUF metadata lacks '{arch}.{key}'; re-convert the model")
        return value

    heads = get("attention.head_count")
    config = {
        "model_type": arch,
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": raw["token_embd.weight"].shape[0] if "token_embd.weight" in raw else 0,
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in raw,
        "rope_scaling": _rope_scaling(meta, raw, arch, path),
    }
    if arch == "llama" and (head_dim := _meta(meta, f"{arch}.attention.key_length")):
        config["head_dim"] = head_dim
    return config


def _rope_scaling(meta: dict, raw: dict, arch: str, path: str) -> dict | None:
    if "rope_freqs.weight" in raw:
        return _llama3_scaling(raw["rope_freqs.weight"], meta, arch, path)
    kind = _meta(meta, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(_meta(meta, f"{arch}.rope.scaling.factor"))}
    raise UserError(f"{path}: rope scaling '{kind}' is not supported; use the mlx-lm model")


def _llama3_scaling(factors: mx.array, meta: dict, arch: str, path: str) -> dict:
    """Recover Llama 3.x rope_scaling from llama.cpp's precomputed per-frequency factors.

    All Llama 3.x use low/high frequency factors 1 and 4 and an 8192-token original context;
    only `factor` varies (8 or 32), so it is read off and the whole curve re-checked.
    """
    got = np.array(factors.astype(mx.float32))
    old, low, high = 8192, 1.0, 4.0
    scaling = {
        "rope_type": "llama3",
        "factor": float(got.max()),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old,
    }
    base = float(_meta(meta, f"{arch}.rope.freq_base", 10000.0))
    dims = 2 * got.size  # one factor per rotary pair
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    smooth = (old / wavelen - low) / (high - low)
    want = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    want = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, got.max(), want))
    if not np.allclose(want, got, rtol=1e-3):
        raise UserError(f"{path}: unrecognised rope_freqs (not Llama 3 scaling); use mlx-lm")
    return scaling


def quantization_config(weights: dict) -> dict | None:
    """mlx-lm's `quantization` entry: the most common bit width, plus per-layer overrides."""
    bits = {
        name.removesuffix(".scales"): weights[name.replace(".scales", ".weight")].shape[-1]
        // w.shape[-1]  # uint32 words per 32-weight group = bits per weight
        for name, w in weights.items()
        if name.endswith(".scales")
    }
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    config: dict = {"group_size": GROUP_SIZE, "bits": default}
    config.update(
        {m: {"group_size": GROUP_SIZE, "bits": b} for m, b in bits.items() if b != default}
    )
    return config


# --- tokenizer --------------------------------------------------------------------------

_SPLITS = {  # llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`
    "llama3": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?"
    r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?"
    r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_PRE_KINDS = {
    **dict.fromkeys(["llama3", "llama-bpe", "llama-v3", "smaug-bpe"], "llama3"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], "qwen2"),
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell", "command-r"], "digits"),
    **dict.fromkeys(["gpt-2", "gpt2", "default", "mpt", "olmo"], "gpt2"),
}


def _byte_level_pre(name: str, path: str):
    """Pre-tokenizer (and normalizer) matching llama.cpp's `tokenizer.ggml.pre`."""
    kind = _PRE_KINDS.get(name)
    if kind is None:
        warnings.warn(f"{path}: unknown pre-tokenizer '{name}'; using GPT-2's", stacklevel=3)
        kind = "gpt2"
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "digits"))
    if kind == "gpt2":
        return byte_level, None
    if kind == "digits":
        return pre.Sequence([pre.Digits(individual_digits=True), byte_level]), None
    split = pre.Split(Regex(_SPLITS[kind]), behavior="isolated", invert=False)
    return pre.Sequence([split, byte_level]), normalizers.NFC() if kind == "qwen2" else None


def _gpt2_tokenizer(meta: dict, tokens: list[str], path: str) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=_PRE_KINDS.get(pre_name) == "llama3"))
    tok.pre_tokenizer, normalizer = _byte_level_pre(pre_name, path)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple]:
    """BPE merges equivalent to SentencePiece-BPE: merge the pair whose join scores highest."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != 1:  # only normal pieces are merge results
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def _spm_tokenizer(meta: dict, tokens: list[str]) -> Tokenizer:
    scores = _meta(meta, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _meta(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    unk = tokens[_meta(meta, "tokenizer.ggml.unknown_token_id", 0)]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _spm_merges(tokens, scores, types)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(_meta(meta, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _special_ids(meta: dict) -> dict[str, int | None]:
    keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "eot": "eot"}
    return {k: _meta(meta, f"tokenizer.ggml.{v}_token_id") for k, v in keys.items()}


def _add_bos_eos(tok: Tokenizer, meta: dict, tokens: list[str], ids: dict) -> None:
    """Post-processor adding BOS/EOS when the GGUF asks for it (llama.cpp's defaults)."""
    spm = meta.get("tokenizer.ggml.model") == "llama"
    bos = ids["bos"] if _meta(meta, "tokenizer.ggml.add_bos_token", spm) else None
    eos = ids["eos"] if _meta(meta, "tokenizer.ggml.add_eos_token", False) else None
    if bos is None and eos is None:
        return
    first = [tokens[bos]] if bos is not None else []
    last = [tokens[eos]] if eos is not None else []
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(first + ["$A"] + last),
        pair=" ".join(first + ["$A"] + last + first + ["$B:1"] + last),
        special_tokens=[(tokens[i], i) for i in (bos, eos) if i is not None],
    )


def build_tokenizer(meta: dict, path: str = "gguf") -> TokenizerWrapper:
    """An mlx-lm TokenizerWrapper rebuilt from the GGUF tokenizer metadata."""
    from transformers import PreTrainedTokenizerFast

    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise UserError(f"{path}: tokenizer '{kind}' is not supported (need gpt2 BPE or llama SPM)")
    tok = _gpt2_tokenizer(meta, tokens, path) if kind == "gpt2" else _spm_tokenizer(meta, tokens)
    types = _meta(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]  # matched whole, not special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    ids = _special_ids(meta)
    _add_bos_eos(tok, meta, tokens, ids)
    names = {f"{k}_token": tokens[i] for k, i in ids.items() if i is not None and k != "eot"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = meta.get("tokenizer.chat_template")
    if kind == "gpt2":
        detokenizer = BPEStreamingDetokenizer
    else:
        prefix = bool(_meta(meta, "tokenizer.ggml.add_space_prefix", True))
        detokenizer = partial(SPMStreamingDetokenizer, trim_space=prefix)
    eos = [i for i in (ids["eos"], ids["eot"]) if i is not None]
    return TokenizerWrapper(fast, detokenizer, eos_token_ids=eos)
