"""Trainable state streamed with its segment: LoRA weights, gradient sums and AdamW moments.

Why: the frozen weights are already streamed (stream.py), so what stays resident for a whole
run is the trainable state. For all-linear r=16 LoRA on Llama-3.2-3B that is 24M parameters,
0.1 GB each for the weights, the gradient sum and AdamW's two moments. `SegmentOptimizer`
keeps all of it on disk, per checkpoint unit (block i's attention or MLP half), and in memory
only while that unit runs:
- forward / evaluation: `resident(i, halves)` loads the units' LoRA weights;
- backward walk (pass 1): the engine hands each segment's evaluated gradients to
  `add_gradients`, which adds them to the unit's gradient sum on disk (gradient accumulation).
  With several ranks (distributed.py) the engine's grad_hook has summed each segment's
  gradients over the ranks before they arrive here;
- `apply(n_tokens)` (pass 2): a first read of the sums gives the mean gradient's global norm,
  so every unit gets the *global* clip factor (`optim.clip_grad_norm`'s, from squared norms
  added in a fixed order, `global_norm`: the in-memory trainer's bits; never per-unit
  clipping), then mlx's own AdamW update (`apply_single`) with its step count and
  learning-rate schedule advanced once per step, exactly as `opt.update` does.
Checkpoints hold the same files as the in-memory trainer's (`adapters.safetensors`,
`optimizer.safetensors` with mlx's flattened optimizer-state keys), written tensor by tensor,
so either trainer resumes the other's run.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from .blocks import HALVES, half_of, layers
from .errors import UserError
from .files import require_free_space, write_safetensors
from .models import family_of
from .spill import private_folder, register_cleanup, unregister_cleanup

Unit = tuple[int, str]  # (block index, half)
MOMENTS = ("m", "v")  # AdamW's per-parameter state keys in mlx
ADAPTERS, OPTIMIZER = "adapters.safetensors", "optimizer.safetensors"


def global_norm(squares: dict[str, mx.array]) -> mx.array:
    """The gradient's global norm from {parameter name: its squared norm}, added in float32 in
    name order. Both optimizers (trainer._update in memory, `SegmentOptimizer` unit by unit)
    add the same terms in this order, so their clip factors are the same bits;
    optim.clip_grad_norm adds in tree order, which the streamed walk does not follow."""
    total = mx.array(0.0, mx.float32)
    for k in sorted(squares):
        total = total + squares[k]
    return mx.sqrt(total)


def clip_scale(norm: mx.array, max_norm: float) -> mx.array | None:
    """optim.clip_grad_norm's factor for the global `norm` (None: --grad-clip 0, no clip)."""
    return mx.minimum(max_norm / (norm + 1e-6), 1.0) if max_norm > 0 else None


