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
# The segment engine's recompute terms count what each phase allocates beyond the boundaries
# (the recompute's input x is one: counted with them, or as the boundary read back from disk)
# by shape, so that they hold across D = 576 (SmolLM2), 896 (Qwen2.5-0.5B), 2048 (Qwen2.5-3B)
# and 3072 (Llama-3.2-3B). Fitted to each phase's own peak: bench/plan_accuracy.py --phases
# (whole optimizer steps, every phase's peak) and one half's VJP alone on each real shape.
# A split block's attention half (attn_half.py: one custom function over query chunks) holds
# whole the cotangent and dx (ATTN_HALF_PER_D [L, D], compute dtype), k and v ([L, kv],
# compute dtype) and their float32 gradients (ATTN_KV_GRADS [L, kv]: the walk over query
# chunks, last to first, frees them key chunk by key chunk); per query chunk c, ATTN_TILES
# [H, c, c] float32 score tiles and ATTN_CHUNK_ROWS [c, D] float32 arrays (q, o, do, dq, the
# projections' recompute). Measured: SmolLM2 0.043 GB (plan 1.01x), Llama-3.2-3B 0.201 GB
# (1.02x), whole steps at 2048 tokens. Before: 3 [L, D] (x counted again), 8 tiles, 16 rows.
ATTN_HALF_PER_D, ATTN_TILES, ATTN_CHUNK_ROWS = 2, 6, 9
ATTN_KV_GRADS = 2
# The MLP half (tokenwise.py, residual inside its custom VJP) holds MLP_HALF_PER_D [L, D] (the
# cotangent and dx) and, for one token chunk, RECOMPUTE_PER_I [chunk, I] arrays (gate, up
# and their products and gradients, and the dequantized weight tiles, each [chunk, I] at
# quant.tile_bytes). Measured above dx: 14.1-15.5 [chunk, I] in whole steps (SmolLM2,
# Qwen2.5-0.5B, Llama-3.2-3B shapes), 15.7-17.3 for the half alone on resident weights
# quantized by mlx (a tiny model: 16.3); Qwen2.5-3B's shape measured 18.2 that way.
# The MLP half as a segment of its own runs its backward by rows (engine.SegmentStep.
# _vjp_by_rows: one evaluated VJP per token chunk, dx written in place); segments of more
# than one unit (whole blocks, --checkpoint-every > 1) run it through tokenwise.py's VJP,
# which computes the chunks' dx ahead of their writes: MLP_TOKENWISE_PER_D (the Qwen2.5-0.5B
# shape's whole block at 512 tokens measured 1.002x with 3).
MLP_HALF_PER_D, MLP_TOKENWISE_PER_D = 2, 3.5
RECOMPUTE_PER_I = 16.5
RECOMPUTE_BY_ROWS_PER_I = 15.5  # by rows (_vjp_by_rows): Llama-3.2-3B 2048 was 1.17x with 16.5
# A segment's recompute runs its units' VJPs last to first, each while the units before it
# keep their custom functions' inputs and outputs (an attention half: x, q, k, v, the
# attention output: about KEPT_ATTN_PER_D [L, D] + KEPT_ATTN_PER_KV [L, kv]; an MLP half:
# its input and output): the peak is the largest VJP plus what the units before it keep. A
# whole block (--no-split-blocks) is its two halves so, and --checkpoint-every 2 with split
# blocks measured as much as a whole block (SmolLM2, 512 and 2048 tokens). Fitted: SmolLM2
# (6 blocks) at 2048 tokens and the Qwen2.5-0.5B shape (4 blocks) at 512. Before, k units
# counted k whole VJPs: 1.4-1.8x SmolLM2's peak at --checkpoint-every 2.
KEPT_ATTN_PER_D, KEPT_ATTN_PER_KV, KEPT_MLP_PER_D = 3.5, 1, 2
# With --cache-policy last the last segment runs inside the loss head's graph: the head's and
# the segment's weights are alive together, its forward keeps what its units keep (above)
# through the head, and its backward recomputes inside those functions' VJPs as a segment
# does: the larger of the two. Fitted: SmolLM2 (6 blocks, 512 and 2048 tokens) and the
# Qwen2.5-0.5B shape (4 blocks, 512 tokens; bench/results/plan_accuracy.md).
# The loss head's working memory (logit tiles, dequantized head tiles, the input and its
# gradient) was 1.27x these terms in the Qwen2.5-0.5B trainer row (512 tokens, its peak phase)
HEAD_FIT = 1.35
# The tiled chunked head (LossHead.value_and_grad, run when the head is alone in the loss
# segment) holds h and dL/dh [tokens, D] in the compute dtype, and for one block of n rows
# (loss.head_rows) float32 arrays, at the larger of two moments: the vocabulary loop (the
# rows' normed input x and dL/dx's partial sums: TILED_HEAD_LOOP_PER_ROW_D [n, D]; one
# [n, tile] logits/softmax buffer; TILED_HEAD_TILES dequantized [tile, D] head tiles) and the
# end of the block (x, dL/dx, the targets' head rows, the final norm's VJP, the rows' dL/dh:
# TILED_HEAD_PER_ROW_D [n, D]). From the second block on, the previous block's arrays that
# are still referenced (its dL/dx and dL/dh rows) and the gathered rows add
# TILED_HEAD_BLOCKS = (at the end, in the loop) [n, D]. Measured with the head alone
# (LossHead.value_and_grad, peak above h; bench/results/plan_accuracy.md, "head alone") at
# D = 256-3072, 512-8192 tokens: the end 7.00 [n, D] in one block, 9.19-9.21 in several; the
# loop set the peak only at D = 576 / 896 (SmolLM2, Qwen2.5-0.5B: 2.0 [n, D] + the tiles at
# 512 rows in one block, 6.0 + the tiles in blocks of 512 and 1024). Before: 9 [n, D] +
# 2 [n, tile] + 2 [tile, D], fitted at D = 3072 only: 2.4x the head's phase on SmolLM2 at
# 2048 tokens (the [n, tile] term, 14 MB there, is one buffer, not two).
TILED_HEAD_PER_ROW_D, TILED_HEAD_LOOP_PER_ROW_D, TILED_HEAD_TILES = 7.25, 2, 2.5
TILED_HEAD_BLOCKS = (2.5, 4)
# The chunked exact head under autodiff (the graph engine, --cache-policy last) recomputes
# each vocabulary tile in its own VJP: per row per_row_D [D] floats (the input's gradient and
# its row blocks' partial sums), plus weight_tiles dequantized [tile, D] tiles in flight, times
# fit. Fitted with --cache-policy last to SmolLM2 (6 blocks) at 512 and 2048 tokens and the
# Qwen2.5-0.5B shape at 512 (whole steps, the merged code: 1.05x, 1.14x, 1.06x); before, one
# logits row per row ([rows, tile]) and 2 [D]: 1.39x SmolLM2's phase at 2048 tokens.
CHUNKED_HEAD = {"per_row_cols": 0, "per_row_D": 1.5, "weight_tiles": 6.25, "fit": 1.2}
OPT_COPIES = 5  # LoRA weight + gradient + accumulated gradient + AdamW m and v
# --stream-state: one unit's state is in memory at a time; its update holds the old and new
# weight, m and v and the gradient sum
STREAMED_OPT_COPIES = 7
# ... and while its segment recomputes: its weights with AdamW's m and v as loaded
# (state.resident), their gradients, and the gradient sum they are added to
STATE_COPIES = 2
# --activations disk: the boundary prefetched for the next segment (the one in use is the
# recompute's input, counted with the recompute; the forward's pending writes are below it)
DISK_BOUNDARIES_IN_MEMORY = 1
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
    # every phase the plan weighed (GB, its own working memory and the weights it loads),
    # of which the largest is the part named "(peak phase)"; the rest of `parts` is held
    # through the whole step (bench/plan_accuracy.py --phases compares each with its peak)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def total_gb(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        rows = [f"  {name:<34} {gb:7.3f} GB" for name, gb in self.parts.items()]
        who = f"per rank, {self.ranks} ranks" if self.ranks > 1 else "one process"
        head = f"memory plan (estimated peak, {who}; global batch {self.global_batch}):"
        return "\n".join([head, *rows, f"  {'total':<34} {self.total_gb:7.3f} GB"])


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
    # the share of a block's frozen bytes in its attention half (the largest block's): a
    # streamed half loads only its own half's weights (None: unknown, each half counts all)
    attn_share: float | None = None

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
        _attn_share(model, layers),
    )


