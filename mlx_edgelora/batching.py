"""Documents -> fixed-shape training batches: deterministic split, packing, resumable iterator.

Packing concatenates documents (each already ends with EOS) into one token stream and cuts it
into rows of max_seq_len + 1 tokens that overlap by one token: row r = stream[r*L : r*L+L+1],
inputs = row[:-1], targets = row[1:], mask = row_mask[1:]. So every stream token after the
first is a target in exactly one row: long documents continue in the next row, the last row is
padded (mask False), and no token is dropped. Documents in a row see each other through causal
attention (no cross-document attention mask), the usual trade-off of packing: every position
carries loss and every batch has the same shape, which the memory engine's plan relies on.

The iterator's order depends only on (seed, epoch), and its state is (epoch, position), so a
resumed run yields exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .data import Example
from .errors import UserError

log = logging.getLogger(__name__)

Row = tuple[np.ndarray, np.ndarray]  # tokens int32 [L+1], mask bool [L+1]


@dataclass
class Batch:
    """A micro-batch on the host: mask[b, l] = targets[b, l] carries loss (padding is False)."""

    inputs: np.ndarray  # [B, L] int32
    targets: np.ndarray  # [B, L] int32, inputs shifted left by one
    mask: np.ndarray  # [B, L] bool


def split(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val) by document, chosen by a content hash, so the same data splits the same way.

    With >= 2 documents and val_fraction > 0, val gets round(val_fraction * n) documents but at
    least one, and train is never empty. Both keep the input order.
    """
    n = len(examples)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    order = sorted(range(n), key=lambda i: _doc_hash(examples[i], seed))
    val_ids = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_ids]
    val = [e for i, e in enumerate(examples) if i in val_ids]
    return train, val


def _doc_hash(example: Example, seed: int) -> bytes:
    # sha256, not hash(): Python's str hash is randomized per process.
    h = hashlib.sha256(f"{seed}\0{example.source}\0".encode())
    h.update(np.asarray(example.tokens, dtype=np.int64).tobytes())
    return h.digest()


def pack(examples: list[Example], max_seq_len: int, pad_id: int = 0) -> list[Row]:
    """Concatenate documents into overlapping rows of max_seq_len + 1 tokens (see docstring)."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1 (got {max_seq_len})")
    if not examples:
        return []
    tokens = np.concatenate([np.asarray(e.tokens, dtype=np.int32) for e in examples])
    mask = np.concatenate([np.asarray(e.mask, dtype=np.bool_) for e in examples])
    if mask[0]:
        log.warning("pack: the first token of the data is marked trainable but has no context")
    n_rows = max(1, -(-(len(tokens) - 1) // max_seq_len))  # ceil((N - 1) / L)
    pad = n_rows * max_seq_len + 1 - len(tokens)
    tokens = np.concatenate([tokens, np.full(pad, pad_id, dtype=np.int32)])
    mask = np.concatenate([mask, np.zeros(pad, dtype=np.bool_)])
    # [n_rows, L+1] gather: row r starts at r*L, so consecutive rows share one token.
    idx = np.arange(n_rows)[:, None] * max_seq_len + np.arange(max_seq_len + 1)[None, :]
    return list(zip(tokens[idx], mask[idx], strict=True))


def make_batch(tokens: np.ndarray, mask: np.ndarray) -> Batch:
    """Rows [B, L+1] -> Batch with inputs/targets/mask [B, L]."""
    return Batch(
        inputs=np.ascontiguousarray(tokens[:, :-1], dtype=np.int32),
        targets=np.ascontiguousarray(tokens[:, 1:], dtype=np.int32),
        mask=np.ascontiguousarray(mask[:, 1:], dtype=np.bool_),
    )


class BatchIterator:
    """Endless batches of `batch_size` rows, reshuffled each epoch from (seed, epoch).

    Rows are read as one stream of epochs, so a batch may straddle an epoch boundary and no
    row is ever skipped. state_dict() / load_state_dict() resume at the exact next batch.
    """

    def __init__(self, rows: list[Row], batch_size: int, seed: int, shuffle: bool = True):
        if not rows:
            raise ValueError("BatchIterator needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        self.tokens = np.stack([r[0] for r in rows])  # [R, L+1]
        self.mask = np.stack([r[1] for r in rows])  # [R, L+1]
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        picks: list[np.ndarray] = []
        need = self.batch_size
        while need:
            take = self._epoch_order()[self.position : self.position + need]
            picks.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(self.tokens):
                self.epoch, self.position = self.epoch + 1, 0
        idx = np.concatenate(picks)
        return make_batch(self.tokens[idx], self.mask[idx])

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.tokens)
            if self.shuffle:
                rng = np.random.default_rng([self.seed % 2**64, self.epoch])
                order = rng.permutation(n)
            else:
                order = np.arange(n)
            self._order = (self.epoch, order)
        return self._order[1]

    def state_dict(self) -> dict:
        """JSON-serialisable position: resume with load_state_dict on the same rows and seed."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "n_rows": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        n_rows = len(self.tokens)
        if state["n_rows"] != n_rows:
            raise UserError(
                f"checkpoint: its data position is for {state['n_rows']} packed rows but the "
                f"data now packs into {n_rows}; resume with the same --data, --max-seq-len and "
                "model, or start a fresh run"
            )
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise UserError(
                f"checkpoint: data order saved with seed {state['seed']} (shuffle "
                f"{state['shuffle']}), now seed {self.seed} (shuffle {self.shuffle}); resume "
                "with the same --seed or start a fresh run"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def iter_eval_batches(rows: list[Row], batch_size: int, limit: int | None = -1) -> Iterator[Batch]:
    """Rows in order, batch_size at a time (the last batch may be smaller); at most `limit`
    batches (None or negative = all)."""
    n_batches = -(-len(rows) // batch_size)
    if limit is not None and limit >= 0:
        n_batches = min(n_batches, limit)
    for b in range(n_batches):
        chunk = rows[b * batch_size : (b + 1) * batch_size]
        yield make_batch(np.stack([r[0] for r in chunk]), np.stack([r[1] for r in chunk]))
