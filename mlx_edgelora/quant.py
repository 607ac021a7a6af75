"""Quantized frozen base with on-the-fly dequantization (paper technique 1).

The base weights stay INT4/INT8 in memory; each matmul dequantizes only inside itself and
drops the float copy right after. `prepare_for_training(model)` swaps every
nn.QuantizedLinear / nn.QuantizedEmbedding instance in the model tree (LoRALinear's `.linear`
included) for a subclass whose kernel is chosen once per backend:

- Metal / CUDA: mlx's fused `mx.quantized_matmul` (no float weight is ever materialized).
- CPU: dequantize-then-matmul. mlx 0.32's CPU quantized_matmul is not BLAS-backed. Measured
  here (mlx 0.32.4, OpenBLAS, 2 cores shared with other jobs so +-30%; x [1, L, in] float32,
  float16 scales, group 32; ms per forward call, quantized_matmul vs `dequant_matmul`):
      4-bit L=512  576->1536   497 vs  63  (8x)    4-bit L=2048 576->1536  1511 vs 182 (8x)
      4-bit L=512  2048->2048 2082 vs 252  (8x)    8-bit L=512  576->1536   670 vs  47 (14x)
  (7-15x over three runs, not ~30x.) The CPU path is an `mx.custom_function` whose VJP
  dequantizes the weight again instead of keeping the float copy alive from forward to
  backward; only dL/dx is computed (the base is frozen). `mx.depends` makes each
  dequantization wait for its input, so MLX does not dequantize every layer up front.
  `dequant_matmul_reference` is the plain version it is tested against.

Dequantize once (`dequantize_once`, the segment engine's scope around one segment's forward
and its recompute): token chunks multiply each weight once per chunk, and per chunk it was
dequantized again, in tiles sized to the chunk. Inside the scope the CPU kernels share one
float32 copy of each weight across chunks, the recompute's forward and its dL/dx, while the
copies total at most ONCE_BYTES, each at most ONCE_WEIGHT_BYTES: a small model's weights
(SmolLM2's, Qwen2.5-0.5B's attention); larger ones (a 3B model's) keep their tiles, so that
the scope adds no memory where memory is tight.

The subclasses keep the names and parameters (weight, scales, biases, bias) of mlx's classes,
so mlx-lm saves, loads and fuses them as usual. The CPU kernel computes in float32 whatever
the dtype of the scales (float16 in most checkpoints) and returns the input's dtype (--dtype,
precision.py). `matmul` is the same choice for a plain product of two activations (attention):
MLX's CPU backend has no BLAS for bfloat16/float16 (20-40x slower than float32, measured), so
there half-precision operands are upcast (exactly) and multiplied by float32 BLAS.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten


def fused_available() -> bool:
    """True where mlx has a fast fused quantized matmul: the default device is a GPU."""
    return mx.default_device().type == mx.gpu and (mx.metal.is_available() or _cuda_available())


def _cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def dequantize(w, scales, biases, group_size: int, bits: int, mode: str) -> mx.array:
    """The float32 weight [out, in] of a quantized matrix.

    Scales/biases are cast first (they are 1/group_size of the weight): dequantizing from
    float16 scales then casting peaks at ~3.5x the float32 weight on CPU, this at ~2x.
    """
    scales = scales.astype(mx.float32)
    biases = None if biases is None else biases.astype(mx.float32)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


ONCE_BYTES = 16 * 2**20  # the most float32 weight bytes a dequantize_once scope keeps
ONCE_WEIGHT_BYTES = 4 * 2**20  # ... of one weight


class _Once:
    """One dequantize_once scope: the float32 weights it made (by id of the packed weight,
    which it holds so that the id is not reused) and their bytes."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.arrays: dict[int, tuple[mx.array, mx.array]] = {}


_scopes: list[_Once] = []


