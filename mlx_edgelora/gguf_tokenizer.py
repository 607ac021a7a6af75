"""GGUF tokenizer metadata -> mlx-lm TokenizerWrapper (BPE or SentencePiece) + chat template.

Why rebuild it: transformers' own GGUF reader needs torch. llama.cpp stores the vocabulary,
merges or scores, token types and the chat template; `tokenizers` rebuilds a fast tokenizer
from them (byte-level BPE for gpt2-style files, SentencePiece-BPE with byte fallback for
llama/gemma-style ones).
"""

from __future__ import annotations

import warnings
from functools import partial

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from .errors import UserError

_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4  # llama.cpp token types


def meta_value(meta: dict, key: str, default=None):
    """A metadata value as plain Python (numeric arrays come as numpy or mx arrays)."""
    value = meta.get(key, default)
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


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
    scores = meta_value(meta, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta_value(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    unk = tokens[meta_value(meta, "tokenizer.ggml.unknown_token_id", 0)]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _spm_merges(tokens, scores, types)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta_value(meta, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _special_ids(meta: dict) -> dict[str, int | None]:
    keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "eot": "eot"}
    return {k: meta_value(meta, f"tokenizer.ggml.{v}_token_id") for k, v in keys.items()}


def _add_bos_eos(tok: Tokenizer, meta: dict, tokens: list[str], ids: dict) -> None:
    """Post-processor adding BOS/EOS when the GGUF asks for it (llama.cpp's defaults)."""
    spm = meta.get("tokenizer.ggml.model") == "llama"
    bos = ids["bos"] if meta_value(meta, "tokenizer.ggml.add_bos_token", spm) else None
    eos = ids["eos"] if meta_value(meta, "tokenizer.ggml.add_eos_token", False) else None
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
    types = meta_value(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]  # matched whole, not special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    ids = _special_ids(meta)
    _add_bos_eos(tok, meta, tokens, ids)
    names = {f"{k}_token": tokens[i] for k, i in ids.items() if i is not None and k != "eot"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = meta.get("tokenizer.chat_template") or _default_template(meta, tokens)
    if kind == "gpt2":
        detokenizer = BPEStreamingDetokenizer
    else:
        prefix = bool(meta_value(meta, "tokenizer.ggml.add_space_prefix", True))
        detokenizer = partial(SPMStreamingDetokenizer, trim_space=prefix)
    eot = ids["eot"] if ids["eot"] is not None else _end_of_turn(tokens, types)
    eos = [i for i in (ids["eos"], eot) if i is not None]
    return TokenizerWrapper(fast, detokenizer, eos_token_ids=eos)


# Gemma's chat format (the text part of Gemma 3's Hugging Face template): GGUF conversions of
# Gemma often omit `tokenizer.chat_template`, and llama.cpp then falls back to this format too.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")  # llama.cpp's EOT guesses


def _default_template(meta: dict, tokens: list[str]) -> str | None:
    arch = meta.get("general.architecture", "")
    return GEMMA_TEMPLATE if arch.startswith("gemma") and "<start_of_turn>" in tokens else None


def _end_of_turn(tokens: list[str], types: list[int]) -> int | None:
    """The control token that ends a chat turn, when the file names none (as llama.cpp does)."""
    index = {t: i for i, t in enumerate(tokens) if types[i] in (_CONTROL, _USER_DEFINED)}
    return next((index[t] for t in _END_OF_TURN if t in index), None)
