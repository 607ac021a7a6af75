"""A training dataset in one call: read documents, split by document, pack into rows.

This is the data pipeline's front door for the trainer, the CLI and notebooks; the work is
done in data.py (files -> tokens + trainable mask) and batching.py (split, pack, iterate).

Two layouts. mlx-lm's: a --data folder holding train.jsonl (with valid.jsonl and test.jsonl)
is read as its users mean it: train trains, valid validates, test is held out (never trained
on; --test reports its exact loss). Any other file or folder: every document is pooled and
split into train / validation by a content hash (batching.split).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batching import pack, split
from .config import TrainConfig
from .data import find_files, load_documents
from .errors import UserError

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "assets" / "sample_notes"
log = logging.getLogger(__name__)
SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}  # mlx-lm


@dataclass
class Dataset:
    """Packed rows of max_seq_len + 1 tokens, each with its trainable mask."""

    train_rows: list
    val_rows: list
    n_documents: int
    source: str
    test_rows: list = field(default_factory=list)  # mlx-lm layout's test.jsonl: never trained on

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
        test = f" / {len(self.test_rows)} test" if self.test_rows else ""
        return (
            f"{self.n_documents} documents from {self.source}: {len(self.train_rows)} train / "
            f"{len(self.val_rows)} validation{test} rows, {self.trainable_tokens()} trainable "
            "tokens"
        )


def load_dataset(path: str | None, tokenizer, cfg: TrainConfig) -> Dataset:
    """Documents under `path` (default: the bundled sample notes) as packed train/val/test rows."""
    source = str(path or SAMPLE_DATA)
    layout = mlx_lm_layout(Path(source).expanduser())
    if layout:
        train_docs, val_docs, test_docs = _read_layout(layout, source, tokenizer, cfg)
    else:
        train_docs, val_docs = split(load_documents(source, tokenizer), cfg.val_fraction, cfg.seed)
        test_docs = []
    if cfg.test and not test_docs:
        raise UserError(
            f"--test: {source} has no test.jsonl; put the held-out records in "
            "<data>/test.jsonl beside train.jsonl (mlx-lm's layout), or drop --test"
        )
    data = Dataset(
        train_rows=pack(train_docs, cfg.max_seq_len),
        val_rows=pack(val_docs, cfg.max_seq_len) if val_docs else [],
        n_documents=len(train_docs) + len(val_docs) + len(test_docs),
        source=source,
        test_rows=pack(test_docs, cfg.max_seq_len) if test_docs else [],
    )
    print(data.describe(), file=sys.stderr)
    return data


def mlx_lm_layout(root: Path) -> dict[str, Path] | None:
    """{split: file} when `root` is a folder in mlx-lm's layout (it holds train.jsonl)."""
    if not root.is_dir() or not (root / SPLIT_FILES["train"]).is_file():
        return None
    return {k: root / name for k, name in SPLIT_FILES.items() if (root / name).is_file()}


def _read_layout(layout: dict[str, Path], source: str, tokenizer, cfg: TrainConfig):
    """(train, valid, test) documents, each split from its own file."""
    ignored = len(find_files(Path(source).expanduser())[0]) - len(layout)
    if ignored:
        log.warning(
            "%s: %d other data files ignored (a folder with train.jsonl is read as mlx-lm's "
            "train/valid/test.jsonl only)",
            source,
            ignored,
        )
    train = load_documents(str(layout["train"]), tokenizer)
    if "valid" in layout:
        valid = load_documents(str(layout["valid"]), tokenizer)
    else:  # mlx-lm would refuse; we hold out --val-fraction of train instead, and say so
        log.warning("%s: no valid.jsonl; validating on --val-fraction of train.jsonl", source)
        train, valid = split(train, cfg.val_fraction, cfg.seed)
    test = load_documents(str(layout["test"]), tokenizer) if "test" in layout else []
    return train, valid, test
