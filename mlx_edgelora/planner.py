"""The planner: the fastest configuration whose planned peak fits the memory budget.

Why: each memory option (disk boundaries, weight and state streaming, segment size, half
blocks, chunk sizes, selective caching, half-precision storage) trades step time or precision
for memory, and which ones a run can afford depends on the model, the context and the
machine. Given `--memory-budget-gb`, the planner enumerates the options the user did not set
(SPACE; the ones set on the command line or in YAML are kept, `TrainConfig.given`), estimates
each candidate's peak (plan.estimate) and disk use, rates its step time relative to the
defaults (SPEED, DTYPE_SPEED), and runs the fastest one that fits. Of --dtype it tries the
values valid for the model and the backend (precision.choices), each sized with its own
storage and compute dtype; on a CPU, half-precision compute only when nothing computing in
float32 fits. Without `--memory-budget-gb` the budget is BUDGET_FRACTION of physical memory
and the defaults are kept whenever they fit it: the defaults are the documented, memory-lean
setting, and the planner then only steps in to avoid a swap storm or a full disk.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
from mlx import nn

from . import plan, precision
from .config import TrainConfig
from .errors import UserError
from .files import SPACE_MARGIN, format_bytes
from .plan import GB, MemoryPlan, ModelSizes
from .precision import Precision, dtype_name
from .spill import spill_parent

# Half of physical memory: on an 8 GB Mac, macOS and a browser hold ~3-4 GB, and streamed
# weights and spilled boundaries are read back through the page cache, which needs free RAM to
# stay fast; the plan itself is meant to be at most 15% over the measured peak
# (bench/plan_accuracy.py), so half leaves room for both.
BUDGET_FRACTION = 0.5

# The options the planner chooses, each with the values it tries (the default first); of
# --dtype's, only those valid for the model and the backend (precision.choices).
SPACE: dict[str, list] = {
    "activations": ["disk", "ram"],
    "stream_weights": [True, False],
    "stream_state": [True, False],
    "split_blocks": [True, False],
    "checkpoint_every": [1, 2, 4],
    "cache_policy": ["none", "last"],
    "keep_attention": [True, False],
    "attn_chunk": [256, 1024],
    "mlp_chunk": [256, 1024],
    "vocab_chunk": [8192, 32768],
    "dtype": ["auto", "float32", "bfloat16", "float16"],
}

# Step time of each --dtype resolution (precision.resolve) relative to `auto`'s, by backend:
# "half storage" is auto's on a CPU for a bf16/fp16 model (weights and boundaries in the
# model's dtype, float32 compute), "half compute" is --dtype bfloat16/float16 (the CPU's
# half-precision matmuls have no BLAS: 20-40x slower alone, bench/results/dtype.md, so
# quant.matmul runs them as float32 BLAS on upcast operands; what remains is the casts and
# the half-precision element-wise work). CPU factors: bench/results/dtype.md's whole steps,
# the geometric mean of its SmolLM2 2048-token and Qwen2.5-0.5B-shape 512-token rows,
# measured UNDER LOAD (load 28-47): bfloat16 compute 638/544 and 1184/717 of auto's, float32
# 1039/544 and 451/717 (noisy: the two rows disagree on float32). No GPU measurement yet: a
# missing kind counts as 1 (the smaller plan then wins the tie, i.e. auto).
DTYPE_SPEED: dict[str, dict[str, float]] = {
    "cpu": {"half storage": 1.0, "float32": 1.10, "half compute": 1.39},
    "gpu": {},
}

# Step time of each option value relative to the defaults (all techniques on), by context
# (tokens per micro-batch; the nearest context's table is used); a candidate's relative step
# time is the product over its options, and a value missing here counts as 1 (then the
# smaller plan wins the tie). Data from bench/results/engine_speed.json, written by
# bench/engine_speed.py --report (which prints this table): SmolLM2-135M (2048 tokens: its
# first 6 blocks), one technique toggled at a time, interleaved with the all-on configuration
# in one process; each factor is that configuration's median step time over the all-on one's.
# Measured UNDER LOAD on a shared 2-core CPU (load average 8-49), 1-3 rounds per run, 1-3 runs:
# single factors are noisy (activations in RAM measured 1.05x and 1.41x at 512 in two runs);
# bench/planner_pick.py checks the picks they lead to against measured step times. Re-run the
# bench on an idle machine (a Mac) and paste its table here.
SPEED: dict[int, dict[str, dict]] = {
    512: {
        "activations": {"ram": 1.231},
        "stream_weights": {False: 0.988},
        "stream_state": {False: 1.129},
        "split_blocks": {False: 1.092},
        "checkpoint_every": {2: 1.037, 4: 1.343},
        "cache_policy": {"last": 1.228},
        "attn_chunk": {1024: 0.947},
        "mlp_chunk": {1024: 0.947},
        "vocab_chunk": {32768: 1.957},
        "keep_attention": {False: 1.196},
    },
    2048: {
        "activations": {"ram": 0.829},
        "stream_weights": {False: 0.837},
        "stream_state": {False: 1.104},
        "split_blocks": {False: 1.205},
        "checkpoint_every": {2: 1.06},
        # engine_speed 0.973 (1 step), bench/planner_pick.py 1.11 (3 steps, median): the
        # geometric mean, so that caching is not picked for a speed it did not show
        "cache_policy": {"last": 1.039},
        "keep_attention": {False: 1.266},
    },
}


@dataclass
class Candidate:
    cfg: TrainConfig
    plan: MemoryPlan
    speed: float  # step time relative to the defaults
    disk: int  # bytes on the spill disk
    precision: Precision  # its --dtype, resolved

    @property
    def peak(self) -> float:
        return self.plan.total_gb


def physical_memory_gb() -> float | None:
    """This machine's RAM (Linux and macOS both answer these sysconf names), or None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_gb() -> float | None:
    ram = physical_memory_gb()
    return None if ram is None else BUDGET_FRACTION * ram


