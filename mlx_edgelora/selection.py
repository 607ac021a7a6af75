"""Which adapter to keep and when to stop: --keep-best and --early-stop.

Why a module of its own: the decision needs a little state (best loss, its step, evaluations
without improvement) that must survive --resume, so it lives in the checkpoint's state.json
and the training loop only asks two questions after each evaluation: did it improve (then
--keep-best writes this adapter as adapters.safetensors) and is it time to stop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Selection:
    """Best exact validation loss so far, its step, and evaluations since it was reached."""

    best_loss: float | None = None
    best_step: int | None = None
    since_best: int = 0
    last_step: int | None = None  # the last evaluated step: a resume redoes a missed one

    def update(self, step: int, val_loss: float) -> bool:
        """Record an evaluation; True when it is a new best (strictly lower, finite)."""
        self.last_step = step
        if math.isfinite(val_loss) and (self.best_loss is None or val_loss < self.best_loss):
            self.best_loss, self.best_step, self.since_best = val_loss, step, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, patience: int) -> bool:
        """--early-stop K: K evaluations in a row without a new best (0 = never stop)."""
        return patience > 0 and self.since_best >= patience

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> Selection:
        return cls(**(state or {}))

    def to_ints(self) -> list[int]:
        """As int32s, to send to the other ranks (the best loss's float64 bits as two)."""
        loss = np.array([math.nan if self.best_loss is None else self.best_loss], np.float64)
        steps = [-1 if s is None else s for s in (self.best_step, self.last_step)]
        return steps + [self.since_best] + loss.view(np.int32).tolist()

    @classmethod
    def from_ints(cls, ints: list[int]) -> Selection:
        best_step, last_step, since_best, *bits = ints
        loss = float(np.array(bits, np.int32).view(np.float64)[0])
        return cls(
            None if math.isnan(loss) else loss,
            None if best_step < 0 else best_step,
            since_best,
            None if last_step < 0 else last_step,
        )


def epoch_steps(epochs: float, n_rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps for `epochs` passes over `n_rows` packed rows (at least one step)."""
    return max(1, math.ceil(epochs * n_rows / (batch_size * grad_accum)))
