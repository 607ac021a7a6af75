"""EMLoC's emulator: each target linear replaced by an activation-aware low-rank factorisation.

Paper: Lin et al., "EMLoC" (arXiv 2506.12015), as its public code builds it (see
/work/shared/methods.md). For W [out, in] and the calibration statistics H = sum X^T X of its
input, S = Q diag(sqrt(L)) from H = Q L Q^T; the SVD of W S truncated to rank r gives the
W' that minimises ||(W - W') X^T||_F (plain SVD minimises ||W - W'||_F, which ignores which
input directions the data uses). W' = W_u W_v with W_u = U_r sqrt(S_r) [out, r] and
W_v = sqrt(S_r) V_r^T diag(1/sqrt(L)) Q^T [r, in]; r = floor(ratio * in * out / (in + out)),
so the factors hold `ratio` of the weight's parameters.

Calibration runs the original model block by block on a sample of the user's rows, with the
block weights streamed from disk (stream.py): one block's weights, one block's XᵀX (the
down-projection's is intermediate^2 floats) and the rows' hidden states are in memory at once.
The factors are built per block right after its calibration, in float32 on the CPU stream
(MLX's eigh/svd run there), and saved, so a later run with the same model, data and ratio
reuses them. Inferred (not in the spec): on a quantized base the factors are quantized to the
base's bits (group 32, r rounded down to a multiple of 32), else stored in float16, so the
emulator is smaller than the base in either case; the LoRA correction uses the weight the
emulator really computes, so this rounding is corrected for too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from . import blocks, quant
from .errors import UserError

EIG_FLOOR = 1e-7  # the eigenvalues of H / f are clamped here before rescaling (as in the code)
GROUP = 32  # group size of quantized factors
FORMAT = 1  # bump when the cache file's layout or the factorisation changes
CALIB_CHUNK = 8  # rows per calibration forward
ATTN_CHUNK = 256  # query/key tile of the calibration forward's attention


def rank_for(in_dims: int, out_dims: int, ratio: float) -> int:
    """The rank whose factors hold `ratio` of W's in * out parameters."""
    return int(ratio * in_dims * out_dims / (in_dims + out_dims))


def aware_factors(w: mx.array, h: mx.array, rank: int) -> tuple[mx.array, mx.array]:
    """(W_u [out, r], W_v [r, in]) of the activation-aware SVD of W [out, in] under H [in, in].

    float32 LAPACK through numpy, and a thin SVD: MLX's CPU eigh/svd were ~6x slower here and
    its svd returns the full [out, out] U (1536 x 1536 for SmolLM2's gate/up), which made
    calibrating SmolLM2 take minutes per block (hours in all)."""
    w, h = _np32(w), _np32(h)
    f = max(float(np.trace(h)) / h.shape[0], 1e-30)
    lam, q = np.linalg.eigh(h / f)
    lam = np.maximum(lam, EIG_FLOOR) * f
    root = np.sqrt(lam)
    u, sig, vt = np.linalg.svd(w @ (q * root), full_matrices=False)  # W S, S = Q diag(sqrt(L))
    s = np.sqrt(sig[:rank])
    w_u = u[:, :rank] * s
    w_v = (s[:, None] * vt[:rank]) @ (q / root).T  # S^-1 = diag(1/sqrt(L)) Q^T
    return mx.array(w_u.astype(np.float32)), mx.array(w_v.astype(np.float32))


def plain_factors(w: mx.array, rank: int) -> tuple[mx.array, mx.array]:
    """The same split of a plain truncated SVD of W: the reference the aware one must beat."""
    u, sig, vt = np.linalg.svd(_np32(w), full_matrices=False)
    s = np.sqrt(sig[:rank])
    return mx.array((u[:, :rank] * s).astype(np.float32)), mx.array(s[:, None] * vt[:rank])


def _np32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float32)


class EmulatorLinear(nn.Module):
    """y = up(down(x)): a linear's low-rank emulation (down: in -> r, up: r -> out, + bias)."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down, self.up = down, up

    def __call__(self, x: mx.array) -> mx.array:
        return self.up(self.down(x))

    def dense_weight(self) -> mx.array:
        """The [out, in] float32 weight this layer computes (for the LoRA correction)."""
        return dense_weight(self.up) @ dense_weight(self.down)

    def to_lora(self, r: int, scale: float, dropout: float) -> nn.Module:
        """mlx-lm's hook: LoRA (x A B) around the emulator, as around any linear."""
        from mlx_lm.tuner.lora import LoRALinear

        out_dims, in_dims = self.up_shape[0], self.down_shape[1]
        lora = LoRALinear(in_dims, out_dims, r=r, dropout=dropout, scale=scale)
        lora.linear = self
        return lora

    @property
    def down_shape(self) -> tuple[int, int]:
        return linear_shape(self.down)

    @property
    def up_shape(self) -> tuple[int, int]:
        return linear_shape(self.up)