def relative_speed(
    cfg: TrainConfig, native: mx.Dtype = mx.float32, gpu: bool | None = None
) -> float:
    """The step time of `cfg` relative to the defaults' (SPEED's product over its options,
    times DTYPE_SPEED's factor of its --dtype for a model whose own dtype is `native`)."""
    tokens = cfg.batch_size * cfg.max_seq_len
    ctx = min(SPEED, key=lambda c: abs(math.log(tokens / c)))
    table = SPEED[ctx]
    speed = math.prod(table.get(k, {}).get(getattr(cfg, k), 1.0) for k in SPACE)
    return speed * dtype_speed(cfg.dtype, native, gpu)


def dtype_speed(choice: str, native: mx.Dtype, gpu: bool | None = None) -> float:
    """--dtype `choice`'s step time relative to `auto`'s on this backend (DTYPE_SPEED)."""
    gpu = precision.on_gpu() if gpu is None else gpu
    table = DTYPE_SPEED["gpu" if gpu else "cpu"]

    def factor(p: Precision) -> float:
        half = "half compute" if p.compute != mx.float32 else "half storage"
        return table.get("float32" if p.storage == mx.float32 else half, 1.0)

    auto = precision.resolve("auto", native, gpu)
    return factor(precision.resolve(choice, native, gpu)) / factor(auto)


def candidates(
    cfg: TrainConfig, keep_given: bool = True, dtypes: Iterable[str] | None = None
) -> list[TrainConfig]:
    """`cfg` with every combination of the options the user did not set (all of SPACE's
    options with `keep_given=False`), --dtype among `dtypes` (default: all of SPACE's); only
    the segment engine has options to choose."""
    if cfg.engine != "segments":
        return [cfg]
    values = dict(SPACE)
    if dtypes is not None:
        values["dtype"] = [v for v in SPACE["dtype"] if v in set(dtypes)]
    free = [k for k in SPACE if not (keep_given and cfg.is_given(k))]
    return [
        replace(cfg, **dict(zip(free, combo)))
        for combo in itertools.product(*(values[k] for k in free))
    ]


