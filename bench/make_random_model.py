"""Random-weight INT4 mlx-lm model folders of public shapes, as mlx-community ships them.

Why: the trainer row (bench/trainer_rows.py) runs `python -m mlx_edgelora.train` itself, which
takes a --model folder, on full-depth 3B shapes we cannot download here. Each folder is what
`mlx_lm.convert -q` writes for a bf16 model: 4-bit weights with group size 64, bf16 scales,
biases and norms, `config.json` with "quantization", `model*.safetensors`, and a tokenizer
(SmolLM2's, from the embedded GGUF: its ids fit every vocabulary here). Peak memory does not
depend on the weight values. Built block by block (one block's float weights at a time),
cached in bench/.models/<shape> (git-ignored); a finished folder is reused.

    python bench/make_random_model.py llama3b qwen0.5b      # prints each folder
    python bench/make_random_model.py llama3b:4             # 4 blocks only (reduced depth)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)
import mlx.core as mx
import mlx.nn as nn

# isort: on
from cells import SHAPES  # noqa: E402

CACHE = Path(__file__).parent / ".models"
EXTRA_SHAPES = {
    "qwen0.5b": dict(  # Qwen2.5-0.5B
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
}
EXTRA_SHAPES["llama1b"] = dict(  # Llama-3.2-1B
    model_type="llama",
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
)
ALL_SHAPES = {**SHAPES, **EXTRA_SHAPES}
QUANT = {"group_size": 64, "bits": 4}


def _bf16(module: nn.Module) -> None:
    """Float parameters other than the packed weights to bf16 (scales, biases, norms)."""
    from mlx.utils import tree_flatten, tree_unflatten

    cast = [
        (k, v.astype(mx.bfloat16))
        for k, v in tree_flatten(module.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    ]
    module.update(tree_unflatten(cast))


def build(
    shape: str, layers: int | None = None, cache: Path = CACHE, quantize: bool = True
) -> Path:
    """The folder of `shape` (with only `layers` blocks if given), built if missing;
    `quantize=False`: every weight bf16 (what `--quantize` at load starts from), "-bf16"."""
    from mlx_lm.utils import _get_classes, save_config, save_model

    folder = cache / ((f"{shape}-L{layers}" if layers else shape) + ("" if quantize else "-bf16"))
    if (folder / "config.json").is_file():
        return folder
    cfg = dict(ALL_SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(cfg))
    emb = model.model.embed_tokens
    # uniform, not mlx-lm's normal init: mx.random.normal takes ~30 s for 394M values here
    emb.weight = mx.random.uniform(-0.05, 0.05, emb.weight.shape)
    for layer in model.model.layers:  # one block's float weights at a time
        mx.eval(layer.parameters())
        if quantize:
            nn.quantize(layer, **QUANT)
        _bf16(layer)
        mx.eval(layer.parameters())
    if quantize:
        nn.quantize(model, **QUANT, class_predicate=lambda _, m: isinstance(m, nn.Embedding))
    _bf16(model.model.embed_tokens)
    _bf16(model.model.norm)
    mx.eval(model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(tmp, model)
    quant = {"quantization": QUANT} if quantize else {}
    save_config({**cfg, **quant, "torch_dtype": "bfloat16"}, tmp / "config.json")
    _save_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def _save_tokenizer(folder: Path) -> None:
    from mlx_edgelora import load_model

    loaded = load_model(None)
    loaded.tokenizer._tokenizer.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = loaded.tokenizer.eos_token_id
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


if __name__ == "__main__":
    for name in sys.argv[1:] or ["qwen0.5b"]:
        shape, _, layers = name.partition(":")
        print(build(shape, int(layers) if layers else None))