@contextmanager
def dequantize_once(budget: int | None = None) -> Iterator[None]:
    """Inside, the CPU kernels dequantize each quantized weight once and share the float32
    copy among all its uses, while the copies total at most `budget` bytes (default
    ONCE_BYTES) and each is at most ONCE_WEIGHT_BYTES (the rest are dequantized in tiles per
    use, as outside). The copies live
    until the graphs built inside are evaluated."""
    _scopes.append(_Once(ONCE_BYTES if budget is None else budget))
    try:
        yield
    finally:
        _scopes.pop()


def _whole(qparams: tuple, fmt: tuple, in_dims: int) -> mx.array | None:
    """The scope's shared float32 W [out, in] of a quantized weight, or None (no scope, or
    the weight does not fit in what is left of its budget). Keyed by the packed weight's
    Python object: call it with a module's own arrays (a custom function's primals are new
    objects on every call)."""
    if not _scopes:
        return None
    scope, w = _scopes[-1], qparams[0]
    if id(w) in scope.arrays:
        return scope.arrays[id(w)][1]
    nbytes = 4 * qparams[1].shape[0] * in_dims
    if nbytes > ONCE_WEIGHT_BYTES or scope.used + nbytes > scope.budget:
        return None
    scope.used += nbytes
    wf = dequantize(w, qparams[1], qparams[2] if len(qparams) > 2 else None, *fmt)
    scope.arrays[id(w)] = (w, wf)
    return wf


def once_bytes(weights: list[tuple[int, int]], budget: int | None = None) -> int:
    """At most the float32 bytes a dequantize_once scope keeps for quantized weights of these
    [out, in] shapes (used in any order): those small enough, capped by the budget."""
    budget = ONCE_BYTES if budget is None else budget
    fitting = [4 * o * i for o, i in weights if 4 * o * i <= min(budget, ONCE_WEIGHT_BYTES)]
    return min(sum(fitting), budget)


def dequant_matmul_reference(x, w, scales, biases, group_size: int, bits: int, mode: str):
    """x @ W.T with W dequantized in the graph (autodiff keeps W alive for backward)."""
    return x @ dequantize(w, scales, biases, group_size, bits, mode).T


TILE_BYTES = 16 * 2**20  # the most float32 weight bytes dequantized at a time on CPU
TILE_FLOOR = 2**20  # ... and the least, however few the tokens


def tile_bytes(tokens: int, out_dims: int, in_dims: int) -> int:
    """The float32 bytes of one dequantized tile of W [out, in] multiplied with `tokens` rows:
    at most the larger of the product's input [tokens, in] and output [tokens, out] (and
    TILE_FLOOR, TILE_BYTES). Why: with few tokens a 16 MB tile, not the activations, set the
    peak: the Qwen2.5-0.5B MLP half at 128 tokens held 70 MB for 0.5 MB of activations
    (gate and up dequantized side by side, each at ~2x while dequantizing)."""
    return min(TILE_BYTES, max(TILE_FLOOR, 4 * tokens * max(in_dims, out_dims)))


