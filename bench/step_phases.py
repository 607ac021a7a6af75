"""Where a training step's peak is: mx peak memory of each phase of the segment engine's step.

Why: the trainer reports one peak per step; to lower it we need the phase that sets it. This
runs the trainer's own step (SegmentStep with the streamed SegmentOptimizer, as
`python -m mlx_edgelora.train` builds it) on one random batch and resets the peak around each
phase: the forward (embedding + segments, storing boundaries), the loss segment (loss head and
dL/dh), the backward (every segment's recompute + VJP) and the optimizer update.

    python bench/step_phases.py bench/.models/llama3b-L2 2048 [field=value ...]

Extra arguments are TrainConfig fields (e.g. `loss=subset cache_policy=last`).
"""

from __future__ import annotations

import sys
import time

# isort: off
import mlx_edgelora  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx

# isort: on
import numpy as np

from mlx_edgelora import engine, lora, loss, quant
from mlx_edgelora.batching import Batch
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.loading import load_model
from mlx_edgelora.state import SegmentOptimizer
from mlx_edgelora.trainer import make_optimizer

GB = 2**30


def main(argv: list[str]) -> None:
    model_path, seq = argv[0], int(argv[1])
    extra = dict(a.split("=", 1) for a in argv[2:])
    extra = {k: int(v) if v.isdigit() else v for k, v in extra.items()}
    cfg = TrainConfig(model=model_path, out="/tmp/step_phases", max_seq_len=seq, **extra)
    cfg.validate()
    model = load_model(cfg.model, None, lazy=True).model
    lora.apply_lora(model, cfg)
    quant.prepare_for_training(model)
    state = SegmentOptimizer(model, make_optimizer(cfg), cfg.grad_clip, None, cfg.out)
    step = engine.make_step(model, cfg, loss.make_loss_head(model, cfg.loss, cfg), state)
    log: list[tuple] = []

    def measured(name: str, fn):
        def run(*args, **kwargs):
            mx.eval([])
            mx.reset_peak_memory()
            before, t0 = mx.get_active_memory(), time.time()
            out = fn(*args, **kwargs)
            log.append((name, before, mx.get_peak_memory(), time.time() - t0))
            return out

        return run

    step._forward = measured("forward", step._forward)
    step._loss_and_vjp = measured("loss segment", step._loss_and_vjp)
    step._backward = measured("backward", step._backward)
    state.apply = measured("optimizer update", state.apply)
    ids = np.random.default_rng(0).integers(0, 1000, size=(1, seq + 1)).astype(np.int32)
    batch = Batch(ids[:, :-1], ids[:, 1:], np.ones((1, seq), bool))
    try:
        state.begin_step()
        value, n, _ = step(batch)
        state.apply(n)
    finally:
        step.close(restore=False)
        state.close()
    print(f"{model_path} {seq} tokens, loss {value / n:.4f} (time on this machine's load)")
    for name, before, peak, dt in log:
        print(f"  {name:<17} active before {before / GB:.3f}  peak {peak / GB:.3f} GB  {dt:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
