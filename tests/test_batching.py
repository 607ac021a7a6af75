"""batching.py: packing loses no token, deterministic split, exactly resumable iterator."""

import json
import random

import numpy as np
import pytest

from mlx_edgelora.batching import Batch, BatchIterator, iter_eval_batches, pack, split
from mlx_edgelora.data import Example
from mlx_edgelora.errors import UserError


def make_docs(lengths: list[int], seed: int = 0) -> list[Example]:
    """Documents with distinct tokens and a random mask (token 0 never trainable, as data.py)."""
    rng = random.Random(seed)
    docs, next_tok = [], 1
    for i, n in enumerate(lengths):
        tokens = list(range(next_tok, next_tok + n))
        next_tok += n
        mask = [False] + [rng.random() < 0.7 for _ in range(n - 1)]
        docs.append(Example(tokens=tokens, mask=mask, source=f"doc{i}.txt"))
    return docs


@pytest.mark.parametrize("max_seq_len", [1, 3, 7, 16, 1000])
def test_pack_loses_no_token(max_seq_len):
    docs = make_docs([5, 40, 1, 13, 2])
    rows = pack(docs, max_seq_len)
    stream = np.concatenate([d.tokens for d in docs])
    assert all(t.shape == (max_seq_len + 1,) and t.dtype == np.int32 for t, _ in rows)
    assert all(m.shape == (max_seq_len + 1,) and m.dtype == np.bool_ for _, m in rows)
    # every target position appears once: sum of trainable mask before == after packing
    assert sum(int(m[1:].sum()) for _, m in rows) == sum(sum(d.mask) for d in docs)
    # rows overlap by one token; un-overlapping them gives back the stream, then padding
    rebuilt = np.concatenate([rows[0][0]] + [t[1:] for t, _ in rows[1:]])
    np.testing.assert_array_equal(rebuilt[: len(stream)], stream)
    assert len(rebuilt) - len(stream) < max_seq_len  # at most one row's worth of padding


def test_pack_pads_last_row_with_mask_false():
    docs = make_docs([10])
    rows = pack(docs, 4, pad_id=0)  # 10 tokens -> targets 1..9 -> 3 rows of 4 targets
    assert len(rows) == 3
    tokens, mask = rows[-1]
    np.testing.assert_array_equal(tokens, [9, 10, 0, 0, 0])
    assert not mask[2:].any()
    assert pack([], 8) == []


def test_split_deterministic_disjoint_and_order_free():
    docs = make_docs([3 + i for i in range(20)])
    train, val = split(docs, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert {d.source for d in train}.isdisjoint({d.source for d in val})
    assert split(docs, 0.2, seed=1) == (train, val)
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    assert {d.source for d in split(shuffled, 0.2, seed=1)[1]} == {d.source for d in val}
    assert split(docs, 0.2, seed=2)[1] != val  # the seed changes the choice (fixed docs/seeds)


def test_split_edge_cases():
    two = make_docs([4, 5])
    train, val = split(two, 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1  # at least one val doc from >= 2 docs
    assert split(two, 0.99, seed=0)[0]  # train never empty
    assert split(two, 0.0, seed=0) == (two, [])
    one = make_docs([4])
    assert split(one, 0.5, seed=0) == (one, [])


def rows_for_iterator():
    return pack(make_docs([7, 30, 12, 8]), 4)  # 57 tokens = 56 targets -> 14 rows


def test_iterator_batches_and_epochs():
    rows = rows_for_iterator()
    it = BatchIterator(rows, batch_size=3, seed=0)
    batch = next(it)
    assert isinstance(batch, Batch)
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (3, 4)
    assert batch.inputs.dtype == batch.targets.dtype == np.int32 and batch.mask.dtype == np.bool_
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    # each epoch visits every row once; batches straddle epoch boundaries, nothing skipped
    seen = np.concatenate([batch.inputs] + [next(it).inputs for _ in range(13)])  # 42 = 3 epochs
    for e in range(3):
        epoch_rows = seen[e * 14 : (e + 1) * 14]
        assert sorted(map(tuple, epoch_rows)) == sorted(tuple(t[:-1]) for t, _ in rows)
    assert it.epoch == 3 and it.position == 0


def test_iterator_without_shuffle_keeps_order():
    rows = rows_for_iterator()
    it = BatchIterator(rows, batch_size=5, seed=0, shuffle=False)
    got = np.concatenate([next(it).inputs for _ in range(3)])
    expected = [t[:-1] for t, _ in rows] + [t[:-1] for t, _ in rows[:1]]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("k", [0, 1, 4, 5, 11])
def test_iterator_resume_matches_uninterrupted(k):
    rows = rows_for_iterator()
    reference = BatchIterator(rows, batch_size=3, seed=7)
    expected = [next(reference) for _ in range(k + 8)][k:]

    first = BatchIterator(rows, batch_size=3, seed=7)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    assert {"epoch", "position"} <= state.keys()
    resumed = BatchIterator(rows, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        for name in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_iterator_resume_rejects_other_data_or_seed():
    rows = rows_for_iterator()
    state = BatchIterator(rows, batch_size=2, seed=0).state_dict()
    with pytest.raises(UserError, match="packed rows"):
        BatchIterator(rows[:-1], batch_size=2, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        BatchIterator(rows, batch_size=2, seed=1).load_state_dict(state)


def test_eval_batches_in_order_with_limit():
    rows = rows_for_iterator()
    batches = list(iter_eval_batches(rows, batch_size=4))
    assert [b.inputs.shape[0] for b in batches] == [4, 4, 4, 2]
    np.testing.assert_array_equal(
        np.concatenate([b.inputs for b in batches]), [t[:-1] for t, _ in rows]
    )
    assert sum(int(b.mask.sum()) for b in batches) == sum(int(m[1:].sum()) for _, m in rows)
    assert len(list(iter_eval_batches(rows, batch_size=4, limit=2))) == 2
