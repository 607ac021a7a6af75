"""gguf_vocab.py: a SentencePiece tokenizer from a model folder -> GGUF "llama" tokenizer keys,
which our GGUF loader turns back into a tokenizer encoding the same ids.

The SentencePiece model is trained here on the README (BPE with byte fallback, as Llama 2,
Mistral and Gemma use), with and without SentencePiece's dummy space prefix (Gemma: without).
"""

import json
import shutil

import gguf
import numpy as np
import pytest
from conftest import write_tiny_model_dir
from test_fuse import make_adapter

from mlx_edgelora import UserError
from mlx_edgelora.export import export
from mlx_edgelora.gguf_tokenizer import GEMMA_TEMPLATE
from mlx_edgelora.loading import load_model

SAMPLES = [
    "Hello there, friend! Export the adapter 3 times.",
    "  leading spaces, trailing ones  ",
    "ünïcödé 日本語 and emoji 🙂 fall back to bytes",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<|tool|> is an added special token; 12345 digits",
]
VOCAB = 640  # embedding rows: 600 pieces + 1 added token + 39 padding rows


def spm_model_dir(path, tmp_path, dummy_prefix: bool):
    """A tiny Llama whose folder holds a SentencePiece tokenizer.model, as Llama 2 / Gemma
    mlx folders do, and a tokenizer_config.json with an added token and a chat template."""
    import sentencepiece as spm

    lines = [line for line in open("README.md").read().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.99,
        add_dummy_prefix=dummy_prefix,
        control_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    folder = write_tiny_model_dir(path, "llama", vocab_size=VOCAB)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        (folder / name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "sp.model", folder / "tokenizer.model")
    tool = {"content": "<|tool|>", "special": True, "lstrip": False, "rstrip": False}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "legacy": False,
        "add_prefix_space": dummy_prefix,
        "added_tokens_decoder": {"600": {**tool, "normalized": False, "single_word": False}},
        "chat_template": GEMMA_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_sentencepiece_folder_exports_as_llama_tokenizer(tmp_path, dummy_prefix):
    model_dir = spm_model_dir(tmp_path / "base", tmp_path, dummy_prefix)
    original = load_model(str(model_dir)).tokenizer
    assert original._tokenizer.name_or_path == str(model_dir)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    path = export(str(model_dir), str(adapter), str(tmp_path / "out"), "f16")

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is dummy_prefix
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(fields["tokenizer.ggml.scores"]) == VOCAB
    # control: Hugging Face lists them as special added tokens, and llama.cpp's converter
    # then marks them control (its added_tokens_decoder pass), <unk> included
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [3, 3, 3]
    assert tokens[600] == "<|tool|>" and types[600] == 3  # the added special token
    assert tokens[-1] == "[PAD39]" and types[-1] == 5
    assert types[tokens.index("<0x41>")] == 6  # byte fallback pieces
    assert fields["tokenizer.chat_template"] == GEMMA_TEMPLATE

    exported = load_model(str(path)).tokenizer  # our GGUF tokenizer loader
    for text in SAMPLES:
        assert exported.encode(text) == original.encode(text), text
    assert exported.decode(original.encode(SAMPLES[2])).endswith(SAMPLES[2])


def test_sentencepiece_tokenizer_json_without_its_model_is_refused(tmp_path):
    model_dir = spm_model_dir(tmp_path / "base", tmp_path, True)
    load_model(str(model_dir)).tokenizer._tokenizer.save_pretrained(str(model_dir))
    (model_dir / "tokenizer.model").unlink()  # a tokenizer.json alone: no scores
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    with pytest.raises(UserError, match="without tokenizer.model; copy the model's"):
        export(str(model_dir), str(adapter), str(tmp_path / "out"), "f16")


def test_copy_tokenizer_keeps_values_and_types_of_a_k_quant_file(tmp_path):
    """The tokenizer keys of a base whose tensors MLX's reader cannot load (Q5_0, as in
    Gemma 3 270M's Q4_K_M file) are copied unchanged, each with its value type."""
    from mlx_edgelora.gguf_vocab import copy_tokenizer

    Q = gguf.GGMLQuantizationType
    src, out = tmp_path / "k.gguf", tmp_path / "copy.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.5])
    w.add_token_types([2, 3, 3, 1])
    w.add_bos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages }}")
    raw = np.zeros(gguf.quant_shape_to_byte_shape((1, 256), Q.Q5_0), np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_dtype=Q.Q5_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    w = gguf.GGUFWriter(str(out), "llama")
    copy_tokenizer(w, str(src))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
    old, new = gguf.GGUFReader(src).fields, gguf.GGUFReader(out).fields
    keys = [k for k in old if k.startswith("tokenizer.")]
    assert len(keys) == 7 and all(new[k].contents() == old[k].contents() for k in keys)
    assert all(new[k].types == old[k].types for k in keys)
