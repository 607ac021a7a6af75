"""--dtype: the dtypes a run keeps its weights and boundaries in, and computes activations in.

Why two dtypes: half precision halves the bytes of everything the memory engine (technique 2)
holds per token (the segment boundaries in RAM or spilled to disk, the recompute's
activations) and of the frozen float weights, resident or streamed. But MLX's CPU backend
has no BLAS for bfloat16/float16 (its half matmuls are 20-40x slower:
bench/results/dtype.md), so on a CPU `auto` keeps the memory-halving *storage* (weights,
boundaries, spill and stream files in the model's dtype) and *computes* in float32, and on a
GPU (Metal, CUDA) it computes in the model's dtype too. An explicit `--dtype bfloat16` or
`float16` computes in it everywhere; on a CPU its matmuls then run as float32 BLAS on the
exactly upcast operands (quant.matmul).

What stays float32 whatever the dtype: norm statistics (mx.fast.rms_norm accumulates in
float32), attention's softmax and log-sum-exp (attention.py), the final norm, the logits, the
loss and its log-sum-exp (loss.py), the LoRA weights (x·A·B runs in float32: its operands
promote), their gradients, the optimizer state.

`auto` follows the model's float weights that are not quantization parameters (norms, and
every weight of an unquantized model): bfloat16 for mlx-community INT4 folders (bf16 scales
and norms), float16 for fp16 ones, float32 for a GGUF file (llama.cpp keeps norms in F32 and
computes in F32; its F16 block scales are a storage format) and for float32 models.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
QUANT_PARAMS = (".scales", ".biases")  # quantization parameters: never cast


def dtype_name(dtype: mx.Dtype) -> str:
    return next((n for n, d in DTYPES.items() if d == dtype), str(dtype))


@dataclass(frozen=True)
class Precision:
    """A run's resolved --dtype (float32 / float32 is the behaviour before --dtype)."""

    storage: mx.Dtype = mx.float32  # frozen float weights, boundaries (RAM, spill), stream files
    compute: mx.Dtype = mx.float32  # activations inside a segment, its recompute, dL/dh
    why: str = ""  # how --dtype resolved, said in the startup line

    def describe(self) -> str:
        s, c = dtype_name(self.storage), dtype_name(self.compute)
        return f"dtype: weights and boundaries {s}, compute {c} ({self.why})"

    @property
    def checks_overflow(self) -> bool:
        """float16's range ends at 65504: a residual stream can overflow it (bfloat16 cannot)."""
        return mx.float16 in (self.storage, self.compute)


def model_dtype(model: nn.Module, params: list[tuple[str, mx.array]] | None = None) -> mx.Dtype:
    """The model's own float dtype: the most common among its float parameters (or `params`,
    e.g. only the frozen ones once LoRA is applied) that are not quantization scales/biases
    (by element count); the scales' dtype if there is none."""
    count: Counter = Counter()
    scales: Counter = Counter()
    for name, p in tree_flatten(model.parameters()) if params is None else params:
        if mx.issubdtype(p.dtype, mx.floating):
            (count if is_castable(name, p) else scales)[p.dtype] += p.size
    found = count or scales
    return found.most_common(1)[0][0] if found else mx.float32


def on_gpu() -> bool:
    """Whether MLX computes on a GPU (Metal, CUDA) here: half-precision kernels are fast."""
    return mx.default_device().type == mx.gpu


def resolve(choice: str, native: mx.Dtype, gpu: bool | None = None) -> Precision:
    """--dtype `choice` for a model whose own dtype is `native` (see the module docstring)."""
    if choice not in ("auto", *DTYPES):
        raise UserError(f"--dtype must be one of auto, {', '.join(DTYPES)} (got {choice!r})")
    if choice != "auto":
        return Precision(DTYPES[choice], DTYPES[choice], f"--dtype {choice}")
    name = dtype_name(native)
    if native not in (mx.bfloat16, mx.float16):
        return Precision(why=f"auto: the model's weights are {name}")
    gpu = on_gpu() if gpu is None else gpu
    if gpu:
        return Precision(native, native, f"auto: the model's weights are {name}, on a GPU")
    why = (
        f"auto: the model's weights are {name}; on a CPU {name} matmuls have no BLAS, so "
        f"activations compute in float32 (--dtype {name} forces it)"
    )
    return Precision(native, mx.float32, why)


def is_castable(name: str, p: mx.array) -> bool:
    """Whether --dtype's storage dtype applies to parameter `name`: a float weight that is not
    a quantization scale/bias."""
    return mx.issubdtype(p.dtype, mx.floating) and not name.endswith(QUANT_PARAMS)


def choices(native: mx.Dtype, gpu: bool | None = None) -> dict[str, Precision]:
    """The --dtype values the planner may pick for a model whose own dtype is `native`, each
    resolved, `auto` first, one value per distinct resolution: auto, float32 (a widening:
    exact), and the model's own half dtype (on a CPU: half-precision compute). The planner
    never narrows the weights below the model's own precision (bfloat16 for a float32 model,
    float16 for a bfloat16 one lose bits or range); --dtype does that when asked."""
    gpu = on_gpu() if gpu is None else gpu
    out: dict[str, Precision] = {}
    for name in ("auto", "float32", dtype_name(native)):
        if name not in ("auto", *DTYPES):
            continue
        p = resolve(name, native, gpu)
        if (p.storage, p.compute) not in {(q.storage, q.compute) for q in out.values()}:
            out[name] = p
    return out


def cast_weights(model: nn.Module, dtype: mx.Dtype) -> None:
    """Frozen float weights to `dtype` (lazily; quantization scales/biases and trainable
    parameters keep theirs)."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    cast = [
        (name, p.astype(dtype))
        for name, p in tree_flatten(model.parameters())
        if is_castable(name, p) and p.dtype != dtype and name not in trainable
    ]
    if cast:
        model.update(tree_unflatten(cast))


def check_finite(h: mx.array, where: str) -> None:
    """Refuse a float16 activation that overflowed (inf) or went NaN, with the fix."""
    if not mx.all(mx.isfinite(h)).item():
        raise UserError(
            f"--dtype float16: the activations overflowed float16's range (max 65504) {where}; "
            "use --dtype bfloat16 (same memory, float32's range) or float32"
        )
