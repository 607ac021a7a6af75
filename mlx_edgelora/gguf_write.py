"""mlx-lm model (or LoRA adapter) -> GGUF file that llama.cpp, Ollama and LM Studio load.

Why: the inverse of gguf.py, so a trained result leaves in the format those tools read.
Tensor names invert gguf.py's table; Q/K rows of the llama architecture are permuted back to
llama.cpp's rotary-interleaved order (its converter permutes them; we undo that on load);
norms get the family's shift back (Gemma: 1 + w). What a family writes beyond the common
keys, and what it cannot represent, is its own (models/: gguf_config, gguf_keys).
Quantized MLX weights that are already a GGUF block format (4-bit group 32 -> Q4_1, or Q4_0
when bias = -8 * scale; 8-bit group 32 with bias = -128 * scale -> Q8_0; scales exact in
float16) are copied block for block; every other weight is quantized with the `gguf`
package's reference quantizers. Tensors are produced and written one at a time, so the peak
memory is one tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx import nn

from .errors import UserError
from .files import atomic_path
from .gguf import _TOP  # the load-side names this file inverts
from .models import Family, lookup

Q = gguf.GGMLQuantizationType
_GGUF_NAME = {v: k for k, v in _TOP.items()}
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
# general.file_type for each --type (llama.cpp's LLAMA_FTYPE values)
FILE_TYPES = {Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q8_0: 7, Q.BF16: 32}


@dataclass(frozen=True)
class Arch:
    """What the writer needs of a family: read off its registry entry (models/)."""

    name: str  # GGUF general.architecture
    family: Family
    block_names: dict  # mlx-lm block path -> llama.cpp tensor name


def arch_of(config: dict) -> tuple[str, Arch]:
    """The GGUF architecture of an mlx-lm config, from the family registry."""
    family = lookup(config.get("model_type"), "model")
    name = family.gguf_arch
    if name is None:
        raise UserError(f"model type '{config.get('model_type')}' cannot be exported to GGUF yet")
    names = {ours: theirs for theirs, ours in family.gguf_block_tensors.items()}
    return name, Arch(name, family, names)


def gguf_name(module: str, arch: Arch, prefix: str = "") -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' (`prefix`: the text model's path)."""
    module = module.removeprefix(prefix)
    if module in _GGUF_NAME:
        return _GGUF_NAME[module]
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in arch.block_names:
        return f"blk.{parts[2]}.{arch.block_names['.'.join(parts[3:])]}"
    raise UserError(f"no GGUF name for module '{module}'; this model cannot be exported")


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split rotary rows -> llama.cpp interleaved rows (inverse of unpermute_rows)."""
    rows = w.shape[0]
    # [rows, ...] -> [heads, 2, head_dim/2, ...] -> [heads, head_dim/2, 2, ...] -> [rows, ...]
    w = w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2)
    return w.reshape(rows, *w.shape[3:])


# --- hyper-parameters --------------------------------------------------------------------


def add_hparams(w: gguf.GGUFWriter, config: dict) -> None:
    """{arch}.* keys as llama.cpp's converter writes them: the common ones, then the family's."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads", heads))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(head_dim)
    if config.get("head_dim"):  # as the converter: whenever the config names it
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif kind not in (None, "default", "llama3"):  # llama3: a rope_freqs tensor, see below
        raise UserError(f"rope scaling '{kind}' cannot be exported to GGUF yet")
    arch_of(config)[1].family.gguf_keys(w, config)


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """llama.cpp's rope_freqs.weight for Llama 3.x rope scaling (one factor per rotary pair)."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base, factor = config.get("rope_theta", 10000.0), scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))
    return out.astype(np.float32)


# --- tensors -----------------------------------------------------------------------------


@dataclass
class Entry:
    """One tensor to write: its GGUF name, type, numpy shape and a function making its data."""

    name: str
    qtype: Q
    shape: tuple  # logical (rows, cols) for quantized types, as numpy would see floats
    make: Callable[[], np.ndarray]


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def _float_entry(name: str, weight: mx.array, qtype: Q, perm: int | None) -> Entry:
    """A float tensor written as qtype (1-D tensors and odd widths stay F32 / F16)."""
    if weight.ndim == 1:
        qtype = Q.F32
    elif qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and weight.shape[-1] % 32:
        qtype = Q.F16  # llama.cpp's converter falls back the same way

    def make() -> np.ndarray:
        w = _np(weight.astype(mx.float32))
        if perm:
            w = permute_rows(w, perm)
        if qtype == Q.F32:
            return w
        if qtype == Q.F16:
            return w.astype(np.float16)
        if qtype == Q.BF16:
            return np.array(mx.array(w).astype(mx.bfloat16).view(mx.uint16))
        return gguf.quants.quantize(w, qtype)

    return Entry(name, qtype, tuple(weight.shape), make)


def exact_block_type(module: nn.Module) -> Q | None:
    """The GGUF block type an MLX-quantized module converts to without any rounding, if any."""
    if getattr(module, "mode", "affine") != "affine" or module.group_size != 32:
        return None
    scales, biases = _np(module.scales).astype(np.float32), _np(module.biases).astype(np.float32)
    fits16 = lambda a: np.array_equal(a.astype(np.float16).astype(np.float32), a)
    if not (fits16(scales) and fits16(biases)):
        return None
    if module.bits == 8:
        return Q.Q8_0 if np.array_equal(biases, -128 * scales) else None
    if module.bits == 4:
        return Q.Q4_0 if np.array_equal(biases, -8 * scales) else Q.Q4_1
    return None


def mlx_blocks(weight: mx.array, scales: mx.array, biases: mx.array, qtype: Q) -> np.ndarray:
    """MLX affine quantized rows -> GGUF blocks (uint8 [rows, blocks * block_bytes])."""
    packed = np.array(weight).view(np.uint8)  # little-endian words: element i at bits i*b
    rows = packed.shape[0]
    if qtype == Q.Q8_0:
        q = packed.reshape(rows, -1, 32)
    else:  # two 4-bit values per byte, low nibble first
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, -1, 32)
    d = _np(scales).astype(np.float16).reshape(rows, -1, 1).view(np.uint8)  # [rows, G, 2]
    if qtype == Q.Q8_0:
        body = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:  # GGUF packs element j with j+16 in one byte
        qs = q[..., :16] | (q[..., 16:] << 4)
        m = _np(biases).astype(np.float16).reshape(rows, -1, 1).view(np.uint8)
        body = [d, qs] if qtype == Q.Q4_0 else [d, m, qs]
    return np.concatenate(body, axis=-1).reshape(rows, -1)


def _quantized_entry(name: str, module: nn.Module, qtype: Q, perm: int | None) -> Entry:
    """A quantized MLX module: block copy when exact (and wanted), else dequantize first."""
    exact = exact_block_type(module)
    rows, cols = module.weight.shape[0], module.weight.shape[1] * 32 // module.bits
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and exact is not None:
        arrays = [module.weight, module.scales, module.biases]  # not the module: it may let go

        def make() -> np.ndarray:
            parts = arrays
            if perm:
                parts = [mx.array(permute_rows(np.array(p), perm)) for p in parts]
            return mlx_blocks(*parts, exact)

        return Entry(name, exact, (rows, cols), make)
    dense = mx.dequantize(
        module.weight, module.scales, module.biases, module.group_size, module.bits
    )
    return _float_entry(name, dense, qtype, perm)


def _is_norm(module: nn.Module) -> bool:
    """An RMSNorm: mlx's, or a family's own (Gemma's computes with 1 + w): a lone 1-D weight."""
    if isinstance(module, nn.RMSNorm):
        return True
    own = module.parameters()
    return not module.children() and list(own) == ["weight"] and own["weight"].ndim == 1


_WEIGHTS = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)


