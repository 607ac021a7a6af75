"""llama.cpp tensor types -> MLX arrays, quantized in MLX's affine format wherever exact.

Paper technique 1 (quantized base): a GGUF's blocks become MLX `(weight, scales, biases)`
triplets with group size 32, value = scale * q + bias, without a float detour:
- Q4_0 / Q5_0 / Q8_0: scale d, bias -8d / -16d / -128d (Q8_0's signed q shifted by 128);
- Q4_1 / Q5_1: scale d, bias m;
- Q4_K / Q5_K: each 32-weight sub-block, scale d*sc, bias -dmin*m.
These are exact: float32 arithmetic on the stored scale and bias reproduces llama.cpp's
(and the `gguf` package's) dequantized value bit for bit. Scales are stored as float16 when
that holds them exactly (the d and m of the 32-blocks: MLX's quantized matmul with float32
inputs computes in float32, so it stays exact) and as float32 otherwise (K-quant products d*sc
need up to 17 mantissa bits, and the embedding lookup dequantizes in the scales' dtype).

Q2_K / Q3_K / Q6_K have 16-weight sub-blocks, each with its own scale; MLX's smallest group is
32 and two sub-blocks of one group share no common affine grid, so no exact mapping exists.
(MLX's 6-bit with group 16 would fit Q6_K, but MLX allows groups of 32, 64 and 128 only.)
Rule: dequantize to float32 (exact), then min/max affine re-quantization at twice the native
bit width (Q2_K -> 4-bit, Q3_K -> 6-bit, Q6_K -> 8-bit), group 32, float32 scales; the added
error is at most half a step, (max - min) / (2 * (2^bits - 1)) of each 32-group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .gguf_header import GGML_TYPES

GROUP = 32  # MLX group size of every quantized tensor we produce
QK_K = 256  # weights per K-quant super-block
ROWS_BYTES = 1 << 23  # GGUF block bytes decoded at a time by convert()


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # weights per block
    nbytes: int  # bytes per block
    decode: Callable | None = None  # exact: blocks -> (q, scale, bias, bits); else float32
    requant_bits: int | None = None  # for the 16-weight-group types


def _type(type_id: int, decode: Callable | None = None, requant_bits: int | None = None):
    """A type we convert, its name and block layout from gguf_header's table."""
    return type_id, GGMLType(*GGML_TYPES[type_id], decode, requant_bits)


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, k, 16*s] bytes -> [n, k, 2, 16*s]: low nibbles, then high nibbles."""
    return np.stack([qs & 15, qs >> 4], axis=-2)


def _q4_0(b):
    d = _f16(b[:, :2])
    q = _nibbles(b[:, None, 2:]).reshape(len(b), 32)
    return q, d, -8 * d, 4


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, None, 4:]).reshape(len(b), 32), d, m, 4


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes holding 32 bits -> [n, 32] of 0/1 (bit i = weight i)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q5_0(b):
    d = _f16(b[:, :2])
    q = _nibbles(b[:, None, 6:]).reshape(len(b), 32) | (_high_bits(b[:, 2:6]) << 4)
    return q, d, -16 * d, 5


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, None, 8:]).reshape(len(b), 32) | (_high_bits(b[:, 4:8]) << 4)
    return q, d, m, 5


def _q8_0(b):
    d = _f16(b[:, :2])
    return b[:, 2:] ^ np.uint8(0x80), d, -128 * d, 8  # int8 q -> q + 128 as uint8


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (llama.cpp get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    # 128 bytes = 4 chunks of 32; chunk j's low nibbles are sub-block 2j, high ones 2j+1
    q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(len(b), QK_K)
    return q, d * sc, -(dmin * mn), 4


def _q5_k(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    low = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(len(b), 8, 32)
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # bit i: sub i
    return (low | (high << 4)).reshape(len(b), QK_K), d * sc, -(dmin * mn), 5


def _q2_k(b):
    n = len(b)
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 15)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4)).reshape(n, 16, 1)
    # [n, 2, 32] bytes -> shifts 0,2,4,6 -> [n, 2, 4, 32] = 16 sub-blocks of 16
    q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    return (dl * q.reshape(n, 16, 16) - ml).reshape(n, QK_K)


def _q3_k(b):
    n = len(b)
    hmask, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (s[:, None, :8] >> np.array([0, 4], np.uint8)[:, None]).reshape(n, 16) & 15
    high = (s[:, None, 8:] >> np.array([0, 2, 4, 6], np.uint8)[:, None]).reshape(n, 16) & 3
    sc = (low | (high << 4)).astype(np.float32) - 32
    ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    qh = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    # a clear high bit subtracts 4: q in -4..3
    q = ql.reshape(n, 16, 16).astype(np.float32) - 4 * (1 - qh.reshape(n, 16, 16))
    return ((d * sc)[:, :, None] * q).reshape(n, QK_K)


def _q6_k(b):
    n = len(b)
    ql, qh = b[:, :128], b[:, 128:192]
    sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 15
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).astype(np.float32) - 32
    return ((d * sc)[:, :, None] * q.reshape(n, 16, 16)).reshape(n, QK_K)


TYPES = dict(
    [
        _type(0),  # F32
        _type(1),  # F16
        _type(30),  # BF16
        _type(2, _q4_0),
        _type(3, _q4_1),
        _type(6, _q5_0),
        _type(7, _q5_1),
        _type(8, _q8_0),
        _type(10, _q2_k, requant_bits=4),
        _type(11, _q3_k, requant_bits=6),
        _type(12, _q4_k),
        _type(13, _q5_k),
        _type(14, _q6_k, requant_bits=8),
    ]
)
FLOATS = {0: np.float32, 1: np.float16, 30: np.uint16}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] codes < 2**bits -> MLX's packing: a little-endian bit stream in uint32."""
    rows = q.shape[0]
    if bits in (2, 4, 8):  # whole codes per byte: combine within bytes, then view
        per = 8 // bits
        q = q.reshape(rows, -1, per)
        byte = q[..., 0].copy()
        for k in range(1, per):
            byte |= q[..., k] << (bits * k)
        return byte.reshape(rows, -1).view(np.uint32)
    q = q.reshape(rows, -1, 8)  # 8 codes = `bits` whole bytes
    word = np.zeros(q.shape[:2], np.uint64)
    for k in range(8):  # one slice at a time keeps the temporary at 1 byte per weight
        word |= q[..., k].astype(np.uint64) << np.uint64(bits * k)
    out = word.view(np.uint8).reshape(rows, -1, 8)[..., :bits]
    return np.ascontiguousarray(out).reshape(rows, -1).view(np.uint32)