def flags(cfg: TrainConfig, base: TrainConfig | None = None, none: str = "(the defaults)") -> str:
    """`cfg`'s SPACE options as flags (only those differing from `base`, if given)."""
    out = []
    for k in SPACE:
        v = getattr(cfg, k)
        if base is not None and getattr(base, k) == v:
            continue
        name = k.replace("_", "-")
        out.append(f"--{name}" if v is True else f"--no-{name}" if v is False else f"--{name} {v}")
    return " ".join(out) or none


def choose(
    model: nn.Module | ModelSizes,
    cfg: TrainConfig,
    trainable_fraction: float = 1.0,
    token_bytes: int = 0,
    ranks: int = 1,
    native: mx.Dtype | None = None,
) -> tuple[TrainConfig, MemoryPlan, str]:
    """The configuration to run, its plan, and a short account of the choice (to print).

    `model`'s float weights are as loaded (not cast by --dtype yet); `native` is its own
    dtype (default: precision.model_dtype's); each candidate --dtype is sized as
    precision.cast_weights will store it.

    Raises UserError when no configuration fits the budget (naming the largest
    --max-seq-len or the settings that would fit) or the spill disk (naming the folder and the
    bytes needed)."""
    m = plan.sizes(model)
    if ranks > 1:  # every option counts as set: each Mac could otherwise choose differently
        cfg = replace(cfg, given=tuple({*cfg.given, *SPACE}))
    budget, source = _budget(cfg)
    folder = spill_parent(cfg.spill_dir, cfg.out)
    free_disk = shutil.disk_usage(_existing(folder)).free

    native = native or m.native
    gpu = precision.on_gpu()
    dtypes = precision.choices(native, gpu)
    stored: dict = {}  # sizes per storage dtype

    def rate(c: TrainConfig) -> Candidate:
        prec = dtypes.get(c.dtype) or precision.resolve(c.dtype, native, gpu)
        ms = stored.setdefault(prec.storage, m.stored_as(prec.storage))
        p = plan.estimate(ms, c, trainable_fraction, token_bytes, ranks, prec)
        speed = relative_speed(c, native, gpu)
        return Candidate(c, p, speed, plan.disk_bytes(ms, c, prec), prec)

    def fits(c: Candidate) -> bool:
        return c.peak <= budget and c.disk * SPACE_MARGIN <= free_disk

    current = rate(cfg)
    if cfg.memory_budget_gb is None and fits(current):
        note = f"planner: the options as set fit the budget, {budget:.1f} GB ({source})"
        return cfg, current.plan, note
    rated = [rate(c) for c in candidates(cfg, dtypes=dtypes)]
    in_memory = [c for c in rated if c.peak <= budget]
    if not in_memory:
        raise UserError(_nothing_fits(rate, cfg, budget, source, dtypes))
    fitting = [c for c in in_memory if c.disk * SPACE_MARGIN <= free_disk]
    if not fitting:  # the one that needs the least disk names the bytes
        least = min(in_memory, key=lambda c: c.disk)
        raise UserError(
            f"{folder}: needs ~{format_bytes(least.disk * SPACE_MARGIN)} free for spilled "
            f"activations, streamed weights and state ({flags(least.cfg)}), only "
            f"{format_bytes(free_disk)} free; use --spill-dir on a bigger disk"
        )
    # on a CPU, half-precision compute only when no float32-compute configuration fits: its
    # activations round to 8 bits of mantissa, unlike auto's, and its speed factor rests on
    # two rows measured under load (DTYPE_SPEED)
    fitting.sort(key=lambda c: (not gpu and c.precision.compute != mx.float32, c.speed, c.peak))
    return fitting[0].cfg, fitting[0].plan, _describe(cfg, fitting, len(rated), budget, source)


