"""The training loop: schedule, accumulation, evaluation, progress and checkpoint cadence.

It owns no memory technique itself: the step comes from engine.py (segment-wise by default,
`--engine graph` as the reference) and the loss from loss.py, so every technique is swapped
in by configuration. Validation always uses the exact loss, whatever the training loss is.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_map

from . import checkpoint, engine, lora, loss, plan, quant
from .batching import BatchIterator, iter_eval_batches
from .config import TrainConfig
from .dataset import Dataset, load_dataset
from .errors import UserError
from .loading import LoadedModel, load_model
from .report import Reporter

# Options that must match between a run and its --resume (others, like --steps, may change).
RESUME_KEYS = ["adapter", "rank", "lora_scale", "lora_keys", "num_layers", "lars_block"]
RESUME_KEYS += ["max_seq_len", "batch_size"]


@dataclass
class TrainResult:
    out: Path
    history: list[dict] = field(default_factory=list)
    val_loss: float | None = None
    peak_gb: float = 0.0


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW with linear warm-up then cosine decay to min_lr_ratio * lr."""
    warmup = min(cfg.warmup, max(cfg.steps - 1, 0))
    decay = optim.cosine_decay(cfg.lr, max(cfg.steps - warmup, 1), cfg.lr * cfg.min_lr_ratio)
    if warmup:  # starts at lr / warmup, not 0: the first update is never wasted
        ramp = optim.linear_schedule(cfg.lr / warmup, cfg.lr, warmup)
        sched = optim.join_schedules([ramp, decay], [warmup])
    else:
        sched = decay
    return optim.AdamW(learning_rate=sched, weight_decay=cfg.weight_decay)