def _heads(config: dict) -> dict[str, int]:
    """Heads per permuted projection (llama.cpp's Q/K row interleave)."""
    q = config["num_attention_heads"]
    return {"attn_q": q, "attn_k": config.get("num_key_value_heads") or q}


def model_entries(model: nn.Module, config: dict, qtype: Q) -> Iterator[Entry]:
    """Every tensor of an mlx-lm model (no LoRA left in it) as GGUF entries, in model order."""
    _, arch = arch_of(config)
    family, heads = arch.family, _heads(config)
    prefix = family.prefix(model)
    if (factors := llama3_rope_factors(config)) is not None:
        yield Entry("rope_freqs.weight", Q.F32, factors.shape, lambda: factors)
    for path, module in model.named_modules():
        if hasattr(module, "lora_a"):
            raise UserError(f"{path}: still a LoRA layer; fuse the adapter before export")
        norm = _is_norm(module)
        if not norm and not isinstance(module, _WEIGHTS):
            continue
        base = gguf_name(path, arch, prefix)
        perm = heads.get(base.split(".")[-1]) if family.gguf_permute_qk else None
        if norm:  # the loader adds gguf_norm_shift back (Gemma: llama.cpp stores 1 + w)
            weight = module.weight.astype(mx.float32) - family.gguf_norm_shift
            yield _float_entry(f"{base}.weight", weight, Q.F32, None)
        elif "scales" in module:
            yield _quantized_entry(f"{base}.weight", module, qtype, perm)
        else:
            yield _float_entry(f"{base}.weight", module.weight, qtype, perm)
        if "bias" in module:
            yield _float_entry(f"{base}.bias", module.bias, Q.F32, perm)


