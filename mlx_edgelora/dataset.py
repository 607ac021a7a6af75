"""A training dataset in one call: read documents, split by document, pack into rows.

This is the data pipeline's front door for the trainer, the CLI and notebooks; the work is
done in data.py (files -> tokens + trainable mask) and batching.py (split, pack, iterate).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batching import pack, split
from .config import TrainConfig
from .data import load_documents

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "assets" / "sample_notes"


@dataclass
class Dataset:
    """Packed rows of max_seq_len + 1 tokens, each with its trainable mask."""

    train_rows: list
    val_rows: list
    n_documents: int
    source: str

    def trainable_tokens(self, which: str = "train") -> int:
        rows = self.train_rows if which == "train" else self.val_rows
        return int(sum(np.asarray(m[1:]).sum() for _, m in rows))

    def trainable_fraction(self) -> float:
        """Share of training positions that carry loss (what logits masking saves on)."""
        positions = sum(len(t) - 1 for t, _ in self.train_rows)
        return self.trainable_tokens() / max(positions, 1)

    def token_bytes(self) -> int:
        """Host bytes of the packed rows (tokens + masks): the memory plan's token store."""
        return sum(t.nbytes + m.nbytes for t, m in self.train_rows + self.val_rows)

    def describe(self) -> str:
        return (
            f"{self.n_documents} documents from {self.source}: {len(self.train_rows)} train / "
            f"{len(self.val_rows)} validation rows, {self.trainable_tokens()} trainable tokens"
        )


def load_dataset(path: str | None, tokenizer, cfg: TrainConfig) -> Dataset:
    """Documents under `path` (default: the bundled sample notes) as packed train/val rows."""
    source = str(path or SAMPLE_DATA)
    docs = load_documents(source, tokenizer)
    train_docs, val_docs = split(docs, cfg.val_fraction, cfg.seed)
    data = Dataset(
        train_rows=pack(train_docs, cfg.max_seq_len),
        val_rows=pack(val_docs, cfg.max_seq_len) if val_docs else [],
        n_documents=len(docs),
        source=source,
    )
    print(data.describe(), file=sys.stderr)
    return data