def prepare_output(cfg: TrainConfig) -> Path:
    """Refuse to clobber a user's folder; with --overwrite remove only our own run files."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    has_content = out.is_dir() and any(out.iterdir())
    if cfg.resume:
        if checkpoint.latest(out) is None:
            raise UserError(f"{out}: no checkpoint to resume from; run without --resume")
    elif has_content and not cfg.overwrite:
        raise UserError(
            f"{out}: folder is not empty; pass --resume to continue it, --overwrite to replace "
            "its run, or choose another --out"
        )
    elif has_content:
        shutil.rmtree(checkpoint.checkpoints_dir(out), ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate(step_fn, cfg: TrainConfig, rows, head) -> tuple[float, int]:
    """Mean exact loss over (up to cfg.eval_batches) validation batches, without gradients."""
    total, count = 0.0, 0
    limit = None if cfg.eval_batches < 0 else cfg.eval_batches
    for batch in iter_eval_batches(rows, cfg.batch_size, limit):
        loss_sum, n = step_fn.forward_loss(head, batch)
        total, count = total + loss_sum, count + n
    return (total / count if count else float("nan")), count


def _accumulate(step_fn, batches: BatchIterator, n_micro: int):
    """Run n_micro micro-batches; return summed loss, token count and summed gradients."""
    loss_sum, n_tok, grads = 0.0, 0, None
    for _ in range(n_micro):
        batch = next(batches)
        ls, n, g = step_fn(batch)
        loss_sum, n_tok = loss_sum + ls, n_tok + n
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(grads)
        del g  # else this micro-batch's gradients stay alive through the next one's step
    return loss_sum, n_tok, grads


def _update(model, opt, cfg: TrainConfig, grads, n_tok: int) -> None:
    grads = tree_map(lambda g: g / n_tok, grads)
    if cfg.grad_clip > 0:
        grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
    opt.update(model, grads)
    mx.eval(model.trainable_parameters(), opt.state)


def _check_resume(cfg: TrainConfig, saved: dict) -> None:
    old = saved.get("config", {})
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(cfg, key):
            raise UserError(
                f"--resume: --{key.replace('_', '-')} was {old[key]} in the saved run, now "
                f"{getattr(cfg, key)}; use the same value or start again with --overwrite"
            )


@dataclass
class _Run:
    """Everything a training run holds, built once by `_setup`."""

    cfg: TrainConfig
    out: Path
    model: nn.Module
    adapter_cfg: dict
    data: Dataset
    opt: optim.Optimizer
    batches: BatchIterator
    step_fn: object
    eval_head: object
    reporter: Reporter
    start: int = 0


def _setup(cfg: TrainConfig, loaded: LoadedModel | None, data: Dataset | None, reporter) -> _Run:
    out = prepare_output(cfg)
    loaded = loaded or load_model(cfg.model, cfg.quantize)
    data = data or load_dataset(cfg.data, loaded.tokenizer, cfg)
    mx.random.seed(cfg.seed)
    model = loaded.model
    adapter_cfg = lora.apply_adapter(model, cfg)
    quant.prepare_for_training(model)
    reporter = reporter or Reporter(cfg.steps, log_path=out / "metrics.jsonl")
    memory_plan = plan.estimate(model, cfg, data.trainable_fraction())
    reporter.info(memory_plan.describe())
    plan.check_budget(memory_plan, cfg)
    opt = make_optimizer(cfg)
    batches = BatchIterator(data.train_rows, cfg.batch_size, seed=cfg.seed)
    train_head = loss.make_loss_head(model, cfg.loss, cfg)
    eval_head = loss.exact_loss_head(model, cfg)  # both before the step may offload weights
    step_fn = engine.make_step(model, cfg, train_head)
    run = _Run(cfg, out, model, adapter_cfg, data, opt, batches, step_fn, eval_head, reporter)
    if cfg.resume:
        saved = checkpoint.load(checkpoint.latest(out), model, opt)
        _check_resume(cfg, saved)
        batches.load_state_dict(saved["data"])
        run.start = saved["step"]
        reporter.info(f"resumed from step {run.start} ({out})")
    return run


def _save(run: _Run, step: int, data_state: dict) -> None:
    state = {"config": run.cfg.to_dict(), "data": data_state}
    checkpoint.save(run.out, step, run.model, run.opt, state)
    lora.save_adapters(run.model, run.out, run.adapter_cfg)


def _eval(run: _Run, step: int) -> float:
    val, n = evaluate(run.step_fn, run.cfg, run.data.val_rows, run.eval_head)
    if n:
        run.reporter.eval(step, val, n)
    return val


def train(
    cfg: TrainConfig,
    loaded: LoadedModel | None = None,
    data: Dataset | None = None,
    reporter: Reporter | None = None,
    keep_model: bool = True,
) -> TrainResult:
    """Fine-tune LoRA adapters per `cfg`; writes the adapter and checkpoints to cfg.out.

    With weight streaming the model's frozen weights are on disk while it trains; `keep_model`
    loads them back afterwards (to generate in the same process). The CLI, which exits, skips
    that. The reported peak is the training peak, read before any reload.
    """
    run = _setup(cfg.validate(), loaded, data, reporter)
    try:
        val = _loop(run)
        peak = mx.get_peak_memory() / 1024**3
    finally:
        run.step_fn.close(restore=keep_model)  # the stream's files are removed either way
    return TrainResult(run.out, run.reporter.history, val, peak)


def _loop(run: _Run) -> float | None:
    """Steps run.start+1 .. cfg.steps; on Ctrl-C, checkpoint the last applied step first."""
    cfg = run.cfg
    mx.reset_peak_memory()
    val = None
    if cfg.eval_every and run.start == 0:
        _eval(run, 0)  # the untrained baseline, so the curve has a reference point
    run.reporter.start(run.start + 1)
    done, done_data = run.start, run.batches.state_dict()  # last step the optimizer applied
    try:
        for step in range(run.start + 1, cfg.steps + 1):
            mx.random.seed(cfg.seed * 1_000_003 + step)  # resumable dropout RNG
            loss_sum, n_tok, grads = _accumulate(run.step_fn, run.batches, cfg.grad_accum)
            if n_tok:
                _update(run.model, run.opt, cfg, grads, n_tok)
            del grads  # else the last step's gradients stay alive through the next step's peak
            done, done_data = step, run.batches.state_dict()
            run.reporter.step(step, loss_sum / max(n_tok, 1), n_tok, float(run.opt.learning_rate))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                val = _eval(run, step)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                _save(run, step, done_data)
    except KeyboardInterrupt:
        if done > run.start:
            _save(run, done, done_data)
            run.reporter.info(f"interrupted: checkpoint at step {done}; rerun with --resume")
        raise
    if run.start < cfg.steps:
        val = _eval(run, cfg.steps)
        _save(run, cfg.steps, run.batches.state_dict())
    return val if val is not None and math.isfinite(val) else None