def _attn_share(model: nn.Module, layers: list[nn.Module]) -> float | None:
    """The largest block's share of frozen bytes in its attention half (blocks.half_of)."""
    if not layers:
        return None
    big = max(layers, key=_frozen_bytes)
    total = _frozen_bytes(big)
    attn = sum(v.nbytes for k, v in _frozen(big) if blocks.half_of(model, k) == "attn")
    return attn / total if total else None


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
    """The most blocks one segment touches: k blocks, or k halves (segments start at unit
    multiples of k: an even k covers k / 2 whole blocks, an odd k straddles (k + 1) / 2)."""
    k = cfg.checkpoint_every
    return -(-k // 2) if cfg.split_blocks else k


def _weights_gb(m: ModelSizes, cfg: TrainConfig) -> float:
    total = m.frozen
    if cfg.stream_weights and cfg.engine == "segments":
        total = total - sum(m.block_frozen) + _segment_blocks(cfg) * max(m.block_frozen)
    return total / GB


def _half_activations(
    s: Shape,
    tokens: int,
    cfg: TrainConfig,
    chunked: bool,
    act: int = F32,
    by_rows=False,
    once=True,
) -> dict:
    """Bytes each half of one block's autodiff graph holds for `tokens` tokens, with
    activations of `act` bytes (--dtype's compute dtype; attention scores stay float32);
    `by_rows`: the MLP half is a segment of its own (engine.SegmentStep._vjp_by_rows);
    `once`: in a dequantize_once scope (a checkpointed segment's recompute, not the cached
    last segment of --cache-policy last)."""
    attn_cols = min(cfg.attn_chunk, tokens) if chunked and cfg.attn_chunk else tokens
    scores = cfg.batch_size * s.H * (tokens // cfg.batch_size) * attn_cols * F32 * 2
    mlp_rows = min(cfg.mlp_chunk, tokens) if chunked and cfg.mlp_chunk else tokens
    attn = tokens * (ATTN_PER_D * s.D + ACT_PER_KV * s.kv) * act + scores
    mlp = tokens * (ACT_PER_D - ATTN_PER_D) * s.D * act
    if not chunked:  # the graph engine's autodiff (the constants above were fitted to it)
        return {"attn": attn, "mlp": mlp + mlp_rows * ACT_PER_I * s.I * act}
    # the segment engine's recompute (the input x is a boundary, counted with them)
    c = min(cfg.attn_chunk, tokens) if cfg.attn_chunk else tokens
    attn = tokens * ((ATTN_HALF_PER_D * s.D + 2 * s.kv) * act + ATTN_KV_GRADS * s.kv * F32)
    attn += (ATTN_TILES * s.H * c * c + ATTN_CHUNK_ROWS * c * s.D) * F32 * cfg.batch_size
    per_d = MLP_HALF_PER_D if by_rows and 0 < cfg.mlp_chunk < tokens else MLP_TOKENWISE_PER_D
    rows_by = by_rows and 0 < cfg.mlp_chunk < tokens
    per_i = RECOMPUTE_BY_ROWS_PER_I if rows_by else RECOMPUTE_PER_I
    mlp = tokens * per_d * s.D * act + mlp_rows * per_i * s.I * act
    # the segment engine's dequantize_once scope: small weights' float32 copies (quant.py)
    if once:
        attn += quant.once_bytes([(s.q, s.D), (s.kv, s.D), (s.kv, s.D), (s.D, s.q)])
        mlp += quant.once_bytes([(s.I, s.D), (s.I, s.D), (s.D, s.I)])
    return {"attn": attn, "mlp": mlp}


def _block_activations(
    s: Shape, tokens: int, cfg: TrainConfig, chunked: bool, act: int = F32
) -> float:
    """Bytes one block's autodiff graph holds for `tokens` tokens."""
    return sum(_half_activations(s, tokens, cfg, chunked, act).values())


def _kept(s: Shape, tokens: int, kind: str, act: int) -> float:
    """Bytes a unit's custom functions keep while a later unit of its segment runs its VJP."""
    attn = tokens * (KEPT_ATTN_PER_D * s.D + KEPT_ATTN_PER_KV * s.kv) * act
    mlp = tokens * KEPT_MLP_PER_D * s.D * act
    return {"attn": attn, "mlp": mlp, "block": attn + mlp}[kind]


def _units_recompute(
    s: Shape, tokens: int, cfg: TrainConfig, act: int, kinds, once: bool = True
) -> float:
    """Bytes the recompute of units `kinds` (in order) holds: the largest VJP plus what the
    units before it keep."""
    h = _half_activations(s, tokens, cfg, True, act, once=once)
    vjp = {**h, "block": max(h["attn"], h["mlp"] + _kept(s, tokens, "attn", act))}
    return max(
        vjp[k] + sum(_kept(s, tokens, j, act) for j in kinds[:i]) for i, k in enumerate(kinds)
    )


def _segment_kinds(cfg: TrainConfig) -> list[list[str]]:
    """The unit sequences a segment can be: k whole blocks, or k alternating halves starting
    with either half (an odd k shifts the start)."""
    k = cfg.checkpoint_every
    if not cfg.split_blocks:
        return [["block"] * k]
    halves = ["attn", "mlp"] * (k // 2 + 1)
    return [halves[:k], halves[1 : k + 1]] if k % 2 else [halves[:k]]


def _whole_block_recompute(s: Shape, tokens: int, cfg: TrainConfig, act: int) -> float:
    """Bytes one whole block's recompute holds: its MLP half's VJP next to what the attention
    half keeps, or the attention half's VJP."""
    return _units_recompute(s, tokens, cfg, act, ["block"])


def _segment_activations(s: Shape, tokens: int, cfg: TrainConfig, act: int = F32) -> float:
    """Bytes one checkpoint segment's recompute holds (the worst of its possible unit orders)."""
    return max(_units_recompute(s, tokens, cfg, act, ks) for ks in _segment_kinds(cfg))


def _last_segment_kinds(cfg: TrainConfig, s: Shape) -> list[str]:
    """The units of the model's last segment (the one --cache-policy last keeps)."""
    n_units = s.n_layers * (2 if cfg.split_blocks else 1)
    k = n_units - (-(-n_units // cfg.checkpoint_every) - 1) * cfg.checkpoint_every
    if not cfg.split_blocks:
        return ["block"] * k
    return (["attn", "mlp"] * n_units)[n_units - k : n_units]


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
    """One block of rows (`blocks`: loss.head_rows, else all rows in one), its larger moment:
    the vocabulary loop (one tile of logits and of the head) or the block's end."""
    n = min(rows, head_rows(s.D)) if blocks else rows
    more_end, more_loop = TILED_HEAD_BLOCKS if rows > n else (0, 0)
    end = (TILED_HEAD_PER_ROW_D + more_end) * n * s.D
    loop = (TILED_HEAD_LOOP_PER_ROW_D + more_loop) * n * s.D + n * tile
    return (max(end, loop + TILED_HEAD_TILES * tile * s.D)) * F32


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
    # streamed LoRA state (--stream-state) is in memory only with its units: counted in the
    # phases that load it (the recompute, the update), not through the loss head
    streamed_state = bool(cfg.stream_state) and cfg.engine == "segments"
    if not streamed_state:
        parts["LoRA + optimizer"] = _optimizer_bytes(cfg, s) / GB
    head = _loss_head_bytes(s, rows, cfg, tokens, act)
    all_phases: dict[str, float] = {}
    if cfg.engine == "graph":
        parts["activations"] = s.n_layers * _block_activations(s, tokens, cfg, False, act) / GB
        parts["loss head"] = head / GB
    else:
        n_units = s.n_layers * (2 if cfg.split_blocks else 1)
        n_seg = -(-n_units // cfg.checkpoint_every)
        storage = precision.storage.size
        boundary = tokens * s.D * storage
        ram = cfg.activations == "ram"
        kept = n_seg if ram else DISK_BOUNDARIES_IN_MEMORY
        parts["segment boundaries"] = min(kept, n_seg) * boundary / GB
        # the recompute's input x: on disk, the boundary read back (in RAM, one of them); in
        # another dtype than the compute's, its cast instead (the read-back storage copy is
        # freed once the cast is evaluated: engine.SegmentStep._backward); and the running
        # units' state (bench/results/plan_accuracy.md: the trainer's rows, bf16 storage)
        x_in = 0 if ram and storage == act else tokens * s.D * act
        unit_state = 0
        if streamed_state:
            unit_state = (
                _lora_bytes(cfg, s) / n_blocks(cfg, s) * _segment_blocks(cfg) * STATE_COPIES
            )
        x_in += unit_state
        big = max(m.block_frozen)
        segment_w = _segment_blocks(cfg) * big if streamed else 0
        # a streamed head is loaded whole for the loss, unless read tile by tile from disk
        head_w = m.frozen - sum(m.block_frozen) if streamed and not _tiled_head(cfg) else 0
        if _keeps_attention(cfg):
            n = s.n_layers
            if not ram:
                one = cfg.split_blocks and cfg.checkpoint_every == 1
                n = min(n, 1 if one else 2 * _segment_blocks(cfg))
            parts["kept attention outputs"] = n * _kept_attention_bytes(s, tokens, act) / GB
        if cfg.split_blocks and cfg.checkpoint_every == 1:  # the halves take turns
            halves = _half_activations(s, tokens, cfg, True, act, by_rows=True)
            share = 1.0 if m.attn_share is None else m.attn_share
            attn_w, mlp_w = (big * share, big * (1 - share)) if streamed else (0, 0)
            if m.attn_share is None:
                mlp_w = attn_w
            phases = {
                "attention-half recompute": halves["attn"] + x_in + attn_w,
                "MLP-half recompute": halves["mlp"] + x_in + mlp_w,
            }
        else:
            segment = _segment_activations(s, tokens, cfg, act)
            phases = {"segment recompute": segment + x_in + segment_w}
        if streamed_state:  # unit by unit, after the backward (its boundaries are gone)
            phases["optimizer update"] = _optimizer_bytes(cfg, s)
        phases["loss head"] = head + head_w
        if cfg.cache_policy == "last":  # the last segment's graph is alive with the loss head
            kinds = _last_segment_kinds(cfg, s)
            kept = sum(_kept(s, tokens, k, act) for k in kinds)
            recomputed = _units_recompute(s, tokens, cfg, act, kinds, once=False)
            # its input is the forward's output, not a boundary; its state is loaded too
            own = tokens * s.D * act + unit_state + head_w + segment_w
            phases["loss head"] = own + max(head + kept, recomputed)
        name = max(phases, key=phases.get)
        parts[f"{name} (peak phase)"] = phases[name] / GB
        all_phases = {k: v / GB for k, v in phases.items()}
    if token_bytes:
        parts["token store"] = token_bytes / GB
    seqs = ranks * cfg.batch_size * cfg.grad_accum
    batch = f"{seqs} sequences of {cfg.max_seq_len} tokens"
    if ranks > 1 or cfg.grad_accum > 1:
        batch += (
            f" = {ranks} rank(s) x --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"
        )
    return MemoryPlan(parts, ranks, batch, all_phases)


def n_blocks(cfg: TrainConfig, s: Shape) -> int:
    """Blocks that carry an adapter (--num-layers)."""
    return max(1, s.n_layers if cfg.num_layers < 0 else min(cfg.num_layers, s.n_layers))


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
        per_block = _lora_bytes(cfg, s) / n_blocks(cfg, s)
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
