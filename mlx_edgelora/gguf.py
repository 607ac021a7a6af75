"""GGUF file -> mlx-lm weights, mlx-lm config dict and tokenizer.

Why: the embedded default model (SmolLM2-135M-Instruct Q4_1) and most community models ship
as llama.cpp GGUF files. gguf_header.py reads and checks the header (never trusting a length),
each tensor's bytes are read on their own (a memory map's touched pages would stay in the
process's resident memory), gguf_quants.py turns each tensor into MLX arrays (quantized blocks
stay quantized: paper technique 1), gguf_tokenizer.py rebuilds the tokenizer. With weight
streaming the tensors are converted one block at a time and handed over lazily
(`load_gguf(lazy_dir=...)`), so the whole model is never resident. Here: tensor names ->
mlx-lm names and the norm shift, both from the model family's GGUF hooks (models/), llama.cpp's
Q/K row permutation undone (where the family says its converter permutes: llama only), the
mlx-lm config from the metadata, and the check that
the tensors fit the model the metadata describes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import models
from .errors import UserError
from .files import require_free_space
from .gguf_header import GGML_TYPES, read_header
from .gguf_quants import GROUP, TYPES, convert
from .gguf_tokenizer import build_tokenizer, meta_value

FAMILIES = {f.gguf_arch: f for f in models.FAMILIES.values() if f.gguf_arch}
ARCHITECTURES = tuple(sorted(FAMILIES))
GROUP_SIZE = GROUP

ROPE_FREQS = "rope_freqs.weight"  # llama3 rope factors: folded into the config, not a weight
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class TensorInfo:
    kind: int  # ggml type id
    shape: tuple[int, ...]  # MLX order: outermost first (GGUF stores innermost first)
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_gguf(path: str) -> tuple[np.ndarray, dict, dict[str, TensorInfo]]:
    """(the file as a read-only uint8 memory map, metadata, tensor table), header checked."""
    metadata, infos = _table(path)
    return np.memmap(path, dtype=np.uint8, mode="r"), metadata, infos


def _table(path: str) -> tuple[dict, dict[str, TensorInfo]]:
    header = read_header(path, arrays=True)
    infos = {
        t.name: TensorInfo(t.type_id, t.dims[::-1], header.data_offset + t.offset, t.nbytes)
        for t in header.tensors
    }
    return header.metadata, infos


@dataclass
class GGUFModel:
    weights: dict[str, mx.array]  # mlx-lm names
    config: dict  # mlx-lm config.json dict
    tokenizer: TokenizerWrapper
    shapes: dict[str, tuple[int, ...]]  # mlx-lm parameter -> unquantized shape in the file
    report: str  # how each tensor type was mapped, with counts


def load_gguf(path: str, lazy_dir: Path | None = None) -> GGUFModel:
    """Read a llama / qwen2 / qwen3 / gemma3 GGUF into mlx-lm names, config and tokenizer.

    `lazy_dir`: never hold the whole model (stream.py). Each unit (a block, or the
    embedding / norm / head) is converted, written to a safetensors file there and loaded back
    lazily (mx.load reads a tensor only when it is evaluated), then released; the file is
    unlinked at once (an open lazy load keeps reading its inode; the disk space goes when the
    arrays are evaluated or dropped). Without it every tensor is converted into memory.
    """
    meta, infos = _table(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{path}: architecture '{arch}' is not supported; supported GGUF architectures: "
            + ", ".join(ARCHITECTURES)
        )
    _check_types(infos, path)
    with open(path, "rb") as f:
        config = model_config(meta, infos, f, path)
        n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
        if n_tokens > config["vocab_size"]:
            raise UserError(
                f"{path}: tensor 'token_embd.weight' has {config['vocab_size']} rows but the "
                f"tokenizer has {n_tokens} tokens; the file is inconsistent, re-convert it"
            )
        weights, mapped = _read_weights(f, infos, arch, config, lazy_dir)
    shapes = {_mlx_name(n, arch, path): i.shape for n, i in infos.items() if n != ROPE_FREQS}
    config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in weights
    if quantization := quantization_config(weights):
        config["quantization"] = quantization
    report = ", ".join(f"{kind} x{n} -> {how}" for (kind, how), n in sorted(mapped.items()))
    return GGUFModel(weights, config, build_tokenizer(meta, path), shapes, report)


def _read_weights(
    f: BinaryIO, infos: dict[str, TensorInfo], arch: str, config: dict, lazy_dir: Path | None
) -> tuple[dict[str, mx.array], Counter]:
    """Every tensor converted, unit by unit (lazily from `lazy_dir` if given); the mapping
    counts by (GGUF type, how it was mapped)."""
    if lazy_dir is not None:
        require_free_space(
            lazy_dir,
            sum(i.nbytes for i in infos.values()),
            f"converting {Path(f.name).name} one block at a time",
            "free disk space or set TMPDIR to a folder on a bigger disk",
        )
    weights, mapped = {}, Counter()
    for unit, names in _units(infos).items():
        part = {}
        for name in names:
            part.update(_convert(f, name, infos[name], arch, config, mapped))
        weights.update(part if lazy_dir is None else _to_lazy(part, lazy_dir / unit))
        del part
    return weights, mapped


def _units(infos: dict[str, TensorInfo]) -> dict[str, list[str]]:
    """GGUF tensor names grouped by stream unit: 'blk.N' per block, 'top' for the rest."""
    units: dict[str, list[str]] = {}
    for name in infos:
        if name != ROPE_FREQS:  # llama3 rope factors, folded into the config
            unit = ".".join(name.split(".")[:2]) if name.startswith("blk.") else "top"
            units.setdefault(unit, []).append(name)
    return units


def _convert(f, name: str, info: TensorInfo, arch: str, config: dict, mapped: Counter) -> dict:
    """One GGUF tensor -> its mlx-lm arrays by name (weight, or weight/scales/biases)."""
    key = _mlx_name(name, arch, f.name)
    # The embedding lookup dequantizes in the scales' dtype: float32 keeps it exact.
    parts, how = convert(info.kind, _bytes(f, info), info.shape, name == "token_embd.weight")
    mapped[(TYPES[info.kind].name, how)] += 1
    shift = FAMILIES[arch].gguf_norm_shift
    if shift and name.endswith("norm.weight"):  # Gemma: llama.cpp stores 1 + w
        parts["weight"] = parts["weight"].astype(mx.float32) + shift
    module = key.rsplit(".", 1)[0]
    proj = module.rsplit(".", 1)[-1]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out = {}
    for suffix, w in parts.items():
        if FAMILIES[arch].gguf_permute_qk and proj in heads:  # llama.cpp: Q/K rows interleaved
            w = unpermute_rows(w, heads[proj])
        out[key if suffix == "weight" else f"{module}.{suffix}"] = w
    return out


def _to_lazy(part: dict[str, mx.array], stem: Path) -> dict[str, mx.array]:
    """Write one unit's arrays to disk and return lazy loads of them (the file unlinked)."""
    path = stem.with_suffix(".safetensors")
    try:
        mx.save_safetensors(str(path), part)
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"{stem.parent}: cannot write converted weights ({str(e).splitlines()[0]}); "
            "free disk space or set TMPDIR to a folder on a bigger disk"
        ) from None
    lazy = mx.load(str(path))  # reads nothing until evaluated
    path.unlink()
    return lazy


