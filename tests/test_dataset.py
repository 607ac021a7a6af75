"""mlx-lm's --data layout: train.jsonl trains, valid.jsonl validates, test.jsonl is held out.

The test records must never reach a training row, and `--test` must report the exact loss on
all of them (checked against a direct forward pass of the trained model).
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import write_tiny_model_dir

from mlx_edgelora import lora
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.dataset import load_dataset
from mlx_edgelora.errors import UserError
from mlx_edgelora.loading import load_model
from mlx_edgelora.trainer import train


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def layout(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(
        folder / "train.jsonl",
        [f"train record {i}: " + "the bees are calm. " * 3 for i in range(8)],
    )
    _write(folder / "valid.jsonl", [f"valid record {i}: honey in the frames." for i in range(3)])
    _write(folder / "test.jsonl", ["QQQQ held-out ZZZZ record.", "XXXX second held-out YYYY."])
    return folder


def _texts(rows, tokenizer) -> str:
    return " ".join(tokenizer.decode([int(t) for t in tokens]) for tokens, _ in rows)


def test_each_file_feeds_its_own_split_and_test_never_trains(layout, tiny_tokenizer):
    data = load_dataset(str(layout), tiny_tokenizer, TrainConfig(max_seq_len=64, val_fraction=0.5))
    train_text = _texts(data.train_rows, tiny_tokenizer)
    val_text = _texts(data.val_rows, tiny_tokenizer)
    test_text = _texts(data.test_rows, tiny_tokenizer)
    assert "bees" in train_text and "honey" not in train_text
    assert "honey" in val_text and "bees" not in val_text
    for marker in ["QQQQ", "ZZZZ", "XXXX", "YYYY"]:
        assert marker in test_text and marker not in train_text + val_text
    assert data.n_documents == 13 and "test rows" in data.describe()


def test_without_valid_jsonl_train_is_split_and_it_is_said(layout, tiny_tokenizer, caplog):
    (layout / "valid.jsonl").unlink()
    (layout / "notes.txt").write_text("a stray note that must not be trained on")
    data = load_dataset(str(layout), tiny_tokenizer, TrainConfig(max_seq_len=64, val_fraction=0.25))
    assert len(data.val_rows) >= 1 and data.test_rows
    assert "no valid.jsonl" in caplog.text and "1 other data files ignored" in caplog.text
    assert "stray" not in _texts(data.train_rows + data.val_rows, tiny_tokenizer)


def test_a_plain_folder_still_pools_and_splits(tmp_path, tiny_tokenizer):
    for i in range(4):
        (tmp_path / f"n{i}.txt").write_text(f"note {i} about the hives")
    data = load_dataset(str(tmp_path), tiny_tokenizer, TrainConfig(max_seq_len=64))
    assert data.train_rows and data.val_rows and not data.test_rows


def test_test_flag_without_test_jsonl_is_a_user_error(layout, tiny_tokenizer):
    (layout / "test.jsonl").unlink()
    with pytest.raises(UserError, match="--test: .* has no test.jsonl"):
        load_dataset(str(layout), tiny_tokenizer, TrainConfig(test=True))


def _exact_loss(model, rows) -> float:
    """Mean cross-entropy over every trainable target of `rows`, by a plain forward pass."""
    total, count = 0.0, 0
    for tokens, mask in rows:
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        logits = model(mx.array(tokens[None, :-1])).astype(mx.float32)[0]
        nll = (
            mx.logsumexp(logits, -1)
            - mx.take_along_axis(logits, mx.array(tokens[1:, None]), -1)[:, 0]
        )
        keep = mask[1:].astype(bool)
        total += float(np.asarray(nll)[keep].sum())
        count += int(keep.sum())
    return total / count


def test_test_flag_reports_the_exact_held_out_loss(tmp_path, layout):
    model_dir = write_tiny_model_dir(tmp_path / "tiny", "llama")
    out = tmp_path / "out"
    cfg = dict(model=str(model_dir), data=str(layout), out=str(out), max_seq_len=32)
    cfg |= dict(batch_size=2, rank=4, lr=5e-3, warmup=1, eval_every=0, save_every=0, seed=1)
    result = train(TrainConfig(steps=3, test=True, **cfg))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in logged if "test_loss" in r]
    assert len(test) == 1 and test[0]["step"] == 3 and test[0]["test_tokens"] > 0

    loaded = load_model(str(model_dir))
    lora.load_adapters(loaded.model, out)
    data = load_dataset(str(layout), loaded.tokenizer, TrainConfig(max_seq_len=32))
    want = _exact_loss(loaded.model, data.test_rows)
    assert test[0]["test_loss"] == pytest.approx(want, rel=1e-5)
    assert result.history[-1]["test_loss"] == test[0]["test_loss"]

    # --test alone on the finished run: evaluates the saved adapter, trains nothing
    again = train(TrainConfig(steps=3, test=True, resume=True, **cfg))
    assert [r for r in again.history if "loss" in r] == []
    assert again.history[-1]["test_loss"] == pytest.approx(want, rel=1e-5)
