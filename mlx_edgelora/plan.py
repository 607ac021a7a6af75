"""The memory plan: an up-front estimate of a training step's peak, checked against a budget.

Why: on a laptop an out-of-memory step takes the whole machine down (swap storm), so the
trainer estimates the peak from the model's shapes and the options before it starts, prints
it, and refuses to start above `--memory-budget-gb`, naming the option that would help most.
The per-token constants below were fitted to `mx.get_peak_memory()` measurements of
SmolLM2-135M and tiny models on MLX's CPU backend (see tests/test_plan.py); the estimate is
meant to be within ~30%, not exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlx import nn
from mlx.utils import tree_flatten

from . import blocks
from .config import TrainConfig
from .errors import UserError
from .loss import vocab_tile
from .models import Shape
from .precision import Precision

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
OPT_COPIES = 5  # LoRA weight + gradient + accumulated gradient + AdamW m and v
# --stream-state: one unit's state is in memory at a time; its update holds the old and new
# weight, m and v and the gradient sum
STREAMED_OPT_COPIES = 7


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


def _frozen_bytes(module: nn.Module) -> int:
    trainable = {k for k, _ in tree_flatten(module.trainable_parameters())}
    return sum(v.nbytes for k, v in tree_flatten(module.parameters()) if k not in trainable)


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


def _weights_gb(model: nn.Module, cfg: TrainConfig) -> float:
    total = _frozen_bytes(model)
    if cfg.stream_weights and cfg.engine == "segments":
        per_block = [_frozen_bytes(layer) for layer in blocks.layers(model)]
        total = total - sum(per_block) + _segment_blocks(cfg) * max(per_block)
    return total / GB


def _half_activations(
    s: Shape, tokens: int, cfg: TrainConfig, chunked: bool, act: int = F32
) -> dict:
    """Bytes each half of one block's autodiff graph holds for `tokens` tokens, with
    activations of `act` bytes (--dtype's compute dtype; attention scores stay float32)."""
    attn_cols = min(cfg.attn_chunk, tokens) if chunked and cfg.attn_chunk else tokens
    scores = cfg.batch_size * s.H * (tokens // cfg.batch_size) * attn_cols * F32 * 2
    mlp_rows = min(cfg.mlp_chunk, tokens) if chunked and cfg.mlp_chunk else tokens
    return {
        "attn": tokens * (ATTN_PER_D * s.D + ACT_PER_KV * s.kv) * act + scores,
        "mlp": tokens * (ACT_PER_D - ATTN_PER_D) * s.D * act + mlp_rows * ACT_PER_I * s.I * act,
    }


def _block_activations(
    s: Shape, tokens: int, cfg: TrainConfig, chunked: bool, act: int = F32
) -> float:
    """Bytes one block's autodiff graph holds for `tokens` tokens."""
    return sum(_half_activations(s, tokens, cfg, chunked, act).values())


def _segment_activations(s: Shape, tokens: int, cfg: TrainConfig, act: int = F32) -> float:
    """Bytes one checkpoint segment's recompute holds: k blocks, or k alternating halves."""
    k = cfg.checkpoint_every
    if not cfg.split_blocks:
        return k * _block_activations(s, tokens, cfg, True, act)
    big, small = sorted(_half_activations(s, tokens, cfg, True, act).values(), reverse=True)
    return -(-k // 2) * big + k // 2 * small


def _loss_head_gb(s: Shape, rows: int, cfg: TrainConfig) -> float:
    tile = min(vocab_tile(cfg.vocab_chunk, s.D), s.V)
    cols = {"full": s.V, "chunked": tile, "subset": min(cfg.subset_k, s.V)}
    c = cols[cfg.loss]
    if cfg.loss == "subset" and cfg.subset_fill in ("predicted", "sampled"):
        c = max(c, tile)  # their no-gradient scoring pass runs over vocabulary tiles
    w_rows = c if cfg.loss == "subset" else tile  # the full head's kernel dequantizes tiles too
    return (rows * c * 3 + w_rows * s.D * 2 + rows * s.D * 4) * F32 / GB


def estimate(
    model: nn.Module,
    cfg: TrainConfig,
    trainable_fraction: float = 1.0,
    token_bytes: int = 0,
    ranks: int = 1,
    precision: Precision | None = None,
) -> MemoryPlan:
    """Estimate the peak of one step for `model` (LoRA applied or not) under `cfg`, on each of
    `ranks` data-parallel processes (each holds the whole model and its own micro-batch).

    `token_bytes`: host memory of the packed token rows (Dataset.token_bytes()), resident for
    the whole run; on a Mac it shares the same unified memory as the step.
    `precision` (--dtype): boundaries count in its storage dtype, activations in its compute
    dtype (default float32 for both); the weights are counted as the model holds them.
    """
    precision = precision or Precision()
    act = precision.compute.size
    s = blocks.shape(model)
    tokens = cfg.batch_size * cfg.max_seq_len
    rows = max(1, int(tokens * trainable_fraction))
    boundary = tokens * s.D * precision.storage.size
    parts = {"weights (resident)": _weights_gb(model, cfg)}
    parts["LoRA + optimizer"] = _lora_bytes(cfg, s) * OPT_COPIES / GB
    if cfg.stream_state and cfg.engine == "segments":  # state.py: a segment's units at a time
        n = s.n_layers if cfg.num_layers < 0 else min(cfg.num_layers, s.n_layers)
        per_block = _lora_bytes(cfg, s) / max(n, 1)
        parts["LoRA + optimizer"] = per_block * _segment_blocks(cfg) * STREAMED_OPT_COPIES / GB
    if cfg.engine == "graph":
        parts["activations"] = s.n_layers * _block_activations(s, tokens, cfg, False, act) / GB
    else:
        n_units = s.n_layers * (2 if cfg.split_blocks else 1)
        n_seg = -(-n_units // cfg.checkpoint_every)
        kept = n_seg if cfg.activations == "ram" else 3  # disk: in flight + prefetched
        parts["segment boundaries"] = min(kept, n_seg) * boundary / GB
        parts["segment recompute"] = _segment_activations(s, tokens, cfg, act) / GB
    parts["loss head"] = _loss_head_gb(s, rows, cfg)
    if token_bytes:
        parts["token store"] = token_bytes / GB
    seqs = ranks * cfg.batch_size * cfg.grad_accum
    batch = f"{seqs} sequences of {cfg.max_seq_len} tokens"
    if ranks > 1 or cfg.grad_accum > 1:
        batch += (
            f" = {ranks} rank(s) x --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"
        )
    return MemoryPlan(parts, ranks, batch)


def check_budget(plan: MemoryPlan, cfg: TrainConfig) -> None:
    """Refuse a run whose plan exceeds --memory-budget-gb, naming the biggest lever."""
    if cfg.memory_budget_gb is None or plan.total_gb <= cfg.memory_budget_gb:
        return
    biggest = max(plan.parts, key=plan.parts.get)
    advice = {
        "weights (resident)": "--stream-weights or --quantize 4",
        "activations": "--engine segments",
        "segment boundaries": "--activations disk or a larger --checkpoint-every",
        "segment recompute": "smaller --attn-chunk/--mlp-chunk or --checkpoint-every 1",
        "loss head": "--loss subset or a smaller --vocab-chunk",
        "LoRA + optimizer": "--stream-state, a smaller --rank or fewer --lora-keys",
        "token store": "less --data",
    }.get(biggest, "a smaller --max-seq-len")
    raise UserError(
        f"--memory-budget-gb {cfg.memory_budget_gb}: planned peak is {plan.total_gb:.2f} GB "
        f"(largest part: {biggest}, {plan.parts[biggest]:.2f} GB); try {advice} or a smaller "
        "--max-seq-len"
    )
