"""`python -m mlx_edgelora.train`: parse options into a TrainConfig and run the trainer.

Bad input ends in a one-line `error: ...` (exit code 2); Ctrl-C (SIGTERM) saves a checkpoint
and exits with 130 (143) so the run can be continued with --resume.
"""

from __future__ import annotations

import os
import signal
import sys

from . import gpu_buffers
from .config import parse_config
from .errors import Terminated, UserError


def main(argv: list[str] | None = None) -> int:
    from .trainer import train  # imported here: keeps --help fast

    try:
        cfg = parse_config(argv)
        _restart_for_gpu_buffers(cfg, argv)
        result = train(cfg, keep_model=False)  # exits next: no need to reload weights
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("stopped (SIGTERM).", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
        return 130
    if result.rank:  # rank 0 reports; the others only say they finished
        print(f"rank {result.rank} done: peak memory {result.peak_gb:.2f} GB")
        return 0
    val = f"{result.val_loss:.3f}" if result.val_loss is not None else "n/a"
    if result.best_step is not None:
        val += f" | kept the best adapter (step {result.best_step})"
    print(
        f"done: adapter in {result.out} | final val loss {val} | peak memory "
        f"{result.peak_gb:.2f} GB\ntry it: python -m mlx_edgelora.generate "
        f"{'--model ' + cfg.model + ' ' if cfg.model else ''}--adapter {result.out} "
        '--prompt "..."'
    )
    return 0


def _restart_for_gpu_buffers(cfg, argv: list[str] | None) -> None:
    """--gpu-buffers small on a GPU: MLX reads its limits only at import, so start again."""
    from .precision import on_gpu

    budget = cfg.is_given("memory_budget_gb")
    env = gpu_buffers.restart_env(cfg.gpu_buffers, budget, on_gpu(), os.environ)
    if env is not None:
        gpu_buffers.restart(sys.argv[1:] if argv is None else argv, env)


if __name__ == "__main__":
    sys.exit(main())
