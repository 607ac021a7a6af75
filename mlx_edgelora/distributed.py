"""Data-parallel training over several Macs with `mx.distributed`: one process (rank) each.

Every rank runs the same command (`mlx.launch ... -- python -m mlx_edgelora.train ...`), reads
the same data and builds the same *global* micro-batch of `ranks x --batch-size` rows; rank r
trains on rows r, r + ranks, ... of it. So 2 ranks with --batch-size 1 see exactly the rows of
one process with --batch-size 2, and their summed gradients are the same sums.

- Gradients: the engine hands each segment's LoRA gradients to `World.reduce` as soon as that
  segment's backward ends; it starts an `all_sum` of them (one flat buffer per segment) with
  `mx.async_eval`, so on a Mac the transfer overlaps the next segment's recompute. With
  --stream-state the engine hands the *reduced* sums to `SegmentOptimizer.add_gradients`, so
  the files on disk, the global gradient norm and its clip factor are those of all ranks'
  gradients, exactly as in memory.
- Loss and token counts are summed over ranks (`sum_counts`): the trainer divides the summed
  gradients by the global token count, and the reported loss is the global one.
- Only rank 0 reads and writes --out (adapter, checkpoints, metrics). It sends its adapter,
  optimizer state and data position to the others (`broadcast`, an all_sum of zeros
  elsewhere), so on resume the other Macs need no copy of the run folder.
- A rank that dies makes the others' next collective fail ("connection lost"): `collective`
  turns that into a one-line error. A rank that hangs would block the others forever:
  a watchdog thread ends the process (spill folders removed first) when a collective phase
  makes no progress for --dist-timeout seconds.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import spill
from .batching import Batch, BatchIterator
from .config import TrainConfig
from .errors import UserError

if TYPE_CHECKING:
    from .state import SegmentOptimizer

WATCHDOG_EXIT = 2  # the CLI's exit code for an error line
SETUP_PATIENCE = 600.0  # s: the ranks meet after loading the model, which can take minutes


class Watchdog:
    """Ends the process if an armed phase sees no `tick()` for `timeout` seconds.

    MLX's collectives block inside `mx.eval` (the GIL is released), so a thread can still
    notice the silence, remove the spill folders and `os._exit` with one line.
    """

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self._what: str | None = None
        self._last, self._limit = time.monotonic(), timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="edgelora-watchdog").start()

    def arm(self, what: str, patience: float | None = None) -> None:
        """Watch from now; `patience` (default: the timeout) for this phase only."""
        with self._lock:
            self._what, self._last = what, time.monotonic()
            self._limit = patience or self.timeout

    def tick(self) -> None:
        self._last = time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._what = None

    def stop(self) -> None:
        """End the thread (a notebook may train several times in one process)."""
        self.disarm()
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            with self._lock:
                what, limit = self._what, self._limit
                silent = time.monotonic() - self._last
            if what is not None and silent > limit:
                self._fire(what, limit)

    def _fire(self, what: str, limit: float) -> None:
        spill.cleanup_now()  # os._exit skips atexit: remove this rank's spill folders first
        sys.stderr.write(
            f"error: rank {self.rank}: no progress for {limit:g} s during {what}: "
            "another rank died or hangs; spill folders removed; stop all ranks and rerun with "
            "--resume (raise --dist-timeout if one step's forward pass is that slow)\n"
        )
        sys.stderr.flush()
        os._exit(WATCHDOG_EXIT)


class World:
    """This process's place among the ranks; with one rank every method is a no-op."""

    def __init__(self, group: mx.distributed.Group | None, timeout: float):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.watchdog = Watchdog(timeout, self.rank) if self.size > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: BatchIterator) -> Iterator[Batch]:
        """This rank's rows of each global micro-batch (`batches` yields ranks x batch rows)."""
        return batches if self.size == 1 else _Shard(batches, self)

    def rows_of(self, batch: Batch) -> Batch:
        """This rank's share of a global batch."""
        return batch if self.size == 1 else rows_of(batch, self.rank, self.size)

    @contextmanager
    def collective(self, what: str, patience: float | None = None) -> Iterator[None]:
        """A phase that waits on the other ranks: watched (for `patience` seconds without
        progress, default --dist-timeout), and a lost peer is one line."""
        if self.size == 1:
            yield
            return
        self.watchdog.arm(what, patience)
        try:
            yield
        except RuntimeError as e:
            if "[ring]" not in str(e) and "[mpi]" not in str(e) and "[jaccl]" not in str(e):
                raise
            raise UserError(
                f"rank {self.rank}: lost the connection to another rank during {what} ({e}); "
                "stop all ranks and rerun with --resume"
            ) from None
        finally:
            self.watchdog.disarm()

    def tick(self) -> None:
        """Progress: the watchdog's clock starts again."""
        if self.watchdog is not None:
            self.watchdog.tick()

    def reduce(self, segment: int, grads: dict) -> dict:
        """The engine's gradient hook: segment `segment`'s gradients summed over ranks.

        One flat all_sum per segment (fewer, larger messages), started at once with
        async_eval; the step's final eval waits for it.
        """
        self.tick()
        leaves = [v for _, v in tree_flatten(grads)]
        if not leaves:
            return grads
        buf = mx.distributed.all_sum(_flat(leaves), group=self.group)
        pieces = iter(_unflat(buf, leaves))
        summed = tree_map(lambda _: next(pieces), grads)
        mx.async_eval(summed)
        return summed

    def sum_counts(self, loss_sum: float, n_tok: int) -> tuple[float, int]:
        """(loss sum, token count) summed over ranks: the global step's figures."""
        if self.size == 1:
            return loss_sum, n_tok
        loss = mx.distributed.all_sum(mx.array([loss_sum], dtype=mx.float32), group=self.group)
        count = mx.distributed.all_sum(mx.array([n_tok], dtype=mx.int32), group=self.group)
        mx.eval(loss, count)
        return loss.item(), count.item()

    def broadcast(
        self,
        model: nn.Module,
        opt: optim.Optimizer | None,
        ints: list[int],
        state: SegmentOptimizer | None = None,
    ) -> list[int]:
        """Make every rank hold rank 0's adapter, optimizer state (`opt`: a resumed one) and
        `ints` (the step and data position); with --stream-state (`state`) the adapter and
        AdamW's moments are sent unit by unit from the files, the step and learning rate
        from `opt`."""
        if self.size == 1:
            return ints
        if state is not None:
            moments = self.ints_from_main([int(state.has_moments)])[0]
            state.synchronize(self._from_main, bool(moments))
            if opt is not None:
                opt.state = tree_unflatten(
                    list(self._from_main(dict(tree_flatten(opt.state))).items())
                )
            return self.ints_from_main(ints)
        weights = self._from_main(dict(tree_flatten(model.trainable_parameters())))
        model.load_weights(list(weights.items()), strict=False)
        if opt is not None:
            opt.init(model.trainable_parameters())  # the other ranks: same names, zeros
            opt.state = tree_unflatten(list(self._from_main(dict(tree_flatten(opt.state))).items()))
        return self.ints_from_main(ints)

    def ints_from_main(self, ints: list[int]) -> list[int]:
        """Rank 0's int32s, summed as int32s: exact (the float32 buffer of `_from_main`
        would round anything above 2**24, e.g. a float64's bits sent as two int32s)."""
        mine = ints if self.is_main else [0] * len(ints)
        out = mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=self.group)
        mx.eval(out)
        return out.tolist()

    def _from_main(self, flat: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rank 0's arrays under the same names (sorted, so dict order cannot differ)."""
        keys = sorted(flat)
        leaves = [flat[k] if self.is_main else mx.zeros_like(flat[k]) for k in keys]
        buf = mx.distributed.all_sum(_flat(leaves), group=self.group)
        out = dict(zip(keys, _unflat(buf, leaves), strict=True))
        mx.eval(out)
        return out

    def check_same_data(self, main: int, mine: int) -> None:
        """Every rank must pack the same rows, or the shards overlap and miss (silently)."""
        if main != mine:
            raise UserError(
                f"--data: rank {self.rank}'s training rows differ from rank 0's (fingerprint "
                f"{mine} vs {main}); give every Mac the same --data, --model and --max-seq-len"
            )

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()


def fingerprint(batches: BatchIterator) -> int:
    """A 24-bit digest of the packed training rows (exact through a float32 all_sum)."""
    h = hashlib.sha256(batches.tokens.tobytes())
    h.update(batches.mask.tobytes())
    return int.from_bytes(h.digest()[:3], "little")


def _flat(leaves: list[mx.array]) -> mx.array:
    """Arrays -> one float32 vector (exact for float32/bfloat16/float16 and ints below 2**24:
    gradients, adapters, AdamW moments and its step counter)."""
    return mx.concatenate([v.reshape(-1).astype(mx.float32) for v in leaves])


def _unflat(buf: mx.array, like: list[mx.array]) -> list[mx.array]:
    out, offset = [], 0
    for v in like:
        out.append(buf[offset : offset + v.size].reshape(v.shape).astype(v.dtype))
        offset += v.size
    return out


def rows_of(batch: Batch, rank: int, size: int) -> Batch:
    """Rows rank, rank + size, ... of a global batch: disjoint over ranks, covering it."""
    return Batch(batch.inputs[rank::size], batch.targets[rank::size], batch.mask[rank::size])


class _Shard:
    """Rows rank, rank + size, ... of each global batch; position state is the global one."""

    def __init__(self, batches: BatchIterator, world: World):
        self.batches, self.world = batches, world

    def __iter__(self) -> _Shard:
        return self

    def __next__(self) -> Batch:
        return self.world.rows_of(next(self.batches))

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def init(cfg: TrainConfig) -> World:
    """Join the ranks started by mlx.launch (or mpirun); a plain run is a world of one."""
    try:
        group = mx.distributed.init(strict=False, backend=cfg.backend)
    except RuntimeError as e:
        raise UserError(
            f"--backend {cfg.backend}: cannot join the other ranks ({e}); check the hostfile's "
            "IPs and ports and that the backend is available on every Mac"
        ) from None
    if group.size() == 1:
        if _launched():
            raise UserError(
                f"--backend {cfg.backend}: started by a launcher for several ranks but joined "
                "none; use --backend ring with mlx.launch, mpi with mpirun"
            )
        return World(None, cfg.dist_timeout)
    world = World(group, cfg.dist_timeout)
    spill.set_owner_tag(f"r{world.rank}-")
    return world


def _launched() -> bool:
    """Whether mlx.launch or mpirun started this process as one of several ranks."""
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hostfile = os.environ.get("MLX_HOSTFILE")  # mlx.launch --backend ring: '' for one host
    return bool(hostfile) and os.path.isfile(hostfile) and len(open(hostfile).read().strip()) > 2


def check_resume(saved: dict, cfg: TrainConfig, world: World) -> None:
    """Resuming needs the same global micro-batch (ranks x --batch-size): then every step sees
    the rows and sums the gradients it would have, on any number of ranks."""
    old_cfg = saved.get("config", {})
    old_ranks, old_batch = saved.get("world_size", 1), old_cfg.get("batch_size", cfg.batch_size)
    if old_ranks * old_batch != world.size * cfg.batch_size:
        raise UserError(
            f"--resume: the saved run's global batch was {old_ranks} rank(s) x --batch-size "
            f"{old_batch}, now {world.size} x {cfg.batch_size}; the data position and gradient "
            f"sums depend on it: use ranks x --batch-size = {old_ranks * old_batch} or start "
            "again with --overwrite"
        )
