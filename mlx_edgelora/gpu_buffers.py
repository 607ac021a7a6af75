"""--gpu-buffers: bound the arrays that MLX's GPU command buffers keep alive.

Why: on a GPU, MLX encodes ops into command buffers and frees an op's arrays only when its
buffer has finished on the device. By default a buffer takes tens of ops or tens of MB, and
several are in flight while the host encodes ahead, so a step holds more than the memory
engine's op-by-op accounting (the memory plan, fitted on a CPU, where arrays are freed as
soon as their last reader has run). One op per buffer frees them as on a CPU, at the cost of
a commit per op. MLX reads the limits from the environment once, when the GPU device comes
up at `import mlx.core`, so the CLI sets them and starts itself again; Python callers set
them before importing mlx. bench/results/gpu_trainer.md has what each choice measured.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

SMALL = {"MLX_MAX_OPS_PER_BUFFER": "1", "MLX_MAX_MB_PER_BUFFER": "1"}


def wanted(choice: str, budget_given: bool) -> bool:
    """Whether `--gpu-buffers choice` asks for small buffers (auto: when a budget is given,
    since a budget is a promise the default buffers can break)."""
    return choice == "small" or (choice == "auto" and budget_given)


def restart_env(
    choice: str, budget_given: bool, gpu: bool, environ: Mapping[str, str]
) -> dict | None:
    """The environment to start the CLI again with, or None: not on a GPU, not wanted, or the
    limits are set already (by an earlier start or by the user, whose values are kept)."""
    if not gpu or not wanted(choice, budget_given) or all(k in environ for k in SMALL):
        return None
    return {**SMALL, **environ}


def _assignments(environ: Mapping[str, str]) -> str:
    """The limits as shell assignments, with `environ`'s values (the user's kept)."""
    return " ".join(f"{k}={environ[k]}" for k in SMALL if k in environ)


def restart(argv: list[str], env: dict) -> None:
    """Replace this process with `python -m mlx_edgelora.train argv` under `env`, saying so."""
    print(f"--gpu-buffers: starting again with {_assignments(env)}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mlx_edgelora.train", *argv], env)


def describe(choice: str, budget_given: bool, environ: Mapping[str, str]) -> str:
    """The startup line on a GPU: which limits this process runs with, and what that means
    for the memory plan."""
    limits = _assignments(environ)
    if limits:
        return f"gpu buffers: {limits} (arrays freed op by op, as the memory plan counts them)"
    if wanted(choice, budget_given):
        return (
            f"gpu buffers: MLX's defaults, although --gpu-buffers asks for small ones: set "
            f"{_assignments(SMALL)} before importing mlx, or the peak can exceed the memory plan"
        )
    return (
        "gpu buffers: MLX's defaults (fastest; in-flight command buffers hold arrays beyond "
        "the memory plan: --gpu-buffers small, or --memory-budget-gb, holds it)"
    )