def _row_tiles(out_dims: int, in_dims: int, budget: int = TILE_BYTES) -> list[tuple[int, int]]:
    """Row ranges of W whose float32 copy is at most `budget` bytes (one range for small W)."""
    rows = max(1, min(budget, TILE_BYTES) // (4 * in_dims))
    return [(r, min(r + rows, out_dims)) for r in range(0, out_dims, rows)]


def _tile(qparams: tuple, r0: int, r1: int, after: mx.array) -> tuple:
    """Rows r0:r1 of (w, scales[, biases]), scheduled only once `after` is computed."""
    return tuple(mx.depends(a[r0:r1], after) for a in qparams)


@functools.cache
def _dequant_matmul_fn(group_size: int, bits: int, mode: str):
    """A custom_function x @ W.T whose VJP re-dequantizes W (one per quantization format).

    W is dequantized in row tiles of at most TILE_BYTES (fewer bytes for few tokens:
    `tile_bytes`), each chained on the previous tile's result with `mx.depends`, so at most one
    float32 tile exists at a time: for a 3B model's 8192x3072 MLP weight that is 16 MB instead
    of 100 MB (x2 while dequantizing), forward and backward.
    """
    fmt = (group_size, bits, mode)

    def deq(qparams: tuple) -> mx.array:
        w, scales, *biases = qparams
        return dequantize(w, scales, biases[0] if biases else None, *fmt)

    @mx.custom_function
    def f(x, *qparams):  # qparams: (w, scales) or (w, scales, biases)
        out_dims, in_dims = qparams[1].shape[0], x.shape[-1]
        budget = tile_bytes(x.size // in_dims, out_dims, in_dims)
        ys, after = [], x  # dequantize only once x is ready, not all layers up front
        for r0, r1 in _row_tiles(out_dims, in_dims, budget):
            ys.append(x @ deq(_tile(qparams, r0, r1, after)).T)
            after = ys[-1]
        return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=-1)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, *qparams = primals
        dx = _tiled_input_grad(cotangent, tuple(qparams), fmt, x.shape[-1])
        frozen = [mx.zeros_like(a) for a in qparams]  # lazy, never evaluated
        return (dx, *frozen)

    return f


def _col_tiles(
    out_dims: int, in_dims: int, group_size: int, budget: int = TILE_BYTES
) -> list[tuple[int, int]]:
    """Column ranges of W (whole quantization groups) whose float32 copy is <= `budget`."""
    cols = max(1, min(budget, TILE_BYTES) // (4 * out_dims) // group_size) * group_size
    return [(c, min(c + cols, in_dims)) for c in range(0, in_dims, cols)]


def _tiled_input_grad(dy, qparams: tuple, fmt: tuple, in_dims: int, low_rank=None) -> mx.array:
    """dy @ W (+ g @ a.T with low_rank = (g, a)) for a quantized W [out, in], by column tiles:
    each tile of W (whole groups) is dequantized after the previous tile's result, and gives
    its own columns of dx, so dx is one [.., in] array (its parts, then their concatenation)
    and at most one float tile of W exists; row tiles would add an [.., in] term per tile."""
    w, scales, *biases = qparams
    group_size, bits, _ = fmt
    parts: list[mx.array] = []
    budget = tile_bytes(dy.size // dy.shape[-1], scales.shape[0], in_dims)
    for c0, c1 in _col_tiles(scales.shape[0], in_dims, group_size, budget):
        after = parts[-1] if parts else dy
        p = slice(c0 * bits // 32, c1 * bits // 32)  # packed uint32 columns
        g = slice(c0 // group_size, c1 // group_size)  # scale/bias columns
        tile = [mx.depends(a[:, s], after) for a, s in zip(qparams, (p, g, g))]
        wf = dequantize(tile[0], tile[1], tile[2] if biases else None, *fmt)  # [out, c1-c0]
        if low_rank is None:
            parts.append(dy @ wf)
        else:
            parts.append(mx.addmm(low_rank[0] @ low_rank[1][c0:c1].T, dy, wf))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def linear_input_grad(linear: nn.Module, dy: mx.array, low_rank=None) -> mx.array:
    """dL/dx of a frozen linear's x @ W.T (its bias has no say), plus g @ a.T with
    low_rank = (g, a) (a LoRA path's dL/dx), for a float nn.Linear or a quantized one: the
    backend's fused kernel on GPU, column tiles on CPU; for EMLoC's emulator (W = up · down)
    through its factors, (dy @ W_up) @ W_down, rank-wide in between."""
    from .emulator import EmulatorLinear  # emulator imports this module

    if isinstance(linear, EmulatorLinear):
        return linear_input_grad(linear.down, linear_input_grad(linear.up, dy), low_rank)
    extra = None if low_rank is None else low_rank[0] @ low_rank[1].T
    if "scales" not in linear:  # float32 BLAS whatever the dtypes (quant.matmul's reason)
        dy, w = dy.astype(mx.float32), linear["weight"].astype(mx.float32)
        return dy @ w if extra is None else mx.addmm(extra.astype(mx.float32), dy, w)
    w, scales, biases = linear["weight"], linear["scales"], linear.get("biases")
    fmt = _format(linear)
    if fused_available() or type(linear) is nn.QuantizedLinear:  # as its forward runs
        dx = mx.quantized_matmul(
            dy, w, scales, biases, transpose=False, group_size=fmt[0], bits=fmt[1], mode=fmt[2]
        )
        return dx if extra is None else dx + extra
    qparams = (w, scales) if biases is None else (w, scales, biases)
    in_dims = w.shape[1] * 32 // fmt[1]
    dy = dy.astype(mx.float32)
    wf = _whole(qparams, fmt, in_dims)
    if wf is not None:
        return dy @ wf if low_rank is None else mx.addmm(low_rank[0] @ low_rank[1].T, dy, wf)
    return _tiled_input_grad(dy, qparams, fmt, in_dims, low_rank)


def dequant_matmul(x, w, scales, biases, group_size: int, bits: int, mode: str) -> mx.array:
    """x @ W.T for a quantized W in x's dtype: fused kernel on GPU, memory-lean
    dequantize+matmul in float32 on CPU."""
    if fused_available():
        return mx.quantized_matmul(
            x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
        ).astype(x.dtype)
    qparams = (w, scales) if biases is None else (w, scales, biases)
    wf = _whole(qparams, (group_size, bits, mode), x.shape[-1])
    if wf is not None:  # plain autodiff: its VJP is dy @ wf, with the copy shared
        return (x.astype(mx.float32) @ wf.T).astype(x.dtype)
    y = _dequant_matmul_fn(group_size, bits, mode)(x.astype(mx.float32), *qparams)
    return y.astype(x.dtype)


def matmul(a: mx.array, b: mx.array, dtype: mx.Dtype | None = None) -> mx.array:
    """a @ b, returned in `dtype` (default: the operands' promoted dtype). On a CPU,
    half-precision operands go through float32 BLAS: the exact upcast and a float32
    accumulation, as a GPU's half-precision matmul accumulates."""
    out = dtype or mx.result_type(a.dtype, b.dtype)
    if a.dtype == b.dtype == mx.float32 or fused_available():
        return (a @ b).astype(out)
    return (a.astype(mx.float32) @ b.astype(mx.float32)).astype(out)


class DequantLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear through `dequant_matmul` (float32 kernel on CPU, x's dtype out)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = dequant_matmul(x, self["weight"], self["scales"], self.get("biases"), *_format(self))
        return y + self["bias"] if "bias" in self else y


class DequantEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding in float32: lookups dequantize only the gathered rows."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x).astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        """The tied LM head: x @ E.T through the backend's fast path."""
        return dequant_matmul(x, self["weight"], self["scales"], self.get("biases"), *_format(self))


def _format(module: nn.Module) -> tuple[int, int, str]:
    return module.group_size, module.bits, module.mode


_SWAPS = [(nn.QuantizedLinear, DequantLinear), (nn.QuantizedEmbedding, DequantEmbedding)]


def _swapped(module: nn.Module) -> nn.Module | None:
    """A copy of `module` as our subclass (same arrays, same frozen set), or None."""
    for base, ours in _SWAPS:
        if type(module) is base:
            new = ours.__new__(ours)  # skip __init__: it would draw and quantize random weights
            new.__dict__.update(module.__dict__)  # group_size, bits, mode, _training, ...
            new._no_grad = set(module._no_grad)
            dict.update(new, module)  # weight, scales, biases, bias
            return new
    return None


def prepare_for_training(model: nn.Module) -> int:
    """Swap quantized modules (also inside LoRALinear) for backend-aware ones, and LoRALinear
    for fused_lora's FusedLoRALinear (its lean VJP); return the count of quantized swaps.

    Works before or after LoRA is applied (LoRA applied later keeps mlx-lm's VJP until this
    runs again); calling it twice is a no-op.
    """
    from .fused_lora import use_fused_vjp

    swaps = []
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        new = _swapped(module)
        if new is not None:
            swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    use_fused_vjp(model)
    return len(swaps)