def _check_types(infos: dict[str, TensorInfo], path: str) -> None:
    """Every tensor of a type we convert (gguf_header checked sizes and bounds)."""
    supported = ", ".join(t.name for t in TYPES.values())
    for name, info in infos.items():
        if info.kind not in TYPES:
            raise UserError(
                f"{path}: tensor '{name}' has GGUF type {GGML_TYPES[info.kind][0]}, which is "
                f"not supported; supported types: {supported}"
            )


def _bytes(f: BinaryIO, info: TensorInfo) -> np.ndarray:
    """One tensor's bytes read into a fresh buffer: unlike a memory map's pages, they leave
    the process's resident memory once converted."""
    buf = np.empty(info.nbytes, dtype=np.uint8)
    f.seek(info.offset)
    if f.readinto(buf) != info.nbytes:  # the header check saw the file whole: it shrank since
        raise UserError(f"{f.name}: truncated while reading; re-download it")
    return buf


def _mlx_name(name: str, arch: str, path: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    module, _, suffix = name.rpartition(".")
    target = _TOP.get(module)
    if module.startswith("blk."):
        _, index, part = module.split(".", 2)
        block = FAMILIES[arch].gguf_block_tensors
        target = block.get(part) and f"model.layers.{index}.{block[part]}"
    if target is None:
        raise UserError(f"{path}: unexpected tensor '{name}' for a {arch} GGUF")
    return f"{target}.{suffix}"


def gguf_name(key: str, arch: str) -> str:
    """The inverse of _mlx_name, for error messages."""
    module, _, suffix = key.rpartition(".")
    top = {v: k for k, v in _TOP.items()}
    if module in top:
        return f"{top[module]}.{suffix}"
    _, _, index, part = module.split(".", 3)
    block = {v: k for k, v in FAMILIES[arch].gguf_block_tensors.items()}
    return f"blk.{index}.{block.get(part, part)}.{suffix}"


def check_tensors(model: nn.Module, gguf: GGUFModel, path: str) -> None:
    """The tensors must have the shapes of the (float) model the metadata describes."""
    arch = gguf.config["model_type"].removesuffix("_text")  # gemma3_text -> gemma3
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    for key, shape in gguf.shapes.items():
        want = expected.get(key)
        if want != shape:
            implied = "no such tensor" if want is None else f"shape {list(want)}"
            raise UserError(
                f"{path}: tensor '{gguf_name(key, arch)}' has shape {list(shape)} but the "
                f"metadata implies {implied}; the file is inconsistent, re-convert it"
            )
    if missing := sorted(set(expected) - set(gguf.shapes)):
        raise UserError(
            f"{path}: tensor '{gguf_name(missing[0], arch)}' is missing although the metadata "
            "describes it; the file is incomplete, re-convert it"
        )


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF half-split).

    Rows are output features, so the same permutation applies to quantized weight, scales
    and biases and to a bias vector.
    """
    rows = w.shape[0]
    # [rows, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...] -> [rows, ...]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
    return w.reshape(rows, *w.shape[3:])


def model_config(meta: dict, infos: dict, f: BinaryIO, path: str) -> dict:
    """The mlx-lm config.json dict for this GGUF's hyper-parameters."""
    arch = meta["general.architecture"]

    def get(key: str, default=None):
        value = meta_value(meta, f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{path}: GGUF metadata lacks '{arch}.{key}'; re-convert the model")
        return value

    heads = get("attention.head_count")
    embd = infos.get("token_embd.weight")
    config = {
        "model_type": arch,
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": embd.shape[0] if embd else 0,
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in infos,
        "rope_scaling": _rope_scaling(meta, infos, f, arch, path),
    }
    head_dim = meta_value(meta, f"{arch}.attention.key_length")
    if head_dim or arch == "qwen3":
        config["head_dim"] = head_dim or config["hidden_size"] // heads
    config.update(FAMILIES[arch].gguf_read_config(config, get))
    return config


def _rope_scaling(meta: dict, infos: dict, f: BinaryIO, arch: str, path: str) -> dict | None:
    if info := infos.get(ROPE_FREQS):
        factors = convert(info.kind, _bytes(f, info), info.shape)[0]["weight"]
        return _llama3_scaling(factors, meta, arch, path)
    kind = meta_value(meta, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(meta_value(meta, f"{arch}.rope.scaling.factor"))}
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
    base = float(meta_value(meta, f"{arch}.rope.freq_base", 10000.0))
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
