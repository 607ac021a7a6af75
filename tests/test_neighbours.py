"""Neighbour table: exact and approximate against brute force, cache reuse and invalidation."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_VOCAB, build_tiny_model

from mlx_edgelora import neighbours
from mlx_edgelora.blocks import head_module
from mlx_edgelora.loss import head_weight_rows


def brute_force(model, n):
    w = np.array(head_weight_rows(model), dtype=np.float64)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    sims = w @ w.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :n]


@pytest.mark.parametrize("bits", [None, 4])
def test_exact_matches_brute_force(arch, bits):
    model, _ = build_tiny_model(arch, quantize_bits=bits)
    table = neighbours.exact_neighbours(model, 16)
    assert table.shape == (TINY_VOCAB, 16) and table.dtype == np.int32
    assert np.array_equal(table, brute_force(model, 16))


@pytest.mark.parametrize("bits", [None, 4])
def test_approx_at_full_rank_is_exact(bits):
    """A full-rank projection is a rotation: candidates and re-ranking are then exact."""
    model, _ = build_tiny_model("llama", quantize_bits=bits)
    table = neighbours.approx_neighbours(model, 16, rank=64, candidates=40)
    assert np.array_equal(table, brute_force(model, 16))


def test_blocks_and_chunks_do_not_change_the_result(monkeypatch):
    model, _ = build_tiny_model("qwen2", quantize_bits=4)
    whole = neighbours.exact_neighbours(model, 8)
    monkeypatch.setattr(neighbours, "BLOCK", 70)
    monkeypatch.setattr(neighbours, "VOCAB_CHUNK", 96)
    monkeypatch.setattr(neighbours, "GROUP", 4)  # exercises the two-stage top-k
    assert np.array_equal(neighbours.exact_neighbours(model, 8), whole)
    assert np.array_equal(neighbours.approx_neighbours(model, 8, rank=64), whole)


def test_top_columns_two_stage_matches_sort(monkeypatch):
    monkeypatch.setattr(neighbours, "GROUP", 64)
    s = mx.random.normal((5, 3000), key=mx.random.key(0))
    top = neighbours._top_columns(s, 70)  # 47 groups of 64 < 70: one stage
    assert np.array_equal(np.array(top), np.argsort(-np.array(s), axis=1)[:, :70])
    top = neighbours._top_columns(s[:, :2944], 9)  # two stages: 46 whole groups
    assert np.array_equal(np.array(top), np.argsort(-np.array(s[:, :2944]), axis=1)[:, :9])


def test_duplicate_rows_exclude_self_and_find_the_twin():
    model, _ = build_tiny_model("llama")
    w = model.lm_head.weight
    model.lm_head.weight = mx.concatenate([w[:7], w[3:4], w[8:]])  # row 7 == row 3
    table = neighbours.exact_neighbours(model, 4)
    assert table[3, 0] == 7 and table[7, 0] == 3
    assert not (table == np.arange(TINY_VOCAB)[:, None]).any()


def counting(monkeypatch):
    calls = []
    build = neighbours.exact_neighbours

    def counted(model, n):
        calls.append(n)
        return build(model, n)

    monkeypatch.setattr(neighbours, "exact_neighbours", counted)
    return calls


def test_cache_reused_and_rebuilt_when_head_changes(tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    model, _ = build_tiny_model("qwen2", quantize_bits=4)
    first = neighbours.neighbour_table(model, 8, cache_dir=tmp_path)
    again = neighbours.neighbour_table(model, 8, cache_dir=tmp_path)
    assert len(calls) == 1 and np.array_equal(first, again)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file
    neighbours.neighbour_table(model, 4, cache_dir=tmp_path)  # n is part of the key
    assert len(calls) == 2
    head = head_module(model)
    head.scales = head.scales * 1.5  # a different model's head
    changed = neighbours.neighbour_table(model, 8, cache_dir=tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.npy"))) == 3
    assert np.array_equal(changed, brute_force(model, 8))


def test_corrupt_cache_is_rebuilt_and_env_sets_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELORA_CACHE", str(tmp_path))
    assert neighbours.cache_root() == tmp_path / "neighbours"
    calls = counting(monkeypatch)
    model, _ = build_tiny_model("llama")
    table = neighbours.neighbour_table(model, 8)
    (path,) = (tmp_path / "neighbours").glob("*.npy")
    path.write_bytes(b"not a table")
    assert np.array_equal(neighbours.neighbour_table(model, 8), table) and len(calls) == 2


def test_auto_uses_approx_for_large_heads_on_cpu(tmp_path, monkeypatch):
    if mx.default_device() == mx.gpu:
        pytest.skip("auto always picks exact on a GPU")
    monkeypatch.setattr(neighbours, "EXACT_MAX_MACS", 0)
    model, _ = build_tiny_model("llama")
    neighbours.neighbour_table(model, 8, cache_dir=tmp_path)
    assert [p.name.split("-")[1] for p in tmp_path.glob("*.npy")] == ["approx"]


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_table_is_built_in_tiles_without_a_float_copy_of_the_head(monkeypatch, method):
    """A quantized head is dequantized one vocabulary chunk at a time: the build's peak stays
    well under the head's float32 copy (one lazy graph over all chunks dequantized the whole
    head at once), and the table equals the one built in one tile (the approximate one up to
    near ties at its candidate cut)."""
    model, _ = build_tiny_model(
        "llama", quantize_bits=4, vocab_size=4096, hidden_size=256, num_hidden_layers=1
    )

    def build(model, n):  # approx keeps a [V, rank] projection: rank well under D, as real
        if method == "exact":
            return neighbours.exact_neighbours(model, n)
        return neighbours.approx_neighbours(model, n, rank=32)

    whole = build(model, 8)
    monkeypatch.setattr(neighbours, "BLOCK", 128)
    monkeypatch.setattr(neighbours, "VOCAB_CHUNK", 512)
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    table = build(model, 8)
    peak = mx.get_peak_memory() - base
    if method == "exact":
        assert np.array_equal(table, whole)
    else:  # tiles round the rank-32 projection differently: a near tie at the candidate cut
        # can swap one candidate (seen: 1 row of 4096 on one CPU, 0 on others)
        assert (table != whole).any(axis=1).mean() <= 0.002
    float_head = 4096 * 256 * 4
    assert peak < 0.75 * float_head, (peak, float_head)  # before: 2.1x (exact)