class SegmentOptimizer:
    """AdamW over LoRA weights whose state lives on disk per unit (see the module docstring)."""

    def __init__(
        self, model: nn.Module, opt: optim.Optimizer, grad_clip: float, folder=None, near: str = "."
    ):
        self.model, self.opt, self.grad_clip = model, opt, grad_clip
        self._prefix = family_of(model).layers_path(model)  # e.g. "model.layers"
        self.folder = private_folder("edgelora-state-", folder, near)
        self._token = register_cleanup(self._remove)
        self._closed = False
        self._names: dict[Unit, list[str]] = {}  # unit -> its LoRA names, relative to the block
        self._empty: dict[Unit, dict] = {}  # unit -> placeholder tree
        self._summed: set[Unit] = set()  # units with a gradient sum this step
        self._fresh: set[Unit] = set()  # units whose gradient sum restarts at the next add
        self._moments = False  # AdamW's m and v exist (from the first update on)
        self._offload()

    # --- layout on disk
    def _path(self, unit: Unit, kind: str) -> Path:
        return self.folder / f"{kind}-{unit[0]}-{unit[1]}.safetensors"

    def _offload(self) -> None:
        """Move every unit's LoRA weights to disk, leaving (0,)-shaped placeholders."""
        flat = {i: dict(tree_flatten(b.trainable_parameters())) for i, b in enumerate(self._blocks)}
        nbytes = sum(v.nbytes for p in flat.values() for v in p.values())
        try:  # weights, m, v, gradient sum, and a file being replaced
            require_free_space(self.folder, 5 * nbytes, "streamed LoRA state", "--no-stream-state")
        except Exception:
            self.close()
            raise
        units = {}
        for i, params in flat.items():
            for half in HALVES:
                mine = {k: v for k, v in params.items() if half_of(self.model, k) == half}
                if mine:
                    units[(i, half)] = mine
        try:  # every file first: a disk that fills up now leaves the model as it was
            for unit, mine in units.items():
                self._save(unit, "state", mine)
        except (OSError, RuntimeError) as e:
            self.close()
            raise UserError(
                f"{self.folder}: cannot write streamed LoRA state ({str(e).splitlines()[0]}); "
                "free some space, use --spill-dir on a bigger disk, or pass --no-stream-state"
            ) from None
        for unit, mine in units.items():
            self._names[unit] = sorted(mine)
            self._empty[unit] = tree_unflatten(
                [(k, mx.zeros((0,), dtype=v.dtype)) for k, v in mine.items()]
            )
            self._blocks[unit[0]].update(self._empty[unit])

    @property
    def _blocks(self) -> list[nn.Module]:
        return layers(self.model)

    @property
    def units(self) -> list[Unit]:
        return list(self._names)

    def _save(self, unit: Unit, kind: str, tensors: dict[str, mx.array]) -> None:
        path = self._path(unit, kind)
        tmp = path.with_suffix(".tmp.safetensors")
        mx.save_safetensors(str(tmp), tensors)
        os.replace(tmp, path)  # a lazy load of the old file keeps reading its own inode

    def _load(self, unit: Unit, kind: str) -> dict[str, mx.array]:
        return mx.load(str(self._path(unit, kind)))  # lazy: each tensor is read when evaluated

    # --- forward / evaluation
    @contextmanager
    def resident(self, i: int, halves: tuple[str, ...] = HALVES) -> Iterator[None]:
        """Block i's LoRA weights (those halves) loaded for the duration of a `with`."""
        mine = [(i, h) for h in halves if (i, h) in self._names]
        for unit in mine:
            saved = self._load(unit, "state")
            weights = [(k, saved[k]) for k in self._names[unit]]
            mx.eval([v for _, v in weights])
            self._blocks[i].update(tree_unflatten(weights))
        try:
            yield
        finally:
            for unit in mine:
                self._blocks[i].update(self._empty[unit])

    # --- pass 1: gradients, during the backward walk
    def begin_step(self) -> None:
        """The next gradients start new sums (a new optimizer step's first micro-batch)."""
        self._fresh = set(self._names)
        self._summed = set()

    def add_gradients(self, i: int, grads: dict) -> None:
        """Add block i's evaluated gradient tree (one or both halves) to the sums on disk."""
        flat = dict(tree_flatten(grads))
        for half in HALVES:
            unit = (i, half)
            mine = {k: v for k, v in flat.items() if half_of(self.model, k) == half}
            if not mine:
                continue
            if unit not in self._fresh:
                total = self._load(unit, "grad")
                mine = {k: total[k] + v for k, v in mine.items()}  # as tree_map(mx.add, sum, g)
            self._fresh.discard(unit)
            mx.eval(mine)
            self._summed.add(unit)
            self._save(unit, "grad", mine)

    # --- pass 2: the update
    def apply(self, n_tokens: int) -> float:
        """Mean gradient, global-norm clip, one AdamW step, unit by unit; returns the mean
        gradient's norm, and applies nothing when it is not finite (as trainer._update)."""
        missing = [u for u in self._names if u not in self._summed]
        if missing:
            raise RuntimeError(f"no gradients for units {missing[:3]} this step")
        squares = {}  # a first read of the sums: the mean gradient's squared norms
        for unit, names in self._names.items():
            grads = self._load(unit, "grad")
            mine = {self._global(unit, k): (grads[k] / n_tokens).square().sum() for k in names}
            mx.eval(mine)
            squares.update(mine)
        norm = global_norm(squares)
        if not math.isfinite(norm.item()):
            return norm.item()
        scale = clip_scale(norm, self.grad_clip)
        self.opt.apply_gradients({}, {})  # the schedule and step count, as opt.update does
        for unit, names in self._names.items():
            saved, grads = self._load(unit, "state"), self._load(unit, "grad")
            new = {}
            for k in names:
                g = grads[k] / n_tokens
                if scale is not None:
                    g = (g * scale).astype(g.dtype)
                st = {m: saved[f"{k}.{m}"] for m in MOMENTS} if self._moments else {}
                if not st:
                    self.opt.init_single(saved[k], st)
                new[k] = self.opt.apply_single(g, saved[k], st)
                new.update({f"{k}.{m}": st[m] for m in MOMENTS})
            mx.eval(new)
            self._save(unit, "state", new)
        self._moments = True
        return norm.item()

    # --- several ranks
    @property
    def has_moments(self) -> bool:
        """AdamW's m and v exist (from the first update, or a resumed checkpoint, on)."""
        return self._moments

    def synchronize(self, from_main: Callable[[dict], dict], moments: bool) -> None:
        """Every unit's files become rank 0's, unit by unit (data parallelism, at setup: rank 0
        may have resumed a checkpoint). `from_main(tensors)` returns rank 0's tensors under the
        same names (distributed.World); `moments`: whether rank 0 holds AdamW's m and v (a
        rank without them sends placeholders of the weights' shapes, which rank 0 replaces)."""
        self._moments = moments
        for unit, names in self._names.items():
            saved = self._load(unit, "state")
            mine = {k: saved[k] for k in names}
            if moments:
                mine.update(
                    {f"{k}.{m}": saved.get(f"{k}.{m}", saved[k]) for k in names for m in MOMENTS}
                )
            self._save(unit, "state", from_main(mine))

    # --- checkpoints, the adapter, the end of training
    def _global(self, unit: Unit, k: str) -> str:
        return f"{self._prefix}.{unit[0]}.{k}"

    def adapter_tensors(self) -> dict[str, mx.array]:
        """{name: lazily loaded LoRA weight}, named as in `model.trainable_parameters()`."""
        out = {}
        for unit, names in self._names.items():
            saved = self._load(unit, "state")
            out.update({self._global(unit, k): saved[k] for k in names})
        return out

    def optimizer_tensors(self) -> dict[str, mx.array]:
        """{name: lazily loaded tensor}, the keys of `tree_flatten(opt.state)`."""
        out = dict(tree_flatten(self.opt.state))
        if self._moments:
            for unit, names in self._names.items():
                saved = self._load(unit, "state")
                for k in names:
                    out.update({f"{self._global(unit, k)}.{m}": saved[f"{k}.{m}"] for m in MOMENTS})
        return out

    def save_checkpoint(self, folder: Path) -> None:
        write_safetensors(folder / ADAPTERS, self.adapter_tensors())
        write_safetensors(folder / OPTIMIZER, self.optimizer_tensors())

    def load_checkpoint(self, adapters: dict, opt_state: dict) -> None:
        """Resume from lazily loaded checkpoint tensors (either trainer's), unit by unit."""
        self._moments = any(k.endswith(".m") for k in opt_state)
        for unit, names in self._names.items():
            new = {k: adapters[self._global(unit, k)] for k in names}
            if self._moments:
                for k in names:
                    new.update(
                        {f"{k}.{m}": opt_state[f"{self._global(unit, k)}.{m}"] for m in MOMENTS}
                    )
            mx.eval(new)
            self._save(unit, "state", new)
        self.opt.state = {k: opt_state[k] for k in ("step", "learning_rate") if k in opt_state}
        mx.eval(self.opt.state)

    def restore(self) -> None:
        """Load every unit's LoRA weights back into the model for good (e.g. to generate)."""
        for unit, names in self._names.items():
            saved = self._load(unit, "state")
            weights = [(k, saved[k]) for k in names]
            mx.eval([v for _, v in weights])
            self._blocks[unit[0]].update(tree_unflatten(weights))
        self._empty.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._remove()  # then forgotten: a Ctrl-C during the removal leaves it to atexit
        unregister_cleanup(self._token)

    def _remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
