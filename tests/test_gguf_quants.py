"""GGUF tensor types against the reference: the `gguf` package's numpy dequantization.

Random blocks: any bytes are a valid block except the fp16 scale fields, which are made
finite. Exact mappings must reproduce the reference bit for bit through the operations the
model runs (quantized matmul for linears, dequantize for the embedding lookup); the
re-quantized 16-weight-group types must stay within half an MLX step of each 32-group.
"""

# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)
import mlx.core as mx

# isort: on
import numpy as np
import pytest

from mlx_edgelora.gguf_quants import TYPES, convert, dequantize, pack

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as reference  # noqa: E402

FP16_FIELDS = {  # byte offsets of each block's fp16 scale fields (ggml-common.h)
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
EXACT = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"]
REQUANTIZED = {"Q2_K": 4, "Q3_K": 6, "Q6_K": 8}
KIND = {t.name: k for k, t in TYPES.items()}


def random_blocks(name: str, rows: int, cols: int, wide: bool, seed: int = 0) -> np.ndarray:
    """Random bytes for a [rows, cols] tensor; fp16 fields finite (typical or full range)."""
    rng = np.random.default_rng(seed)
    t = TYPES[KIND[name]]
    blocks = rng.integers(0, 256, (rows * cols // t.block, t.nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[name]:
        if wide:  # any finite fp16: exponent field below 31
            bits = rng.integers(0, 1 << 16, len(blocks), dtype=np.uint16)
            bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).astype(np.uint16)
        else:
            bits = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16).view(np.uint16)
        blocks[:, at : at + 2] = bits.view(np.uint8).reshape(-1, 2)
    return blocks


def as_used_by_the_model(parts: dict, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights as a float32 quantized matmul sees them, as the embedding lookup returns them)."""
    w, s, b = parts["weight"], parts["scales"], parts["biases"]
    bits = w.shape[1] * 32 // cols
    eye = mx.eye(cols, dtype=mx.float32)
    matmul = mx.quantized_matmul(eye, w, s, b, transpose=True, group_size=32, bits=bits).T
    lookup = mx.dequantize(w, s, b, group_size=32, bits=bits)
    return np.array(matmul), np.array(lookup.astype(mx.float32))


@pytest.mark.parametrize("wide", [False, True], ids=["typical-scales", "any-finite-scales"])
@pytest.mark.parametrize("name", EXACT)
def test_exact_types_reproduce_the_reference_bit_for_bit(name, wide):
    rows, cols = 4, 512
    blocks = random_blocks(name, rows, cols, wide)
    want = reference(blocks, gguf.GGMLQuantizationType[name]).reshape(rows, cols)
    np.testing.assert_array_equal(dequantize(KIND[name], blocks).reshape(rows, cols), want)
    for embedding in (False, True):
        parts, how = convert(KIND[name], blocks.reshape(-1), (rows, cols), embedding)
        assert how.endswith("exact")
        matmul, lookup = as_used_by_the_model(parts, cols)
        np.testing.assert_array_equal(matmul, want)
        if embedding:  # float32 scales: the lookup is exact too
            assert parts["scales"].dtype == mx.float32
            np.testing.assert_array_equal(lookup, want)


def test_scales_stay_float16_where_that_is_exact():
    """Q4_0 / Q8_0 scales d and -8d, -128d are float16 values; K-quant d*sc are not."""
    for name, dtype in [("Q4_0", mx.float16), ("Q8_0", mx.float16), ("Q4_K", mx.float32)]:
        parts, _ = convert(KIND[name], random_blocks(name, 4, 256, False).reshape(-1), (4, 256))
        assert parts["scales"].dtype == dtype and parts["biases"].dtype == dtype


@pytest.mark.parametrize("name", list(REQUANTIZED))
def test_sixteen_weight_group_types_requantize_within_half_a_step(name):
    rows, cols = 4, 512
    blocks = random_blocks(name, rows, cols, wide=False)
    want = reference(blocks, gguf.GGMLQuantizationType[name]).reshape(rows, cols)
    np.testing.assert_array_equal(dequantize(KIND[name], blocks).reshape(rows, cols), want)
    parts, how = convert(KIND[name], blocks.reshape(-1), (rows, cols))
    bits = REQUANTIZED[name]
    assert how == f"re-quantized to {bits}-bit g32"
    assert parts["weight"].shape == (rows, cols * bits // 32)
    got, _ = as_used_by_the_model(parts, cols)
    groups = want.reshape(rows, -1, 32)  # [rows, cols] -> [rows, groups, 32]
    half_step = (groups.max(-1) - groups.min(-1)) / (2 * (2**bits - 1))
    err = np.abs(got - want).reshape(rows, -1, 32).max(-1)
    assert np.all(err <= half_step * (1 + 1e-3) + 1e-6), (err / half_step).max()


@pytest.mark.parametrize("name,dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_types_are_read_as_stored(name, dtype):
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(dtype)
    parts, how = convert(KIND[name], x.reshape(-1).view(np.uint8), (3, 8))
    assert how == "float" and parts["weight"].dtype == {np.float32: mx.float32}.get(
        dtype, mx.float16
    )
    np.testing.assert_array_equal(np.array(parts["weight"]), x)


def test_bf16_matches_the_reference():
    raw = np.random.default_rng(0).integers(0, 1 << 16, 24, dtype=np.uint16)
    raw = np.where((raw & 0x7F80) == 0x7F80, raw & 0x807F, raw).astype(np.uint16)  # finite
    parts, _ = convert(KIND["BF16"], raw.view(np.uint8), (3, 8))
    want = reference(raw.view(np.uint8).reshape(3, 16), gguf.GGMLQuantizationType.BF16)
    got = np.array(parts["weight"].astype(mx.float32))
    np.testing.assert_array_equal(got, want.reshape(3, 8))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx_quantize(bits):
    """Our bit packing is MLX's: codes recovered from mx.quantize pack back to its words."""
    w = mx.array(np.random.default_rng(bits).standard_normal((4, 64)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=32, bits=bits)
    deq = np.array(mx.dequantize(wq, s, b, group_size=32, bits=bits))
    codes = (deq - np.repeat(np.array(b), 32, 1)) / np.repeat(np.array(s), 32, 1)
    np.testing.assert_array_equal(pack(np.round(codes).astype(np.uint8), bits), np.array(wq))
