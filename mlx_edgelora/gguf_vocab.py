"""The tokenizer.* keys of an exported GGUF: llama.cpp's vocabulary, merges and chat template.

Why apart from gguf_write.py: two sources with different work. From a GGUF base the keys are
copied as they are (exact); from a Hugging Face tokenizer they are rebuilt as llama.cpp's
converter would: byte-level BPE with the pre-tokenizer named by its structure rather than by
llama.cpp's hash of sample encodings, or SentencePiece (Llama 2, Mistral, Gemma) from the
folder's tokenizer.model, as llama.cpp's "llama" tokenizer model.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from .errors import UserError


def copy_tokenizer(w: gguf.GGUFWriter, source: str) -> None:
    """Copy every tokenizer.* key of the base GGUF unchanged (the exact vocabulary), each with
    the value type it has in the file."""
    from .gguf_header import read_header

    header = read_header(source, arrays=True)
    V = gguf.GGUFValueType
    for key, value in header.metadata.items():
        if not key.startswith("tokenizer."):
            continue
        kind, item = header.value_types[key]
        value = value.tolist() if hasattr(value, "tolist") else value
        w.add_key_value(key, value, V(kind), V(item) if item is not None else None)


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a Hugging Face byte-level pre-tokenizer."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    regex = next((s["pattern"].get("Regex", "") for s in steps if s.get("type") == "Split"), "")
    if r"\p{N}{1,3}" in regex:
        return "llama-bpe"
    if r"\p{N}" in regex:
        return "qwen2"
    raise UserError(
        f"pre-tokenizer {kinds} has no llama.cpp equivalent we know; export from the "
        "model's own .gguf (--model file.gguf) instead"
    )


def hf_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """tokenizer.* keys for a Hugging Face tokenizer: byte-level BPE (llama.cpp's gpt2 model)
    or SentencePiece from the folder's tokenizer.model (llama.cpp's llama model)."""
    fast = tokenizer._tokenizer
    spec = json.loads(fast.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        _byte_level_vocab(w, fast, spec)
    else:
        spm_file = Path(fast.name_or_path) / "tokenizer.model"
        if not spm_file.is_file():
            raise UserError(
                f"{fast.name_or_path}: a {model.get('type')} tokenizer without tokenizer.model; "
                "copy the model's tokenizer.model into the folder, or export from the model's "
                "own .gguf (--model file.gguf)"
            )
        _sentencepiece_vocab(w, spm_file, spec, vocab_size)
    _special_keys(w, tokenizer)


def _byte_level_vocab(w: gguf.GGUFWriter, fast, spec: dict) -> None:
    vocab = fast.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        tokens[i] = piece
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    types = [
        (_CONTROL if added[i]["special"] else _USER) if i in added else _NORMAL
        for i in range(len(tokens))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


# llama.cpp's token types (SentencePieceTokenTypes in convert_hf_to_gguf.py)
_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _sentencepiece_vocab(w: gguf.GGUFWriter, path: Path, spec: dict, vocab_size: int) -> None:
    """As convert_hf_to_gguf.py's _create_vocab_sentencepiece: the model's pieces, scores and
    types, then the Hugging Face added tokens (score -1000), padded to the embedding rows."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        kinds = [(sp.IsUnknown, _UNKNOWN), (sp.IsControl, _CONTROL), (sp.IsUnused, _UNUSED)]
        kinds.append((sp.IsByte, _BYTE))
        types.append(next((k for test, k in kinds if test(i)), _NORMAL))
    for t in sorted(spec.get("added_tokens", []), key=lambda t: t["id"]):
        i, text = t["id"], t["content"]
        if i > len(tokens):
            raise UserError(f"{path}: added token {text!r} has id {i} beyond the vocabulary")
        if i == len(tokens):  # beyond the SentencePiece model: appended
            tokens.append(text)
            scores.append(0.0)
            types.append(_NORMAL)
        special = t["special"]
        tokens[i] = text if special else text.replace("\u2581", " ")
        scores[i], types[i] = -1000.0, _CONTROL if special else _USER
    pad = max(vocab_size - len(tokens), 0)  # embedding rows without a token
    tokens += [f"[PAD{k}]" for k in range(1, pad + 1)]
    scores += [-1000.0] * pad
    types += [_UNUSED] * pad
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # SentencePiece's add_dummy_prefix, read off its behaviour (Gemma: off, Llama 2: on)
    w.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("\u2581"))


def _special_keys(w: gguf.GGUFWriter, tokenizer) -> None:
    """bos/eos/unk/pad/eot ids, add_bos/add_eos and the chat template (gguf.SpecialVocab's)."""
    fast = tokenizer._tokenizer
    ids = {"bos": fast.bos_token_id, "eos": fast.eos_token_id, "pad": fast.pad_token_id}
    ids["unk"] = fast.unk_token_id
    for kind, i in ids.items():
        if i is not None:
            w.add_uint32(f"tokenizer.ggml.{kind if kind != 'unk' else 'unknown'}_token_id", i)
    extra = [i for i in sorted(tokenizer.eos_token_ids) if i != fast.eos_token_id]
    if extra:
        w.add_eot_token_id(extra[0])
    probe = fast("a")["input_ids"]
    w.add_add_bos_token(bool(probe) and probe[0] == fast.bos_token_id)
    w.add_add_eos_token(bool(probe) and len(probe) > 1 and probe[-1] == fast.eos_token_id)
    if template := getattr(fast, "chat_template", None):
        w.add_chat_template(template)
