"""The memory plan: an up-front estimate of a training step's peak (and its disk use).

Why: on a laptop an out-of-memory step takes the whole machine down (swap storm), so the
trainer estimates the peak from the model's shapes and the options before it starts, prints
it, and the planner (planner.py) picks the configuration to run from these estimates.
The per-token constants below were fitted to `mx.get_peak_memory()` measurements on MLX's CPU
backend (SmolLM2-135M, random Qwen2.5-0.5B and Llama-3.2-3B shapes, tiny models: see
bench/plan_accuracy.py and tests/test_plan.py); the planner trusts the estimate to be never
under the peak and at most 15% over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from . import blocks, quant
from .config import TrainConfig
from .loss import head_rows, vocab_tile
from .models import Shape
from .precision import Precision, is_castable, model_dtype

GB = 1024**3
F32 = 4
# Floats kept per token by one block's autodiff graph (inputs of norms, projections, LoRA,
# residuals), as multiples of the hidden size D, the KV width and the MLP width I; the
# attention half keeps ATTN_PER_D of the D multiples, the MLP half the rest. The same holds
# for LARS: its gate's VJP keeps only the projection's input x (lars.py), which these count
# already; it drops LoRA's r-wide x A, and its [.., d] temporaries (the gated input, dz, dx)
# live no longer than LoRA's own (tests/test_plan.py measures both).
ACT_PER_D, ACT_PER_KV, ACT_PER_I = 10, 4, 4
ATTN_PER_D = 6
# The segment engine's recompute of a split block's attention half (attn_half.py: one custom
# function over query chunks) holds whole only x, its cotangent and dx ([L, D] in the compute
# dtype), k and v ([L, kv], compute dtype) and their float32 gradients, which the walk over
# query chunks (last to first) frees key chunk by key chunk (counted as one [L, kv]); per query
# chunk c, ATTN_TILES [H, c, c] float32 score tiles and ATTN_CHUNK_ROWS [c, D] float32 arrays
# (q, o, do, dq, the projections' recompute). Fitted to the Llama-3.2-3B shape
# (bench/results/long_context.md: 0.163 / 0.237 GB above x and the cotangent at 4096 / 8192
# tokens, so 19 KB per token and 0.090 GB per chunk; the plan 1.15x / 1.19x) and a tiny model
# at 4096 tokens (tests/test_attn_half.py). Before, the separate custom functions held ~9
# [L, D] (0.383 GB at 4096; the old terms: 6 D + 4 kv per token and [H, L, chunk] scores).
ATTN_HALF_PER_D, ATTN_TILES, ATTN_CHUNK_ROWS = 3, 8, 16
# The MLP half's recompute (engine.SegmentStep._vjp_by_rows: one VJP per token chunk,
# evaluated in turn) holds MLP_HALF_PER_D [L, D] (x, the cotangent, dx written in place) and,
# for one token chunk, RECOMPUTE_PER_I [chunk, I] arrays (gate, up and their products and
# gradients, and the dequantized weight tiles). Fitted as above: 0.162 GB above x and the
# cotangent at 4096 tokens, the plan 1.06x (bench/results/long_context.md). Before: 4 [L, D]
# (tokenwise.py's custom VJP computed every chunk's dx ahead of their writes), and 6 before it.
# Segments of more than one unit (whole blocks, --checkpoint-every > 1) still run the MLP
# through tokenwise.py's VJP: MLP_TOKENWISE_PER_D.
MLP_HALF_PER_D, MLP_TOKENWISE_PER_D = 3, 4
RECOMPUTE_PER_I = 16
# A whole block's recompute (--no-split-blocks) runs its MLP half's VJP while the attention
# half's custom functions keep their inputs and outputs (x, q, k, v, the attention output:
# about 4 [L, D] + 2 [L, kv]), then the attention half's VJP: the larger of the two. Fitted:
# SmolLM2 (6 blocks) at 2048 tokens and the Qwen2.5-0.5B shape (4 blocks) at 512 (the sum of
# both halves was 1.28x SmolLM2's peak).
KEPT_ATTN_PER_D, KEPT_ATTN_PER_KV = 4, 2
# With --cache-policy last the last segment runs inside the loss head's graph: the head's and
# the segment's weights are alive together, its forward keeps only its custom functions' inputs
# and outputs through the head (per block x, q, k, v, the attention output, o_proj's output,
# the MLP's input and output: about 6 [L, D] + 2 [L, kv]), and its backward recomputes inside
# those functions' VJPs as a whole block does (_whole_block_recompute; a split last half
# measured as much). Fitted: SmolLM2 (6 blocks, 512 tokens) and the Qwen2.5-0.5B shape (4 blocks,
# 512 tokens) at 1.08x and 1.02x (bench/results/plan_accuracy.md); with plain autodiff the
# cached segment was a whole block's graph activations.
CACHED_PER_D, CACHED_PER_KV = 6, 2
# The loss head's working memory (logit tiles, dequantized head tiles, the input and its
# gradient) was 1.27x these terms in the Qwen2.5-0.5B trainer row (512 tokens, its peak phase)
HEAD_FIT = 1.35
# The tiled chunked head (LossHead.value_and_grad, run when the head is alone in the loss
# segment) holds h and dL/dh [tokens, D] in the compute dtype, and for one block of rows
# (loss.head_rows) TILED_HEAD_PER_ROW_D [rows, D] float32 arrays: the rows of h, the head's
# input x, dL/dx and its next partial sum, the targets' head rows, the final norm's VJP and
# the block's dL/dh rows; and its tiles. Fitted: the Llama-3.2-3B shape at 4096 tokens (1365-row
# blocks: 8.4 arrays; bench/results/long_context.md). Before the row blocks every row was in
# one block (6.5 arrays on the same shape at 2048 rows, h included).
TILED_HEAD_PER_ROW_D = 9
# The chunked exact head under autodiff (the graph engine, --cache-policy last) recomputes
# each vocabulary tile in its own VJP: per row one logits tile row and two [D] rows (the input
# and its gradient), plus ~4.4 dequantized [tile, D] weight tiles in flight. Fitted (before
# the tiled head) to SmolLM2 (6 blocks) at 512 and 2048 tokens (58.5 and 76.7 MB measured for
# the head phase, weights included) and checked on
# the Qwen2.5-0.5B shape at 512 and the Llama-3.2-3B cells (bench/results/plan_accuracy.md);
# the terms above (fitted before the head had its own VJP) were 2.2x SmolLM2's at 2048 tokens.
CHUNKED_HEAD = {"per_row_cols": 1, "per_row_D": 2, "weight_tiles": 4.4, "fit": 1.2}
OPT_COPIES = 5  # LoRA weight + gradient + accumulated gradient + AdamW m and v
# --stream-state: one unit's state is in memory at a time; its update holds the old and new
# weight, m and v and the gradient sum
STREAMED_OPT_COPIES = 7
DISK_BOUNDARIES_IN_MEMORY = 3  # --activations disk: one being written, one in use, one prefetched
# ... while a segment's recompute runs, only one: the boundary read back is freed once cast to
# the compute dtype (x, counted in the recompute) and the next one is prefetched into host
# memory (counted here). Measured on a tiny model's whole step (tests/test_engine.py): at each
# backward unit's start only its cotangent and its stored boundary are alive.
DISK_BOUNDARIES_IN_RECOMPUTE = 1
# --keep-attention: each attention half's output o [tokens, q] (compute dtype) and
# log-sum-exp [tokens, H] (float32) are stored with the boundaries: all of them in RAM, or on
# disk with two segments' worth in memory (the one whose recompute reads them, the one
# prefetched); with half-block segments one attention half's (an MLP half's segment, which
# keeps none, is always in use or prefetched beside it)


@dataclass
class MemoryPlan:
    """Estimated peak memory of one training step, by part (GB)."""

    parts: dict[str, float] = field(default_factory=dict)
    ranks: int = 1  # data-parallel processes (Macs); every figure is one rank's
    global_batch: str = ""  # what one optimizer step trains on, over all ranks

    @property
    def total_gb(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        rows = [f"  {name:<22} {gb:7.3f} GB" for name, gb in self.parts.items()]
        who = f"per rank, {self.ranks} ranks" if self.ranks > 1 else "one process"
        head = f"memory plan (estimated peak, {who}; global batch {self.global_batch}):"
        return "\n".join([head, *rows, f"  {'total':<22} {self.total_gb:7.3f} GB"])


@dataclass(frozen=True)
class ModelSizes:
    """What the plan needs from a model, measured once (the planner estimates many configs)."""

    shape: Shape
    frozen: int  # bytes of every frozen parameter
    block_frozen: tuple[int, ...]  # bytes of each block's frozen parameters
    # elements of the frozen float weights --dtype casts (precision.cast_weights: not the
    # quantization scales/biases), whole model and per block, so that the planner sizes each
    # --dtype's storage without casting (and their bytes as held now)
    castable: tuple[int, int] = (0, 0)  # (bytes, elements)
    block_castable: tuple[tuple[int, int], ...] = ()
    native: mx.Dtype = mx.float32  # the model's own float dtype (precision.model_dtype)

    def stored_as(self, dtype: mx.Dtype) -> ModelSizes:
        """These sizes after precision.cast_weights(model, dtype)."""

        def cast(total: int, c: tuple[int, int]) -> int:
            return total - c[0] + c[1] * dtype.size

        per_block = self.block_castable or ((0, 0),) * len(self.block_frozen)
        return replace(
            self,
            frozen=cast(self.frozen, self.castable),
            block_frozen=tuple(cast(b, c) for b, c in zip(self.block_frozen, per_block)),
            castable=(self.castable[1] * dtype.size, self.castable[1]),
            block_castable=tuple((c[1] * dtype.size, c[1]) for c in per_block),
        )


def sizes(model: nn.Module | ModelSizes) -> ModelSizes:
    if isinstance(model, ModelSizes):
        return model
    layers = blocks.layers(model)
    return ModelSizes(
        blocks.shape(model),
        _frozen_bytes(model),
        tuple(_frozen_bytes(layer) for layer in layers),
        _castable(model),
        tuple(_castable(layer) for layer in layers),
        model_dtype(model, _frozen(model)),  # not the LoRA weights' float32
    )


def _frozen(module: nn.Module) -> list[tuple[str, mx.array]]:
    trainable = {k for k, _ in tree_flatten(module.trainable_parameters())}
    return [(k, v) for k, v in tree_flatten(module.parameters()) if k not in trainable]


def _frozen_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in _frozen(module))


def _castable(module: nn.Module) -> tuple[int, int]:
    cast = [v for k, v in _frozen(module) if is_castable(k, v)]
    return sum(v.nbytes for v in cast), sum(v.size for v in cast)


def _lora_bytes(cfg: TrainConfig, s: Shape) -> int:
    """fp32 bytes of the adapter weights the config will create (whether applied yet or not):
    LoRA A [in, r] + B [r, out]; LARS U [in, r] + V [r, in / block] + alpha per projection."""
    n = s.n_layers if cfg.num_layers < 0 else min(cfg.num_layers, s.n_layers)
    if cfg.adapter == "lars":
        widths = [s.input_widths().get(k, s.D) for k in cfg.lora_keys]
        per_block = sum(cfg.rank * (d + d // cfg.lars_block) + 1 for d in widths)
    else:
        io = s.lora_io()
        per_block = cfg.rank * sum(io.get(k, 2 * s.D) for k in cfg.lora_keys)
    return n * per_block * F32


def _segment_blocks(cfg: TrainConfig) -> int:
    """The most blocks one segment touches (k halves can straddle k // 2 + 1 blocks)."""
    k = cfg.checkpoint_every
    return k // 2 + 1 if cfg.split_blocks else k


def _weights_gb(m: ModelSizes, cfg: TrainConfig) -> float:
    total = m.frozen
    if cfg.stream_weights and cfg.engine == "segments":
        total = total - sum(m.block_frozen) + _segment_blocks(cfg) * max(m.block_frozen)
    return total / GB


def _half_activations(
    s: Shape, tokens: int, cfg: TrainConfig, chunked: bool, act: int = F32, by_rows=False
) -> dict:
    """Bytes each half of one block's autodiff graph holds for `tokens` tokens, with
    activations of `act` bytes (--dtype's compute dtype; attention scores stay float32);
    `by_rows`: the MLP half is a segment of its own (engine.SegmentStep._vjp_by_rows)."""
    attn_cols = min(cfg.attn_chunk, tokens) if chunked and cfg.attn_chunk else tokens
    scores = cfg.batch_size * s.H * (tokens // cfg.batch_size) * attn_cols * F32 * 2
    mlp_rows = min(cfg.mlp_chunk, tokens) if chunked and cfg.mlp_chunk else tokens
    attn = tokens * (ATTN_PER_D * s.D + ACT_PER_KV * s.kv) * act + scores
    mlp = tokens * (ACT_PER_D - ATTN_PER_D) * s.D * act
    if not chunked:  # the graph engine's autodiff (the constants above were fitted to it)
        return {"attn": attn, "mlp": mlp + mlp_rows * ACT_PER_I * s.I * act}
    c = min(cfg.attn_chunk, tokens) if cfg.attn_chunk else tokens
    attn = tokens * ((ATTN_HALF_PER_D * s.D + 2 * s.kv) * act + s.kv * F32)
    attn += (ATTN_TILES * s.H * c * c + ATTN_CHUNK_ROWS * c * s.D) * F32 * cfg.batch_size
    per_d = MLP_HALF_PER_D if by_rows and 0 < cfg.mlp_chunk < tokens else MLP_TOKENWISE_PER_D
    mlp = tokens * per_d * s.D * act + mlp_rows * RECOMPUTE_PER_I * s.I * act
    # the segment engine's dequantize_once scope: small weights' float32 copies (quant.py)
    attn += quant.once_bytes([(s.q, s.D), (s.kv, s.D), (s.kv, s.D), (s.D, s.q)])
    mlp += quant.once_bytes([(s.I, s.D), (s.I, s.D), (s.D, s.I)])
    return {"attn": attn, "mlp": mlp}


def _block_activations(
    s: Shape, tokens: int, cfg: TrainConfig, chunked: bool, act: int = F32
) -> float:
    """Bytes one block's autodiff graph holds for `tokens` tokens."""
    return sum(_half_activations(s, tokens, cfg, chunked, act).values())


def _whole_block_recompute(s: Shape, tokens: int, cfg: TrainConfig, act: int) -> float:
    """Bytes one whole block's recompute holds: its MLP half's VJP next to what the attention
    half keeps, or the attention half's VJP."""
    h = _half_activations(s, tokens, cfg, True, act)
    kept = tokens * (KEPT_ATTN_PER_D * s.D + KEPT_ATTN_PER_KV * s.kv) * act
    return max(h["attn"], h["mlp"] + kept)


def _segment_activations(s: Shape, tokens: int, cfg: TrainConfig, act: int = F32) -> float:
    """Bytes one checkpoint segment's recompute holds: k blocks, or k alternating halves."""
    k = cfg.checkpoint_every
    if not cfg.split_blocks:
        return k * _whole_block_recompute(s, tokens, cfg, act)
    by_rows = k == 1  # one half per segment
    halves = _half_activations(s, tokens, cfg, True, act, by_rows)
    big, small = sorted(halves.values(), reverse=True)
    return -(-k // 2) * big + k // 2 * small


def _tiled_head(cfg: TrainConfig) -> bool:
    """Whether the segment engine runs the loss head tile by tile (engine._tiled_loss): the
    exact chunked CE, alone in the loss segment."""
    return cfg.engine == "segments" and cfg.loss == "chunked" and cfg.cache_policy == "none"


def _loss_head_bytes(
    s: Shape, rows: int, cfg: TrainConfig, tokens: int = 0, act: int = F32
) -> float:
    """Bytes of the loss head's phase for `rows` trainable rows of `tokens` (default rows)."""
    tile = min(vocab_tile(cfg.vocab_chunk, s.D), s.V)
    if _tiled_head(cfg):
        return _tiled_head_bytes(s, rows, tile) + 2 * (tokens or rows) * s.D * act
    if cfg.loss == "full":  # autodiff over [rows, V] logits; the kernel dequantizes tiles
        return (rows * s.V * 3 + tile * s.D * 2 + rows * s.D * 4) * F32 * HEAD_FIT
    if cfg.loss == "chunked":  # under autodiff: at least what the tiled head holds
        return max(_chunked_head_bytes(s, rows, tile), _tiled_head_bytes(s, rows, tile, False))
    # subset: autodiff over [rows, k] logits and the k gathered head rows; the predicted and
    # sampled fills first score every vocabulary tile without gradient (at most the chunked
    # head's pass), then differentiate the k columns
    k = min(cfg.subset_k, s.V)
    own = (rows * (k * 3 + s.D * 2) + k * s.D * 2) * F32 * HEAD_FIT
    if cfg.subset_fill in ("predicted", "sampled"):
        return max(own, _chunked_head_bytes(s, rows, tile))
    return own


def _tiled_head_bytes(s: Shape, rows: int, tile: int, blocks: bool = True) -> float:
    """One block of rows (`blocks`: loss.head_rows, else all rows), one tile of logits and of
    the head at a time, twice (read + use)."""
    rows = min(rows, head_rows(s.D)) if blocks else rows
    return (rows * s.D * TILED_HEAD_PER_ROW_D + 2 * rows * tile + 2 * tile * s.D) * F32


def _chunked_head_bytes(s: Shape, rows: int, tile: int) -> float:
    h = CHUNKED_HEAD
    per_row = rows * (tile * h["per_row_cols"] + s.D * h["per_row_D"])
    return (per_row + h["weight_tiles"] * tile * s.D) * F32 * h["fit"]


def estimate(
    model: nn.Module | ModelSizes,
    cfg: TrainConfig,
    trainable_fraction: float = 1.0,
    token_bytes: int = 0,
    ranks: int = 1,
    precision: Precision | None = None,
) -> MemoryPlan:
    """Estimate the peak of one step for `model` (LoRA applied or not; or its `sizes`) under
    `cfg`, on each of `ranks` data-parallel processes (each holds the whole model and its own
    micro-batch).

    The segment engine's step has two phases that never overlap: the loss head (with
    streamed weights, the embedding/head weights are loaded only for it) and one segment's
    recompute (its blocks' weights loaded only for it). The peak is what the whole step holds
    plus the larger phase, which is the part named "(peak phase)".

    `token_bytes`: host memory of the packed token rows (Dataset.token_bytes()), resident for
    the whole run; on a Mac it shares the same unified memory as the step.
    `precision` (--dtype): boundaries count in its storage dtype, activations in its compute
    dtype (default float32 for both); the weights are counted as the model holds them.
    """
    precision = precision or Precision()
    act = precision.compute.size
    m = sizes(model)
    s = m.shape
    tokens = cfg.batch_size * cfg.max_seq_len
    rows = max(1, int(tokens * trainable_fraction))
    streamed = bool(cfg.stream_weights) and cfg.engine == "segments"
    parts = {"weights (resident)": (0 if streamed else m.frozen) / GB}
    parts["LoRA + optimizer"] = _optimizer_bytes(cfg, s) / GB
    head = _loss_head_bytes(s, rows, cfg, tokens, act)
    if cfg.engine == "graph":
        parts["activations"] = s.n_layers * _block_activations(s, tokens, cfg, False, act) / GB
        parts["loss head"] = head / GB
    else:
        n_units = s.n_layers * (2 if cfg.split_blocks else 1)
        n_seg = -(-n_units // cfg.checkpoint_every)
        boundary = tokens * s.D * precision.storage.size
        ram = cfg.activations == "ram"
        stored = {  # boundaries in memory during each phase
            "segment recompute": n_seg if ram else min(DISK_BOUNDARIES_IN_RECOMPUTE, n_seg),
            "loss head": n_seg if ram else min(DISK_BOUNDARIES_IN_MEMORY, n_seg),
        }
        if _keeps_attention(cfg):
            n = s.n_layers
            if cfg.activations == "disk":
                one = cfg.split_blocks and cfg.checkpoint_every == 1
                n = min(n, 1 if one else 2 * _segment_blocks(cfg))
            parts["kept attention outputs"] = n * _kept_attention_bytes(s, tokens, act) / GB
        segment = _segment_activations(s, tokens, cfg, act)
        segment_w = _segment_blocks(cfg) * max(m.block_frozen) if streamed else 0
        # a streamed head is loaded whole for the loss, unless read tile by tile from disk
        head_w = m.frozen - sum(m.block_frozen) if streamed and not _tiled_head(cfg) else 0
        phases = {
            "segment recompute": segment + segment_w,
            "loss head": head + head_w,
        }
        if cfg.cache_policy == "last":  # the last segment's graph is alive with the loss head
            n = _segment_blocks(cfg)
            kept = n * tokens * (CACHED_PER_D * s.D + CACHED_PER_KV * s.kv) * act
            recomputed = n * _whole_block_recompute(s, tokens, cfg, act)
            phases["loss head"] = head_w + segment_w + max(head + kept, recomputed)
        name = max(phases, key=lambda k: phases[k] + stored[k] * boundary)
        parts["segment boundaries"] = stored[name] * boundary / GB
        parts[f"{name} (peak phase)"] = phases[name] / GB
    if token_bytes:
        parts["token store"] = token_bytes / GB
    seqs = ranks * cfg.batch_size * cfg.grad_accum
    batch = f"{seqs} sequences of {cfg.max_seq_len} tokens"
    if ranks > 1 or cfg.grad_accum > 1:
        batch += (
            f" = {ranks} rank(s) x --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"
        )
    return MemoryPlan(parts, ranks, batch)


def _keeps_attention(cfg: TrainConfig) -> bool:
    """Whether the forward keeps attention outputs: only the chunked attention half does."""
    return cfg.keep_attention and 0 < cfg.attn_chunk < cfg.max_seq_len


def _kept_attention_bytes(s: Shape, tokens: int, act: int) -> int:
    """One attention half's kept o and log-sum-exp (attn_half.record)."""
    return tokens * (s.q * act + s.H * F32)


def _optimizer_bytes(cfg: TrainConfig, s: Shape) -> float:
    """LoRA weights, gradients and AdamW state: all blocks', or with --stream-state only the
    running segment's units (state.py)."""
    if cfg.stream_state and cfg.engine == "segments":
        n = s.n_layers if cfg.num_layers < 0 else min(cfg.num_layers, s.n_layers)
        per_block = _lora_bytes(cfg, s) / max(n, 1)
        return per_block * _segment_blocks(cfg) * STREAMED_OPT_COPIES
    return _lora_bytes(cfg, s) * OPT_COPIES


def disk_bytes(
    model: nn.Module | ModelSizes, cfg: TrainConfig, precision: Precision | None = None
) -> int:
    """Bytes a run keeps on the --spill-dir disk (default: beside --out): spilled boundaries,
    streamed frozen weights and streamed LoRA state (the stores each check their own share
    as they start; the planner checks the sum before anything is written)."""
    if cfg.engine != "segments":
        return 0
    storage = (precision or Precision()).storage.size
    m = sizes(model)
    s, total = m.shape, 0
    if cfg.activations == "disk":
        n_units = s.n_layers * (2 if cfg.split_blocks else 1)
        tokens = cfg.batch_size * cfg.max_seq_len
        total += -(-n_units // cfg.checkpoint_every) * tokens * s.D * storage
        if _keeps_attention(cfg):
            act = (precision or Precision()).compute.size
            total += s.n_layers * _kept_attention_bytes(s, tokens, act)
    if cfg.stream_weights:
        total += m.frozen  # every block, and the embedding/head
    if cfg.stream_state:
        total += 5 * _lora_bytes(cfg, s)  # weights, m, v, gradient sum, a file being replaced
    return total