def lora_entries(model: nn.Module, config: dict) -> Iterator[Entry]:
    """llama.cpp --lora tensors: '<w>.lora_a' numpy [r, in] and '<w>.lora_b' [out, r], F32.

    mlx-lm keeps lora_a [in, r] and lora_b [r, out] (y = x W^T + s x A B); llama.cpp computes
    W x + s' B (A x) with ggml shapes a: ne [in, r], b: ne [r, out], i.e. the transposes.
    """
    _, arch = arch_of(config)
    family, heads = arch.family, _heads(config)
    for path, module in model.named_modules():
        if not hasattr(module, "lora_a"):
            continue
        base = gguf_name(path, arch, family.prefix(model))
        perm = heads.get(base.split(".")[-1]) if family.gguf_permute_qk else None
        a, b = module.lora_a, module.lora_b
        yield Entry(f"{base}.weight.lora_a", Q.F32, (a.shape[1], a.shape[0]), _lora_a(a))
        yield Entry(f"{base}.weight.lora_b", Q.F32, (b.shape[1], b.shape[0]), _lora_b(b, perm))


def _lora_a(a: mx.array) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(_np(a).astype(np.float32).T)


def _lora_b(b: mx.array, perm: int | None) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        rows = _np(b).astype(np.float32).T  # [out, r]: output rows, permuted like the weight
        return np.ascontiguousarray(permute_rows(rows, perm) if perm else rows)

    return make


# --- file --------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, keys: Callable[[gguf.GGUFWriter], None], entries) -> Path:
    """Write metadata and tensors, one tensor in memory at a time, atomically (tmp + rename)."""
    entries = list(entries)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UserError("two tensors map to one GGUF name; this model cannot be exported")
    with atomic_path(path) as tmp:
        _write(gguf.GGUFWriter(tmp, arch), keys, entries)
    return path


def _write(w: gguf.GGUFWriter, keys: Callable[[gguf.GGUFWriter], None], entries: list) -> None:
    try:
        keys(w)
        for e in entries:
            if e.qtype in (Q.F32, Q.F16, Q.BF16):
                dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[e.qtype]
                nbytes = int(np.prod(e.shape)) * np.dtype(dtype).itemsize
                w.add_tensor_info(e.name, e.shape, np.dtype(dtype), nbytes, raw_dtype=e.qtype)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(e.shape, e.qtype)
                nbytes = int(np.prod(byte_shape))
                w.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), nbytes, e.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for e in entries:
            w.write_tensor_data(np.ascontiguousarray(e.make()))
            e.make = None  # its arrays (evaluated now) go: one tensor in memory at a time
            mx.clear_cache()
    finally:
        w.close()
