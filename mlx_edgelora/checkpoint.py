"""Atomic save and resume of a training run: adapter, optimizer, step, data position.

Layout inside --out:
    checkpoints/step-000050/{adapters.safetensors, optimizer.safetensors, state.json}
    checkpoints/latest.json      -> {"step": 50, "dir": "step-000050"}
Each checkpoint is written to a temporary folder and renamed into place, then latest.json is
replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError
from .state import SegmentOptimizer

KEEP = 2  # checkpoints kept on disk; older ones are pruned after a successful save


def checkpoints_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save(
    out: str | Path,
    step: int,
    model: nn.Module,
    opt: optim.Optimizer,
    state: dict,
    streamed: SegmentOptimizer | None = None,
) -> Path:
    """Write checkpoint `step` atomically and point latest.json at it; with `streamed` the
    adapter and optimizer state come from its files (same format), a tensor at a time."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if streamed is not None:
        streamed.save_checkpoint(tmp)
    else:
        mx.save_safetensors(
            str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
        )
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_json_atomic(root / "latest.json", {"step": step, "dir": name})
    _prune(root, keep={name})
    return final


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _prune(root: Path, keep: set[str]) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in done[:-KEEP]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):  # leftovers of a run killed mid-save
        shutil.rmtree(p, ignore_errors=True)


def latest(out: str | Path) -> Path | None:
    """The folder of the newest complete checkpoint, or None."""
    ptr = checkpoints_dir(out) / "latest.json"
    if not ptr.is_file():
        return None
    folder = checkpoints_dir(out) / json.loads(ptr.read_text())["dir"]
    return folder if folder.is_dir() else None


def load(
    folder: Path, model: nn.Module, opt: optim.Optimizer, streamed: SegmentOptimizer | None = None
) -> dict:
    """Restore adapter weights and optimizer state (into `streamed`'s files if given); return
    the saved run state.

    MLX's RNG state cannot be restored, so the trainer reseeds it from (seed, step) at every
    step instead: a resumed run draws the same random numbers as an uninterrupted one.
    """
    try:
        weights = mx.load(str(folder / "adapters.safetensors"))
        opt_state = mx.load(str(folder / "optimizer.safetensors"))
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{folder}: checkpoint unreadable ({e}); start again with --overwrite"
        ) from None
    if streamed is not None:
        streamed.load_checkpoint(weights, opt_state)
        return state
    model.load_weights(list(weights.items()), strict=False)
    opt.state = tree_unflatten(list(opt_state.items()))
    mx.eval(model.trainable_parameters(), opt.state)
    return state