def dequantize(kind: int, blocks: np.ndarray) -> np.ndarray:
    """[n_blocks, nbytes] uint8 -> [n_blocks, block] float32, exactly as llama.cpp does."""
    t = TYPES[kind]
    if t.requant_bits:
        return t.decode(blocks)
    q, scale, bias, _ = t.decode(blocks)
    n = len(blocks)
    # [n, block] -> [n, block / 32, 32]: one scale and bias per 32 weights
    grouped = q.reshape(n, -1, GROUP).astype(np.float32) * scale[:, :, None] + bias[:, :, None]
    return grouped.reshape(n, t.block)


def _scale_array(x: np.ndarray, float32: bool) -> mx.array:
    """float16 when it holds every value exactly (and float32 is not asked for), else float32."""
    if not float32:
        with np.errstate(over="ignore"):
            half = x.astype(np.float16)
        if np.array_equal(half.astype(np.float32), x):
            return mx.array(half)
    return mx.array(x)


def convert(
    kind: int, raw: np.ndarray, shape: tuple[int, ...], float32_scales: bool = False
) -> tuple[dict[str, mx.array], str]:
    """One tensor's bytes -> ({"weight"} or {"weight", "scales", "biases"}, how it was mapped).

    A quantized matrix is decoded ROWS_BYTES of blocks at a time into its final arrays, so the
    decoder's temporaries (codes, float scales, a re-quantization's float32 copy) stay small
    next to the result even for a 262K-row embedding.
    """
    t = TYPES[kind]
    if kind in FLOATS:
        w = mx.array(raw.view(FLOATS[kind]).reshape(shape))
        return {"weight": w.view(mx.bfloat16) if kind == 30 else w}, "float"
    blocks = raw.reshape(-1, t.nbytes)
    if len(shape) != 2:  # rare (quantized vectors): plain float
        return {"weight": mx.array(dequantize(kind, blocks).reshape(shape))}, "float"
    rows = shape[0]
    by_row = blocks.reshape(rows, -1, t.nbytes)  # [rows, blocks per row, bytes per block]
    step = max(1, ROWS_BYTES // (by_row.shape[1] * t.nbytes))
    out = None
    for s in range(0, rows, step):
        parts = _convert_rows(t, by_row[s : s + step], shape[1])
        if out is None:  # [rows, ...] arrays of the pieces' widths and dtypes
            out = [np.empty((rows, *a.shape[1:]), a.dtype) for a in parts[:3]]
        for whole, piece in zip(out, parts[:3]):
            whole[s : s + step] = piece
    bits = parts[3]
    float32_scales = float32_scales or bool(t.requant_bits)
    how = f"re-quantized to {bits}-bit g{GROUP}" if t.requant_bits else f"{bits}-bit g{GROUP} exact"
    weight = mx.array(out.pop(0))
    return {
        "weight": weight,
        "scales": _scale_array(out.pop(0), float32_scales),
        "biases": _scale_array(out.pop(0), float32_scales),
    }, how


def _convert_rows(t: GGMLType, blocks: np.ndarray, cols: int) -> tuple:
    """[r, blocks per row, bytes] -> (packed codes [r, .], scales [r, cols/32],
    biases [r, cols/32], bits)."""
    r = len(blocks)
    blocks = blocks.reshape(-1, t.nbytes)
    if t.requant_bits:
        bits = t.requant_bits
        q, scale, bias = requantize(t.decode(blocks).reshape(r, cols), bits)
    else:
        q, scale, bias, bits = t.decode(blocks)
    return pack(q.reshape(r, -1), bits), scale.reshape(r, -1), bias.reshape(r, -1), bits


def requantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max affine codes per 32-group: error at most half a step, (max - min) / (2^bits - 1).

    Not mx.quantize: it moves the bias so that 0 is on the grid, which can cost up to a step.
    """
    rows = w.shape[0]
    g = w.reshape(rows, -1, GROUP)  # [rows, cols] -> [rows, groups, 32]
    lo = g.min(-1)
    scale = (g.max(-1) - lo) / (2**bits - 1)
    step = np.where(scale > 0, scale, 1)[..., None]
    q = np.clip(np.round((g - lo[..., None]) / step), 0, 2**bits - 1).astype(np.uint8)
    return q.reshape(rows, -1), scale, lo
