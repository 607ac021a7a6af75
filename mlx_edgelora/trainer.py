"""The training loop: schedule, accumulation, evaluation, progress and checkpoint cadence.

It owns no memory technique itself: the step comes from engine.py (segment-wise by default,
`--engine graph` as the reference) and the loss from loss.py, so every technique is swapped
in by configuration. Validation always uses the exact loss, whatever the training loss is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map

from . import (
    checkpoint,
    distributed,
    engine,
    files,
    gpu_buffers,
    lora,
    loss,
    planner,
    precision,
    quant,
    report,
)
from .batching import BatchIterator, iter_eval_batches
from .config import TrainConfig
from .dataset import Dataset, load_dataset
from .errors import Terminated, UserError
from .loading import LoadedModel, load_model
from .report import Reporter
from .selection import Selection, epoch_steps
from .state import SegmentOptimizer, clip_scale, global_norm

# Options that must match between a run and its --resume (others, like --steps, may change).
# (--batch-size may change with the number of ranks: distributed.check_resume.)
RESUME_KEYS = ["adapter", "rank", "lora_scale", "lora_keys", "num_layers", "lars_block"]
RESUME_KEYS += ["max_seq_len"]


@dataclass
class TrainResult:
    out: Path
    history: list[dict] = field(default_factory=list)
    val_loss: float | None = None
    peak_gb: float = 0.0
    best_step: int | None = None  # --keep-best: the step whose adapter was kept
    rank: int = 0  # this process's rank in a data-parallel run (only rank 0 wrote `out`)


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


def claim_output(cfg: TrainConfig) -> tuple[Path, files.OutLock]:
    """Check --out and lock it for this run; nothing of an old run is removed here (see
    `_clear_old_run`, called once every input has been validated)."""
    out = files.check_out(
        cfg.out,
        may_replace=cfg.resume or cfg.overwrite,
        options="--resume to continue it, --overwrite to replace its run",
    )
    if cfg.resume and not checkpoint.checkpoints_dir(out).is_dir():
        raise UserError(f"{out}: no checkpoint to resume from; run without --resume")
    files.make_folder(out)
    return out, files.OutLock(out)


def _clear_old_run(cfg: TrainConfig, out: Path, start: int) -> None:
    """--overwrite: remove our old run files (the user's others stay); --resume: remove
    partial checkpoint folders and metrics logged after the resumed step."""
    if cfg.resume:
        checkpoint.remove_partial(out)
        _truncate_metrics(out / "metrics.jsonl", start)
    elif cfg.overwrite:
        files.remove_ours(out, ["checkpoints", "metrics.jsonl"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`: a killed run logged steps its checkpoint does not hold,
    and the resumed run logs them again (also drops a line cut short by the kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except (ValueError, AttributeError, TypeError):  # not a record of ours
            continue
    files.write_text_atomic(path, "".join(kept))


def base_identity(loaded: LoadedModel) -> dict:
    """What --resume must find unchanged: where the base was loaded from, and a hash of its
    config (architecture, sizes and the quantization applied, so --quantize counts too)."""
    config = json.dumps(loaded.config, sort_keys=True, default=str).encode()
    return {"source": str(loaded.source), "config_sha256": hashlib.sha256(config).hexdigest()}


def evaluate(
    step_fn,
    cfg: TrainConfig,
    rows,
    head,
    world: distributed.World | None = None,
    every_batch: bool = False,
) -> tuple[float, int]:
    """Mean exact loss over (up to cfg.eval_batches, or every) batch, without gradients;
    with several ranks each evaluates its rows of each global batch and the sums are added."""
    total, count = 0.0, 0
    limit = None if cfg.eval_batches < 0 or every_batch else cfg.eval_batches
    world = world or distributed.World(None, timeout=1.0)
    for batch in iter_eval_batches(rows, cfg.batch_size * world.size, limit):
        batch = world.rows_of(batch)  # this rank's rows of the global batch
        if len(batch.inputs):
            world.tick()
            loss_sum, n = step_fn.forward_loss(head, batch)
            total, count = total + loss_sum, count + n
    total, count = world.sum_counts(total, count)
    return (total / count if count else float("nan")), count


def _accumulate(step_fn, batches: BatchIterator, n_micro: int):
    """Run n_micro micro-batches; return summed loss, token count and summed gradients
    (None when a SegmentOptimizer took them segment by segment)."""
    loss_sum, n_tok, grads = 0.0, 0, None
    for _ in range(n_micro):
        batch = next(batches)
        ls, n, g = step_fn(batch)
        loss_sum, n_tok = loss_sum + ls, n_tok + n
        if g is not None:
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads)
        del g  # else this micro-batch's gradients stay alive through the next one's step
    return loss_sum, n_tok, grads


def _update(model, opt, cfg: TrainConfig, grads, n_tok: int) -> float:
    """Apply the mean gradient; returns its norm, and applies nothing when that is not finite."""
    grads = tree_map(lambda g: g / n_tok, grads)
    norm = global_norm({k: g.square().sum() for k, g in tree_flatten(grads)})
    scale = clip_scale(norm, cfg.grad_clip)  # as optim.clip_grad_norm, in SegmentOptimizer's order
    if scale is not None:
        grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
    norm = norm.item()
    if math.isfinite(norm):
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state)
    return norm


def _check_resume(cfg: TrainConfig, saved: dict) -> None:
    old = saved.get("config", {})
    for key in RESUME_KEYS:
        if key in old and old[key] != getattr(cfg, key):
            raise UserError(
                f"--resume: --{key.replace('_', '-')} was {old[key]} in the saved run, now "
                f"{getattr(cfg, key)}; use the same value or start again with --overwrite"
            )
    if not cfg.epochs:  # (with --epochs, --steps is known once the data is loaded)
        _check_remaining(cfg, saved)


def _check_remaining(cfg: TrainConfig, saved: dict) -> None:
    if saved["step"] >= cfg.steps and not cfg.test:  # --test alone: evaluate the saved adapter
        raise UserError(
            f"--resume: nothing to do, the run in {cfg.out} is already at step {saved['step']} "
            f"(--steps {cfg.steps}); pass a larger --steps to train it further"
        )


def _check_base(saved: dict, base: dict) -> None:
    old = saved.get("base")  # absent in checkpoints of older versions
    if old and old != base:
        what = "--model" if old["source"] != base["source"] else "--model/--quantize"
        raise UserError(
            f"--resume: the run was trained on {old['source']} (config {old['config_sha256'][:8]})"
            f", this is {base['source']} (config {base['config_sha256'][:8]}); pass the same "
            f"{what} as the saved run"
        )


def _find_checkpoint(cfg: TrainConfig, out: Path, reporter: Reporter) -> tuple[Path, dict]:
    """--resume: the newest intact checkpoint and its state, checked against `cfg`."""
    folder, saved, notes = checkpoint.find(out)
    for note in notes:
        reporter.info(f"warning: {note}")
    if folder is None:
        damaged = " intact" if notes else ""
        raise UserError(f"{out}: no{damaged} checkpoint to resume from; run without --resume")
    _check_resume(cfg, saved)
    if notes:
        reporter.info(f"resuming from the newest intact checkpoint, {folder.name}")
    return folder, saved


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
    world: distributed.World
    start: int = 0
    state: SegmentOptimizer | None = None  # --stream-state: the trainable state on disk
    selection: Selection = field(default_factory=Selection)
    base: dict = field(default_factory=dict)  # base_identity, saved with each checkpoint
    train_head: loss.LossHead | None = None  # says whether a step's loss value was exact
    head_state: dict | None = None  # train_head's running state after the last applied step


def _setup(
    cfg: TrainConfig,
    out: Path,
    world: distributed.World,
    loaded: LoadedModel | None,
    data: Dataset | None,
    reporter,
) -> _Run:
    """Load and check everything; only then clear the old run (--overwrite / --resume).
    Only rank 0 reads or writes `out` (and prints); the others get its state in
    `_start_position`."""
    if reporter is None and world.is_main:
        reporter = Reporter(cfg.steps, log_path=out / "metrics.jsonl")
    elif reporter is None:
        reporter = Reporter(cfg.steps, stream=open(os.devnull, "w"))  # noqa: SIM115
    resume = _find_checkpoint(cfg, out, reporter) if cfg.resume and world.is_main else None
    # streamed weights go from the model's files to the stream one unit at a time
    loaded = loaded or load_model(cfg.model, cfg.quantize, lazy=bool(cfg.stream_weights))
    base = base_identity(loaded)
    if resume:
        _check_base(resume[1], base)
    data = data or load_dataset(cfg.data, loaded.tokenizer, cfg)
    if (cfg.keep_best or cfg.early_stop) and not data.val_rows:
        raise UserError("--keep-best / --early-stop: no validation rows; add documents to --data")
    if cfg.epochs:
        cfg = replace(
            cfg,
            steps=epoch_steps(
                cfg.epochs, len(data.train_rows), cfg.batch_size * world.size, cfg.grad_accum
            ),
        )
        if resume:
            _check_remaining(cfg, resume[1])
    mx.random.seed(cfg.seed)
    model = loaded.model
    native = loaded.dtype or precision.model_dtype(model)
    adapter_cfg = lora.apply_adapter(model, cfg)
    quant.prepare_for_training(model)
    if cfg.epochs:
        reporter.total_steps = cfg.steps  # a caller's reporter was built before steps were known
        reporter.info(
            f"--epochs {cfg.epochs:g}: {len(data.train_rows)} rows / ({world.size} x "
            f"{cfg.batch_size} x {cfg.grad_accum} rows per step) -> {cfg.steps} steps"
        )
    asked = cfg.dtype
    cfg, memory_plan, choice = planner.choose(  # --dtype among its choices
        model, cfg, data.trainable_fraction(), data.token_bytes(), world.size, native
    )
    prec = precision.resolve(cfg.dtype, native)
    if cfg.dtype != asked:
        prec = replace(prec, why=f"{prec.why}, the planner's choice")
    precision.cast_weights(model, prec.storage)  # before the stream writes them (lazily)
    adapter_cfg["edgelora"] = cfg.to_dict()  # the options as run, the planner's included
    reporter.info(prec.describe())
    if precision.on_gpu():
        budget = cfg.is_given("memory_budget_gb")
        reporter.info(gpu_buffers.describe(cfg.gpu_buffers, budget, os.environ))
    reporter.info(choice)
    reporter.info(memory_plan.describe())
    if world.is_main:
        report.attach_tracker(reporter, cfg.report_to, out, cfg.to_dict())
        _check_disk(out, model)
    opt = make_optimizer(cfg)
    batches = BatchIterator(data.train_rows, cfg.batch_size * world.size, seed=cfg.seed)
    train_head = loss.make_loss_head(model, cfg.loss, cfg)
    eval_head = loss.exact_loss_head(model, cfg)  # both before the step may offload weights
    state = None
    if cfg.stream_state:
        state = SegmentOptimizer(model, opt, cfg.grad_clip, cfg.spill_dir, cfg.out)
        reporter.info(
            f"--stream-state: LoRA weights, gradient sums and AdamW moments of "
            f"{len(state.units)} units on disk in {state.folder}"
        )
    step_fn = None
    try:  # a failure from here on (full disk at offload, refused resume) leaves no folder
        step_fn = engine.make_step(model, cfg, train_head, state, prec)
        if world.size > 1:
            step_fn.grad_hook = world.reduce  # each segment's gradients summed over ranks
        shard = world.shard(batches)
        run = _Run(
            cfg, out, model, adapter_cfg, data, opt, shard, step_fn, eval_head, reporter, world
        )
        run.base, run.state, run.train_head = base, state, train_head
        _start_position(run, batches, resume[0] if resume else None)
    except BaseException:
        if step_fn is not None:
            step_fn.close()
        if state is not None:
            state.close()
        raise
    if world.is_main:
        _clear_old_run(cfg, out, run.start)
    return run


def _start_position(run: _Run, batches: BatchIterator, folder: Path | None) -> None:
    """Rank 0 loads the checkpoint `folder` (with --resume); then every rank holds rank 0's
    adapter, optimizer state and data position (the other Macs need no copy of --out)."""
    cfg, world, position = run.cfg, run.world, [0, 0, 0]
    if folder is not None:
        saved = checkpoint.load(folder, run.model, run.opt, run.state)
        distributed.check_resume(saved, cfg, world)
        batches.load_state_dict(saved["data"])
        position = [saved["step"], batches.epoch, batches.position]
        run.selection = Selection.from_state(saved.get("selection"))
        if run.train_head is not None:  # rank 0's head; other ranks' heads rescore at first
            run.train_head.load_state_dict(saved.get("loss_head"))
            run.head_state = saved.get("loss_head")
    mine = distributed.fingerprint(batches)
    with world.collective("setup", max(cfg.dist_timeout, distributed.SETUP_PATIENCE)):
        opt = run.opt if cfg.resume else None
        ints = position + run.selection.to_ints() + [mine]
        *position, main = world.broadcast(run.model, opt, ints, run.state)
    world.check_same_data(main, mine)
    position, selection = position[:3], position[3:]
    run.selection = Selection.from_ints(selection)  # every rank decides --early-stop alike
    run.start, batches.epoch, batches.position = position
    if cfg.resume:
        run.reporter.info(f"resumed from step {run.start} ({run.out})")


def _check_disk(out: Path, model: nn.Module) -> None:
    """Room for the checkpoints (adapter + AdamW's two moments, KEEP of them plus the one
    being written) and the adapter: checked before the old run is cleared."""
    lora_bytes = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    need = lora_bytes * (3 * (checkpoint.KEEP + 1) + 1)
    files.require_free_space(out, need, "checkpoints", "free some space or choose another --out")


def _save(run: _Run, step: int, data_state: dict) -> None:
    """Checkpoint + adapter of `step`; never a non-finite adapter (the last good one stays).
    Rank 0 only: the other ranks hold the same adapter."""
    if not run.world.is_main:
        return
    if not all(mx.all(mx.isfinite(v)).item() for v in _adapter(run).values()):  # one at a time
        raise UserError(_diverged(run, step, "the adapter weights"))
    state = {"config": run.cfg.to_dict(), "data": data_state, "base": run.base}
    state["selection"] = run.selection.state_dict()
    state["world_size"] = run.world.size  # resume: distributed.check_resume
    state["loss_head"] = run.head_state  # e.g. --subset-refresh's cached pass
    checkpoint.save(run.out, step, run.model, run.opt, state, run.state)
    try:
        if not run.cfg.keep_best:  # else adapters.safetensors is the best one, from _eval
            lora.save_adapters(run.model, run.out, run.adapter_cfg, _streamed_adapter(run))
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"{run.out}: cannot save the adapter ({getattr(e, 'strerror', None) or e}); the "
            f"checkpoint of step {step} is saved: free some space, then --resume"
        ) from None


def _streamed_adapter(run: _Run) -> dict | None:
    """The adapter's tensors, lazily loaded, when they live in streamed state; else None."""
    return run.state.adapter_tensors() if run.state is not None else None


def _adapter(run: _Run) -> dict:
    """{name: LoRA weight} wherever it lives (lazily loaded from streamed state)."""
    return _streamed_adapter(run) or dict(tree_flatten(run.model.trainable_parameters()))


def _diverged(run: _Run, step: int, what: str) -> str:
    last = checkpoint.latest(run.out)
    kept = f"the last good checkpoint, {last.name}, is kept" if last else "nothing was saved"
    then = "--resume from it" if last else "start again"
    return (
        f"step {step}: {what} became non-finite (NaN/inf); training stopped and {kept}; "
        f"lower --lr (now {run.cfg.lr}) or --grad-clip, then {then}"
    )


def _eval(run: _Run, step: int) -> float:
    with run.world.collective(f"evaluation at step {step}"):
        val, n = evaluate(run.step_fn, run.cfg, run.data.val_rows, run.eval_head, run.world)
    if n:
        run.reporter.eval(step, val, n)
        if run.selection.update(step, val) and run.cfg.keep_best and run.world.is_main:
            best = {"best_step": step, "best_val_loss": val}
            acfg = {**run.adapter_cfg, **best}
            lora.save_adapters(run.model, run.out, acfg, _streamed_adapter(run))
            run.reporter.info(f"step {step}: best validation loss so far; adapter kept")
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
    cfg.validate()
    world = distributed.init(cfg)
    out, lock = claim_output(cfg) if world.is_main else (Path(cfg.out), None)
    try:
        with _sigterm_as_interrupt():
            run = _setup(cfg, out, world, loaded, data, reporter)
            try:
                val = _loop(run)
                peak = mx.get_peak_memory() / 1024**3
            finally:
                run.step_fn.close(restore=keep_model)  # the stream's files are removed either way
                if run.state is not None:
                    if keep_model:
                        run.state.restore()
                    run.state.close()
                if keep_model:  # the float32 model load_model gives, for generate
                    precision.cast_weights(run.model, mx.float32)
                run.reporter.close()
    finally:
        world.close()
        if lock is not None:
            lock.release()
    best = run.selection.best_step if cfg.keep_best else None
    return TrainResult(run.out, run.reporter.history, val, peak, best, world.rank)


def _test(run: _Run, step: int) -> None:
    """--test: the exact loss on every row of the held-out test.jsonl (never trained on)."""
    with run.world.collective(f"test evaluation at step {step}"):
        rows, head = run.data.test_rows, run.eval_head
        loss_value, n = evaluate(run.step_fn, run.cfg, rows, head, run.world, every_batch=True)
    run.reporter.test(step, loss_value, n)


def _eval_due(cfg: TrainConfig, step: int) -> bool:
    """An evaluation inside the run (the last step's comes after the loop)."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0 and 0 < step < cfg.steps


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a system shutdown, `kill`, a job scheduler) stops the run like Ctrl-C: the
    last applied step is checkpointed, then the process exits. An inherited "ignore" is kept,
    and so is a handler someone else installed."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _loop(run: _Run) -> float | None:
    """Steps run.start+1 .. cfg.steps; on Ctrl-C, checkpoint the last applied step first."""
    cfg = run.cfg
    mx.reset_peak_memory()
    val = None
    if cfg.eval_every and run.start == 0:
        _eval(run, 0)  # the untrained baseline, so the curve has a reference point
    elif _eval_due(cfg, run.start) and run.selection.last_step != run.start:
        _eval(run, run.start)  # Ctrl-C came between that step and its evaluation
    run.reporter.start(run.start + 1)
    done, done_data = run.start, run.batches.state_dict()  # last step the optimizer applied
    stopped = run.selection.should_stop(cfg.early_stop) and run.start  # stopped before resume
    try:
        for step in range(run.start + 1, 0 if stopped else cfg.steps + 1):
            mx.random.seed(cfg.seed * 1_000_003 + step)  # resumable dropout RNG
            with run.world.collective(f"step {step}"):  # gradients are summed in the step
                if run.state is not None:
                    run.state.begin_step()
                loss_sum, n_tok, grads = _accumulate(run.step_fn, run.batches, cfg.grad_accum)
                loss_sum, n_tok = run.world.sum_counts(loss_sum, n_tok)
            step_loss = float(loss_sum) / max(n_tok, 1)
            if run.state is not None:
                norm = run.state.apply(n_tok) if n_tok else 0.0
            else:
                norm = _update(run.model, run.opt, cfg, grads, n_tok) if n_tok else 0.0
            del grads  # else the last step's gradients stay alive through the next step's peak
            if not math.isfinite(step_loss) or not math.isfinite(norm):
                what = "the loss" if not math.isfinite(step_loss) else "the gradient norm"
                raise UserError(_diverged(run, step, what))  # nothing of this step applied
            done, done_data = step, run.batches.state_dict()
            exact = run.train_head is None or run.train_head.pop_exact()
            run.head_state = None if run.train_head is None else run.train_head.state_dict()
            run.reporter.step(step, step_loss, n_tok, float(run.opt.learning_rate), exact)
            if _eval_due(cfg, step):
                val = _eval(run, step)
                if run.selection.should_stop(cfg.early_stop):
                    stopped = step
                    _save(run, step, done_data)
                    break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                _save(run, step, done_data)
    except KeyboardInterrupt:
        if done > run.start:
            _save(run, done, done_data)
            run.reporter.info(f"interrupted: checkpoint at step {done}; rerun with --resume")
        raise
    if stopped:
        sel = run.selection
        run.reporter.info(
            f"early stop at step {stopped}: {sel.since_best} evaluations without a lower "
            f"validation loss (best {sel.best_loss:.3f} at step {sel.best_step})"
        )
    elif run.start < cfg.steps:
        val = _eval(run, cfg.steps)
        _save(run, cfg.steps, run.batches.state_dict())
    if cfg.test:
        _test(run, stopped or max(run.start, cfg.steps))
    return val if val is not None and math.isfinite(val) else None