def _existing(folder: Path) -> Path:
    """`folder` or its nearest existing parent (--spill-dir is created when the run starts)."""
    folder = folder.absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def _budget(cfg: TrainConfig) -> tuple[float, str]:
    if cfg.memory_budget_gb is not None:
        return cfg.memory_budget_gb, "--memory-budget-gb"
    budget = default_budget_gb()
    if budget is None:
        return math.inf, "physical memory unknown: no default budget"
    return budget, f"default: {BUDGET_FRACTION:g} x {physical_memory_gb():.1f} GB of RAM"


def _describe(cfg: TrainConfig, fitting: list[Candidate], n: int, budget: float, source: str):
    segments = cfg.engine == "segments"  # the graph engine has no memory options
    free = [f"--{k.replace('_', '-')}" for k in SPACE if segments and not cfg.is_given(k)]
    kept = [f"--{k.replace('_', '-')}" for k in SPACE if cfg.is_given(k)]
    best = fitting[0]
    defaults = replace(cfg, **{k: values[0] for k, values in SPACE.items()})
    lines = [
        f"planner: budget {budget:.2f} GB ({source}); choosing {' '.join(free) or 'nothing'}"
        + (f" (kept as set: {' '.join(kept)})" if kept else ""),
        f"  {len(fitting)} of {n} candidates fit; the fastest (step time relative to the "
        "defaults, planned peak):",
        *(f"    {c.speed:5.2f}x {c.peak:7.3f} GB  {flags(c.cfg, defaults)}" for c in fitting[:3]),
        f"  chosen: {flags(best.cfg, cfg, 'no change')}: planned peak {best.peak:.3f} GB, "
        f"{best.speed:.2f}x the defaults' step time",
        f"  --dtype {best.cfg.dtype} (weights and boundaries {dtype_name(best.precision.storage)}"
        f", compute {dtype_name(best.precision.compute)}): {_dtype_reason(cfg, best, fitting)}",
    ]
    return "\n".join(lines)


def _dtype_reason(cfg: TrainConfig, best: Candidate, fitting: list[Candidate]) -> str:
    """Why the chosen --dtype (the trainer's `dtype:` line says what auto resolved to)."""
    if cfg.is_given("dtype") or cfg.engine != "segments":
        return "kept as set"
    if best.cfg.dtype == "auto":
        return "the planner kept --dtype auto"
    auto = [c for c in fitting if c.cfg.dtype == "auto"]  # sorted: the fastest first
    if not auto:
        return f"the planner chose --dtype {best.cfg.dtype}: no --dtype auto configuration fits"
    return (
        f"the planner chose --dtype {best.cfg.dtype}: {auto[0].speed / best.speed:.2f}x faster "
        "than the fastest --dtype auto that fits"
    )


def _nothing_fits(rate, cfg: TrainConfig, budget: float, source: str, dtypes: Iterable) -> str:
    """One line: the smallest plan, and the nearest setting that fits."""
    head = f"--memory-budget-gb {budget:g}"
    if source != "--memory-budget-gb":
        head = f"memory budget {budget:.1f} GB ({source}; --memory-budget-gb sets it)"
    smallest = min((rate(c) for c in candidates(cfg, dtypes=dtypes)), key=lambda c: c.peak)
    freed = min(
        (rate(c) for c in candidates(cfg, keep_given=False, dtypes=dtypes)), key=lambda c: c.peak
    )
    what = (
        f"{head}: no configuration fits (the smallest planned peak is {smallest.peak:.2f} GB, "
        f"with {flags(smallest.cfg, cfg, 'the options as set')})"
    )
    if freed.peak <= budget:
        return f"{what}; {flags(freed.cfg, cfg)} fits ({freed.peak:.2f} GB)"
    lo, hi = 0, cfg.max_seq_len  # the largest --max-seq-len whose smallest plan fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rate(replace(freed.cfg, max_seq_len=mid)).peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 1:
        return f"{what}; the largest --max-seq-len that fits is {lo}"
    floor = rate(replace(freed.cfg, max_seq_len=1)).peak
    return f"{what}; even one token needs {floor:.2f} GB: a budget of at least that"