def linear_shape(linear: nn.Module) -> tuple[int, int]:
    out, inp = linear.weight.shape
    return (out, inp * 32 // linear.bits) if isinstance(linear, nn.QuantizedLinear) else (out, inp)


def dense_weight(linear: nn.Module) -> mx.array:
    """The float32 [out, in] weight of an nn.Linear, a quantized one or an EmulatorLinear."""
    if isinstance(linear, EmulatorLinear):
        return linear.dense_weight()
    if isinstance(linear, nn.QuantizedLinear):
        return quant.dequantize(
            linear.weight, linear.scales, linear.get("biases"), *quant_format(linear)
        )
    return linear.weight.astype(mx.float32)


def quant_format(linear: nn.Module) -> tuple[int, int, str]:
    return linear.group_size, linear.bits, linear.mode


def emulate(linear: nn.Module, h: mx.array, ratio: float) -> EmulatorLinear | None:
    """The emulator of `linear` under calibration H, or None where low rank would not save."""
    w = dense_weight(linear)
    rank = emulator_rank(linear, ratio)
    if rank is None:
        return None
    w_u, w_v = aware_factors(w, h, rank)
    return make_layer(w_u, w_v, linear.get("bias"), linear.bits if _quantized(linear) else None)


def _quantized(linear: nn.Module) -> bool:
    return isinstance(linear, nn.QuantizedLinear)


def emulator_rank(linear: nn.Module, ratio: float) -> int | None:
    """rank_for the linear's shape (a multiple of GROUP on a quantized base), or None where
    the factors would not be smaller than W."""
    out_dims, in_dims = linear_shape(linear)
    rank = rank_for(in_dims, out_dims, ratio)
    if _quantized(linear):
        rank = rank // GROUP * GROUP
    if rank < 1 or rank >= min(in_dims, out_dims) or (_quantized(linear) and in_dims % GROUP):
        return None
    return rank


def make_layer(w_u: mx.array, w_v: mx.array, bias: mx.array | None, bits: int | None):
    """An EmulatorLinear from factors: quantized to `bits` (group GROUP), else float16."""
    (rank, in_dims), out_dims = w_v.shape, w_u.shape[0]
    down = nn.Linear(in_dims, rank, bias=False)
    up = nn.Linear(rank, out_dims, bias=bias is not None)
    down.weight, up.weight = w_v, w_u
    if bias is not None:
        up.bias = bias
    if bits:
        down, up = (nn.QuantizedLinear.from_linear(m, GROUP, bits) for m in (down, up))
    else:
        down.weight, up.weight = w_v.astype(mx.float16), w_u.astype(mx.float16)
    layer = EmulatorLinear(down, up)
    mx.eval(layer.parameters())
    return layer


# ----------------------------------------------------------------------------- calibration


class _Recorder(nn.Module):
    """Runs a linear and adds X^T X of its (weighted) input into `acc[name]`."""

    def __init__(self, linear: nn.Module, name: str, acc: dict, weights: list):
        super().__init__()
        self.linear = linear
        self._name, self._acc, self._weights = name, acc, weights  # plain Python state

    def __call__(self, x: mx.array) -> mx.array:
        xw = x.astype(mx.float32) * self._weights[0][..., None]  # padding rows -> 0
        flat = xw.reshape(-1, x.shape[-1])  # [B*L, in]
        prev = self._acc.get(self._name)
        self._acc[self._name] = flat.T @ flat if prev is None else prev + flat.T @ flat
        return self.linear(x)


def calibration_batches(rows: list, last_is_final: bool) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [N, L], weights [N, L]): 1 for real tokens, 0 for the final row's padding.

    Packing pads only the last row of the data, after its last trainable token.
    """
    tokens = np.stack([t[:-1] for t, _ in rows]).astype(np.int32)
    weights = np.ones(tokens.shape, np.float32)
    if last_is_final:
        mask = np.asarray(rows[-1][1][1:])
        real = int(np.flatnonzero(mask).max()) + 1 if mask.any() else tokens.shape[1]
        weights[-1, real:] = 0
    return tokens, weights


def build(model: nn.Module, tokens: np.ndarray, weights: np.ndarray, ratio: float, keys, out):
    """Calibrate block by block (weights streamed) and return {path: EmulatorLinear}.

    The last block's down-projection stays uncompressed, as in the authors' code.
    """
    from .stream import WeightStream

    quant.prepare_for_training(model)
    layers = blocks.layers(model)
    h = mx.concatenate(
        [blocks.embed(model, mx.array(tokens[s : s + CALIB_CHUNK])) for s in _chunks(tokens)]
    )
    mx.eval(h)
    built: dict[str, EmulatorLinear] = {}
    with WeightStream(model, None, out) as stream:
        stream.offload()
        for i, layer in enumerate(layers):
            skip = {"mlp.down_proj"} if i == len(layers) - 1 else set()
            with stream.resident(i):
                keep = [k for k in keys if k not in skip]
                h, stats = _calibrate_block(model, i, h, weights, keep)
                for key, hk in stats.items():
                    emu = emulate(_module(layer, key), hk, ratio)
                    if emu is not None:
                        built[f"{blocks.layers_path(model)}.{i}.{key}"] = emu
                del stats
            print(f"emulator: block {i + 1}/{len(layers)}", file=sys.stderr)
        stream.restore()
    return built


def _chunks(tokens: np.ndarray) -> range:
    return range(0, tokens.shape[0], CALIB_CHUNK)


def _module(layer: nn.Module, key: str) -> nn.Module:
    return dict(layer.named_modules())[key]


def _calibrate_block(model, i: int, h: mx.array, weights: np.ndarray, keys):
    """Run original block i over all rows (CALIB_CHUNK at a time): (output, {key: X^T X})."""
    layer = blocks.layers(model)[i]
    acc: dict[str, mx.array] = {}
    current: list = [None]
    originals = [(k, _module(layer, k)) for k in keys]
    layer.update_modules(tree_unflatten([(k, _Recorder(m, k, acc, current)) for k, m in originals]))
    try:
        outs = []
        for s in _chunks(weights):
            current[0] = mx.array(weights[s : s + CALIB_CHUNK])
            # chunked attention: no [rows, heads, L, L] scores at long rows
            outs.append(blocks.block_forward(model, i, h[s : s + CALIB_CHUNK], ATTN_CHUNK, 0))
            mx.eval(outs[-1], list(acc.values()))
    finally:
        layer.update_modules(tree_unflatten(originals))
    return mx.concatenate(outs), acc


# ----------------------------------------------------------------------------- cache


def fingerprint(source: str, quantize: int | None, tokens: np.ndarray, ratio, keys) -> str:
    """Cache key: the model files' identity, the calibration tokens, ratio, keys, format."""
    h = hashlib.sha256(json.dumps([FORMAT, ratio, sorted(keys), quantize]).encode())
    p = Path(source)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.exists() else []
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    if not files:
        h.update(source.encode())  # a Hugging Face id
    h.update(tokens.tobytes())
    return h.hexdigest()[:24]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """cache_dir, else $EDGELORA_CACHE/emloc, else ~/.cache/mlx_edgelora/emloc."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("EDGELORA_CACHE")
    return Path(root) / "emloc" if root else Path.home() / ".cache/mlx_edgelora/emloc"


def save(path: Path, built: dict[str, EmulatorLinear]) -> None:
    """One safetensors file: every factor's arrays + each layer's format in the metadata."""
    arrays = {f"{p}.{k}": v for p, m in built.items() for k, v in tree_flatten(m.parameters())}
    meta = {p: json.dumps(_layer_meta(m)) for p, m in built.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    os.replace(tmp, path)


def _layer_meta(m: EmulatorLinear) -> dict:
    bits = m.down.bits if isinstance(m.down, nn.QuantizedLinear) else None
    return {"in": m.down_shape[1], "rank": m.down_shape[0], "out": m.up_shape[0], "bits": bits}


def load(path: Path) -> dict[str, EmulatorLinear]:
    """The emulator layers saved by `save`."""
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: unreadable emulator file ({e}); delete it to rebuild") from None
    built = {}
    for p, text in meta.items():
        m = json.loads(text)
        bias = f"{p}.up.bias" in arrays
        down, up = nn.Linear(m["in"], m["rank"], bias=False), nn.Linear(m["rank"], m["out"], bias)
        if m["bits"]:
            down, up = (nn.QuantizedLinear.from_linear(x, GROUP, m["bits"]) for x in (down, up))
        layer = EmulatorLinear(down, up)
        layer.load_weights(
            [(k[len(p) + 1 :], v) for k, v in arrays.items() if k.startswith(p + ".")]
        )
        built[p] = layer
    mx.eval([m.parameters() for m in built.values()])
    return built


def install(model: nn.Module, built: dict[str, EmulatorLinear]) -> None:
    """Swap the model's linears for their emulators (the originals are then freed)."""
    model.update_modules(tree_unflatten(list(built.items())))
