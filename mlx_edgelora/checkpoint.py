"""Atomic save and verified resume of a training run: adapter, optimizer, step, data position.

Layout inside --out:
    checkpoints/step-000050/{adapters.safetensors, optimizer.safetensors, state.json,
                             manifest.json}
    checkpoints/latest.json      -> {"step": 50, "dir": "step-000050"}
Each checkpoint is written to a temporary folder, fsynced and renamed into place, then
latest.json is replaced atomically, so a run killed at any moment leaves the previous
checkpoint intact. manifest.json (written last) holds each file's size and sha256: `find`
resumes from the newest checkpoint that still matches it, so a truncated or corrupted file
(a full disk, a bad copy) costs one checkpoint, not the run. latest.json only says what the
last save was; it is never followed outside checkpoints/.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError
from .files import fsync, require_free_space, write_safetensors, write_text_atomic
from .state import ADAPTERS, OPTIMIZER, SegmentOptimizer

KEEP = 2  # checkpoints kept on disk; older ones are pruned after a successful save
FILES = ("adapters.safetensors", "optimizer.safetensors", "state.json")
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-\d{6,}")


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
    adapter and optimizer state come from its files (same format), a tensor at a time.

    A failure (full disk, read-only folder) removes the partial folder and raises a one-line
    UserError; the previous checkpoint is untouched.
    """
    root = checkpoints_dir(out)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if streamed is not None:
        tensors = {ADAPTERS: streamed.adapter_tensors(), OPTIMIZER: streamed.optimizer_tensors()}
        write = write_safetensors
    else:
        tensors = {
            ADAPTERS: dict(tree_flatten(model.trainable_parameters())),
            OPTIMIZER: dict(tree_flatten(opt.state)),
        }
        write = lambda path, arrays: mx.save_safetensors(str(path), arrays)  # noqa: E731
    try:
        root.mkdir(parents=True, exist_ok=True)
        nbytes = sum(v.nbytes for t in tensors.values() for v in t.values()) + 2**16
        require_free_space(root, nbytes, f"checkpoint {name}", "free some space, then --resume")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for file, arrays in tensors.items():
            write(tmp / file, arrays)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        manifest = {
            f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        for f in (*FILES, MANIFEST):
            fsync(tmp / f)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(root)
        write_text_atomic(root / "latest.json", json.dumps({"step": step, "dir": name}), True)
    except (OSError, RuntimeError, UserError) as e:  # mx.save_safetensors: RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e) if isinstance(e, UserError) else (getattr(e, "strerror", None) or e)
        raise UserError(
            f"cannot save checkpoint step {step}: {reason}; earlier checkpoints are intact"
        ) from None
    _prune(root, keep={name})
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _prune(root: Path, keep: set[str]) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in done[:-KEEP]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    remove_partial(root.parent)


def remove_partial(out: str | Path) -> None:
    """Remove the temp folders of saves that were killed or failed (the caller holds --out's
    lock, so no other run is writing one)."""
    for p in checkpoints_dir(out).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def verify(folder: Path) -> dict:
    """The checkpoint's saved state if every file is intact; else ValueError saying why."""
    try:
        has_manifest = (folder / MANIFEST).exists()  # absent in checkpoints of older versions
        manifest = json.loads((folder / MANIFEST).read_text()) if has_manifest else {}
        for f in FILES if has_manifest else ():
            size, want = (folder / f).stat().st_size, manifest[f]
            if size != want["size"]:
                raise ValueError(f"{f} has {size} bytes, {want['size']} were saved")
            if _sha256(folder / f) != want["sha256"]:
                raise ValueError(f"{f} does not match its checksum")
        for f in FILES[:2]:
            mx.load(str(folder / f))  # the safetensors header and tensor sizes
        state = json.loads((folder / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ValueError(what or type(e).__name__) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json has no step")
    return state


def find(out: str | Path) -> tuple[Path | None, dict, list[str]]:
    """The newest intact checkpoint: (folder, saved state, notes on what was skipped).

    Newest by step, not by latest.json: a save killed after its rename but before the
    pointer's update is complete, and a damaged pointer must not hide intact checkpoints.
    """
    root = checkpoints_dir(out)
    notes = _check_pointer(root)
    names = [p.name for p in root.glob("step-*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    for name in sorted(names, key=lambda n: int(n[5:]), reverse=True):
        try:
            return root / name, verify(root / name), notes
        except ValueError as e:
            notes.append(f"checkpoint {name} is damaged ({e}); skipped")
    return None, {}, notes


def _check_pointer(root: Path) -> list[str]:
    ptr = root / "latest.json"
    if not ptr.exists():
        return []
    try:
        name = json.loads(ptr.read_text())["dir"]
        if isinstance(name, str) and _STEP_DIR.fullmatch(name):
            return []
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{ptr} is unreadable; ignored"]
    return [f"{ptr} points outside {root}; ignored"]


def latest(out: str | Path) -> Path | None:
    """The folder of the newest intact checkpoint, or None."""
    return find(out)[0]


def load(
    folder: Path, model: nn.Module, opt: optim.Optimizer, streamed: SegmentOptimizer | None = None
) -> dict:
    """Restore adapter weights and optimizer state (into `streamed`'s files if given); return
    the saved run state.

    MLX's RNG state cannot be restored, so the trainer reseeds it from (seed, step) at every
    step instead: a resumed run draws the same random numbers as an uninterrupted one.
    """
    try:
        state = verify(folder)
        weights = mx.load(str(folder / "adapters.safetensors"))
        opt_state = mx.load(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: checkpoint unreadable ({e}); resume another run") from None
    if streamed is not None:
        streamed.load_checkpoint(weights, opt_state)
        return state
    model.load_weights(list(weights.items()), strict=False)
    opt.state = tree_unflatten(list(opt_state.items()))
    mx.eval(model.trainable_parameters(), opt.state)
    return state
