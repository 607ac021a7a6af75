"""Loss heads: chunked and subset against the full reference, logits vs loss masking, subsets."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_VOCAB, build_tiny_model
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_edgelora import loss
from mlx_edgelora.errors import UserError

V = TINY_VOCAB


def make_batch(rng, B=2, L=11, frac=0.6, vocab=V):
    """Stands in for batching.Batch: the loss head reads only .targets and .mask."""
    return SimpleNamespace(
        targets=rng.integers(0, vocab, (B, L)).astype(np.int32), mask=rng.random((B, L)) < frac
    )


def cfg(vocab_chunk=64, subset_k=1000, subset_fill="predicted", subset_tail=False):
    return SimpleNamespace(
        vocab_chunk=vocab_chunk, subset_k=subset_k, subset_fill=subset_fill, subset_tail=subset_tail
    )


def value_grad(head, h, batch):
    value, grad = mx.value_and_grad(lambda h: head(h, batch))(h)
    return value.item(), np.array(grad)


def assert_close(a, b, rtol=1e-5):
    """Relative to the largest magnitude: elementwise-relative is meaningless near zero."""
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-12)


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("vocab_chunk", [37, 128, V, 1000])  # 37, 128: don't divide V
def test_chunked_matches_full(arch, bits, vocab_chunk):
    model, _ = build_tiny_model(arch, quantize_bits=bits)
    rng = np.random.default_rng(1)
    h = mx.array(rng.normal(size=(2, 11, 64)).astype(np.float32))
    batch = make_batch(rng)
    full = value_grad(loss.make_loss_head(model, "full", cfg()), h, batch)
    chunked = value_grad(loss.make_loss_head(model, "chunked", cfg(vocab_chunk)), h, batch)
    assert_close(chunked[0], full[0])
    assert_close(chunked[1], full[1])


V_BIG = 131072


def test_full_head_on_a_quantized_head_holds_no_float_copy():
    """The full head runs the head module's own kernel: the value and gradient are the float
    reference's, and a 4-bit head is never dequantized whole (256 MB here) for it: the
    kernel's row tiles bound it (~70 MB measured; dequantizing whole took 2x W)."""
    from mlx_edgelora import quant

    model, _ = build_tiny_model(
        "qwen2", quantize_bits=4, hidden_size=512, vocab_size=V_BIG, num_hidden_layers=1
    )
    quant.prepare_for_training(model)
    rng = np.random.default_rng(3)
    h = mx.array(rng.normal(size=(1, 16, 512)).astype(np.float32))
    batch = make_batch(rng, B=1, L=16, frac=0.5, vocab=V_BIG)
    head = loss.make_loss_head(model, "full", cfg())
    mx.eval(h)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    got = value_grad(head, h, batch)
    peak = mx.get_peak_memory() - base

    x = loss.final_norm(model)(h.reshape(-1, 512)[mx.array(np.flatnonzero(batch.mask))])
    targets = mx.array(batch.targets.reshape(-1)[batch.mask.reshape(-1)])
    float_w_bytes = V_BIG * 512 * 4
    assert peak < 0.5 * float_w_bytes
    want = loss.full_ce(x, loss.head_weight_rows(model), targets).sum().item()
    assert_close(got[0], want)


def test_chunked_row_blocks(monkeypatch):
    """Rows split into several passes over the vocabulary give the same loss and gradient."""
    model, _ = build_tiny_model("llama", quantize_bits=4)
    rng = np.random.default_rng(2)
    h = mx.array(rng.normal(size=(3, 16, 64)).astype(np.float32))
    batch = make_batch(rng, B=3, L=16, frac=0.9)
    head = loss.make_loss_head(model, "chunked", cfg(50))
    one_pass = value_grad(head, h, batch)
    monkeypatch.setattr(loss, "ROW_BLOCK_ELEMENTS", 50 * 7)  # 7 rows per pass
    assert_close(value_grad(head, h, batch)[0], one_pass[0])
    assert_close(value_grad(head, h, batch)[1], one_pass[1])


@pytest.mark.parametrize("rows", [0, 4])  # 4: three row passes (9 rows), the last ragged
def test_chunked_lse_vjp_matches_autodiff(rows):
    """The custom VJP against autodiff of the plain logsumexp, with a non-uniform cotangent."""
    rng = np.random.default_rng(3)
    x = mx.array(rng.normal(size=(9, 16)).astype(np.float32))
    w = mx.array(rng.normal(size=(101, 16)).astype(np.float32))
    cot = mx.array(rng.normal(size=(9,)).astype(np.float32))
    ref_out, (ref_dx,) = mx.vjp(lambda x: [mx.logsumexp(x @ w.T, axis=-1)], [x], [cot])
    fn = lambda x: [loss.chunked_lse(x, lambda s, e, after: w[s:e], 101, 10, rows)]
    out, (dx,) = mx.vjp(fn, [x], [cot])
    assert_close(np.array(out[0]), np.array(ref_out[0]))
    assert_close(np.array(dx), np.array(ref_dx))


@pytest.mark.parametrize("kind", ["full", "chunked", "subset"])
def test_no_trainable_row_gives_zero_with_gradient(kind):
    model, _ = build_tiny_model("qwen2")
    h = mx.ones((1, 5, 64))
    batch = SimpleNamespace(targets=np.zeros((1, 5), np.int32), mask=np.zeros((1, 5), bool))
    value, grad = value_grad(loss.make_loss_head(model, kind, cfg(subset_k=V)), h, batch)
    assert value == 0.0 and grad.shape == (1, 5, 64) and not grad.any()


def test_bad_inputs_raise_user_error():
    model, _ = build_tiny_model("llama")
    batch = SimpleNamespace(targets=np.full((1, 3), V, np.int32), mask=np.ones((1, 3), bool))
    with pytest.raises(UserError, match="vocabulary"):
        loss.make_loss_head(model, "chunked", cfg())(mx.ones((1, 3, 64)), batch)


def hidden(model, inputs):
    """The last block's output, before the final norm (what the engine hands the loss head)."""
    h = model.model.embed_tokens(inputs)
    mask = create_attention_mask(h, None)
    for layer in model.model.layers:
        h = layer(h, mask, cache=None)
    return h


def lora_model(arch, bits):
    model, _ = build_tiny_model(arch, quantize_bits=bits)
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    mx.random.seed(5)  # non-zero lora_b, so every LoRA weight has a non-trivial gradient
    params = tree_flatten(model.trainable_parameters())
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in params]))
    return model


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("kind", ["full", "chunked"])
def test_logits_masking_equals_loss_masking(arch, bits, kind):
    """Logits for trainable rows only == full [B, L, V] logits with masked CE, LoRA grads too."""
    model = lora_model(arch, bits)
    rng = np.random.default_rng(4)
    batch = make_batch(rng, B=2, L=12, frac=0.4)
    inputs = mx.array(rng.integers(0, V, (2, 12)).astype(np.int32))
    head = loss.make_loss_head(model, kind, cfg(vocab_chunk=70))

    def reference(model):
        logits = model(inputs)  # [B, L, V]: what logits masking avoids building
        ce = nn.losses.cross_entropy(logits, mx.array(batch.targets), reduction="none")
        return (ce * mx.array(batch.mask)).sum()

    ref_value, ref_grads = nn.value_and_grad(model, reference)(model)
    value, grads = nn.value_and_grad(model, lambda m: head(hidden(m, inputs), batch))(model)
    assert_close(value.item(), ref_value.item())
    ref_grads = dict(tree_flatten(ref_grads))
    for name, g in tree_flatten(grads):
        assert_close(np.array(g), np.array(ref_grads[name]), rtol=1e-4)


def test_subset_contains_targets_and_has_exactly_k():
    rng = np.random.default_rng(6)
    table = np.stack([rng.permutation(np.delete(np.arange(V), t))[:8] for t in range(V)])
    for k in [20, 57, 200]:
        targets = rng.integers(0, V, 15)
        s = loss.subset_for(targets, table, k, V)
        assert len(s) == k and len(np.unique(s)) == k and np.all(np.diff(s) > 0)
        assert set(targets) <= set(s)
        if k >= 2 * len(np.unique(targets)):  # every target got its hardest negative
            assert set(table[np.unique(targets), 0]) <= set(s)
        assert np.array_equal(s, loss.subset_for(targets, table, k, V))  # deterministic


def test_subset_edge_cases():
    table = np.tile(np.arange(1, 3), (V, 1))  # every token's neighbours: tokens 1 and 2
    targets = np.array([10, 11, 12, 10])
    many = loss.subset_for(np.arange(50), table, 20, V)  # more distinct targets than k
    assert np.array_equal(many, np.arange(50))
    short = loss.subset_for(targets, table, 8, V)  # table runs out: lowest free ids fill
    assert np.array_equal(short, [0, 1, 2, 3, 4, 10, 11, 12])
    assert np.array_equal(loss.subset_for(targets, table, V + 5, V), np.arange(V))


@pytest.mark.parametrize("bits", [None, 4])
def test_subset_with_k_equal_v_is_the_full_loss(arch, bits):
    model, _ = build_tiny_model(arch, quantize_bits=bits)
    rng = np.random.default_rng(7)
    h = mx.array(rng.normal(size=(2, 11, 64)).astype(np.float32))
    batch = make_batch(rng)
    full = value_grad(loss.make_loss_head(model, "full", cfg()), h, batch)
    subset = value_grad(loss.make_loss_head(model, "subset", cfg(subset_k=V)), h, batch)
    assert_close(subset[0], full[0])
    assert_close(subset[1], full[1])


@pytest.mark.parametrize("fill", ["neighbours", "predicted"])
def test_subset_loss_is_ce_renormalized_over_s(tmp_path, monkeypatch, fill):
    monkeypatch.setenv("EDGELORA_CACHE", str(tmp_path))
    model, _ = build_tiny_model("llama", quantize_bits=4)
    rng = np.random.default_rng(8)
    h = mx.array(rng.normal(size=(1, 9, 64)).astype(np.float32))
    batch = make_batch(rng, B=1, L=9, frac=1.0)
    head = loss.make_loss_head(model, "subset", cfg(subset_k=40, subset_fill=fill))
    value, _ = value_grad(head, h, batch)
    x = np.array(model.model.norm(h[0]))
    if fill == "neighbours":
        assert list((tmp_path / "neighbours").glob("*.npy"))  # the table was cached there
        from mlx_edgelora.neighbours import neighbour_table

        s = loss.subset_for(batch.targets.ravel(), neighbour_table(model), 40, V)
    else:
        assert not (tmp_path / "neighbours").exists()  # predicted fill needs no table
        s = loss.subset_predicted(mx.array(x), batch.targets.ravel(), model, 40, 64)
    logits = x @ np.array(loss.head_weight_rows(model, s)).T  # [9, 40]
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    expected = (lse - logits[np.arange(9), np.searchsorted(s, batch.targets[0])]).sum()
    assert abs(value - expected) <= 1e-5 * abs(expected)


@pytest.mark.parametrize("bits", [None, 4])
def test_subset_tail_value_is_exact_and_gradient_exact_with_one_token_outside(bits):
    model, _ = build_tiny_model("llama", quantize_bits=bits)
    rng = np.random.default_rng(11)
    h = mx.array(rng.normal(size=(2, 11, 64)).astype(np.float32))
    batch = make_batch(rng)
    full = value_grad(loss.make_loss_head(model, "full", cfg()), h, batch)
    for k in [40, V - 1]:
        tail = loss.make_loss_head(model, "subset", cfg(subset_k=k, subset_tail=True))
        value, grad = value_grad(tail, h, batch)
        assert_close(value, full[0])  # the loss value is the exact CE at any k
        if k == V - 1:  # one token outside S: its row is the tail direction, exactly
            assert_close(grad, full[1], rtol=1e-4)
        else:  # an approximation, but a close one (a random head spreads mass widely)
            cos = (grad * full[1]).sum() / np.sqrt((grad**2).sum() * (full[1] ** 2).sum())
            renorm = value_grad(loss.make_loss_head(model, "subset", cfg(subset_k=k)), h, batch)
            cos_renorm = (renorm[1] * full[1]).sum() / np.sqrt(
                (renorm[1] ** 2).sum() * (full[1] ** 2).sum()
            )
            assert cos > cos_renorm


@pytest.mark.parametrize("bits", [None, 4])
def test_predicted_mass_is_the_softmax_summed_over_rows(bits):
    model, _ = build_tiny_model("llama", quantize_bits=bits)
    x = mx.array(np.random.default_rng(9).normal(size=(13, 64)).astype(np.float32))
    logits = np.array(x @ loss.head_weight_rows(model).T, dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    expected = (p / p.sum(1, keepdims=True)).sum(0)
    got = loss.predicted_mass(x, model, chunk=70)  # ragged last vocabulary tile
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert abs(got.sum() - 13) < 1e-4  # one unit of probability per row


def test_predicted_subset_is_targets_plus_the_most_expected_tokens():
    model, _ = build_tiny_model("qwen2", quantize_bits=4)
    x = mx.array(np.random.default_rng(10).normal(size=(6, 64)).astype(np.float32))
    targets = np.array([5, 5, 299, 17, 40, 17])
    mass = loss.predicted_mass(x, model, chunk=64)
    for k in [4, 30, 120]:
        s = loss.subset_predicted(x, targets, model, k, 64)
        assert np.all(np.diff(s) > 0) and set(targets) <= set(s)
        assert len(s) == max(k, len(set(targets)))
        rest = np.setdiff1d(s, targets)
        outside = np.setdiff1d(np.arange(V), s)
        if rest.size:  # every filled token is expected at least as much as any left out
            assert mass[rest].min() >= mass[outside].max()
    assert np.array_equal(loss.subset_predicted(x, targets, model, V, 64), np.arange(V))


@pytest.mark.parametrize("bits", [None, 4])
def test_head_weight_rows_after_only_orders(bits):
    """`after` adds a scheduling dependency; the rows are the same float32 values."""
    model, _ = build_tiny_model("llama", quantize_bits=bits)
    rows = np.array([3, 0, 299, 3])
    plain = np.array(loss.head_weight_rows(model, rows))
    after = loss.head_weight_rows(model, rows, after=mx.ones((5,)) * 2)
    assert after.dtype == mx.float32 and np.array_equal(np.array(after), plain)


def refresh_head(model, k, refresh, tail=True):
    c = cfg(subset_k=k, subset_tail=tail)
    c.subset_refresh = refresh
    return loss.make_loss_head(model, "subset", c)


def test_subset_refresh_1_is_todays_predicted_fill_at_every_call():
    """N = 1: every call scores afresh; value and gradient are those of the scoring pass,
    S = targets + most expected, and the tail CE (bit for bit the same composition)."""
    model, _ = build_tiny_model("llama", quantize_bits=4)
    rng = np.random.default_rng(12)
    head = refresh_head(model, 40, 1)
    for _ in range(3):
        h = mx.array(rng.normal(size=(2, 11, 64)).astype(np.float32))
        batch = make_batch(rng)
        got = value_grad(head, h, batch)
        assert head.pop_exact()

        def today(h, batch=batch):
            mask = batch.mask.ravel()
            x = model.model.norm(h.reshape(-1, 64)[mx.array(np.flatnonzero(mask))])
            t = batch.targets.ravel()[mask]
            scores = loss.predicted_scores(x, model, 64)
            s = loss._most_expected(t, scores.mass, 40)
            assert np.array_equal(s, head.ce.last_subset)
            return loss.subset_tail_ce(x, t, s, model, scores)

        value, grad = mx.value_and_grad(today)(h)
        assert got[0] == value.item() and np.array_equal(got[1], np.array(grad))


def test_cached_subset_holds_the_targets_has_k_members_and_skips_the_pass(monkeypatch):
    model, _ = build_tiny_model("qwen2", quantize_bits=4)
    rng = np.random.default_rng(13)
    head = refresh_head(model, 30, 3)
    passes = []
    scores = loss.predicted_scores
    monkeypatch.setattr(loss, "predicted_scores", lambda *a: passes.append(1) or scores(*a))
    exact = []
    for _ in range(5):
        h = mx.array(rng.normal(size=(2, 11, 64)).astype(np.float32))
        batch = make_batch(rng)
        value, grad = value_grad(head, h, batch)
        assert np.isfinite(value) and np.isfinite(grad).all()
        s, t = head.ce.last_subset, batch.targets.ravel()[batch.mask.ravel()]
        assert np.all(np.diff(s) > 0) and set(t) <= set(s) and len(s) == 30
        exact.append(head.pop_exact())
    assert exact == [True, False, False, True, False] and len(passes) == 2


def test_cached_tail_is_exact_on_the_single_row_it_was_fitted_on():
    """The tail offset b is fitted on the scored rows: with one row and the same input, the
    cached (approximate) call reproduces the exact call's value and gradient."""
    model, _ = build_tiny_model("llama", quantize_bits=None)
    rng = np.random.default_rng(14)
    h = mx.array(rng.normal(size=(1, 1, 64)).astype(np.float32))
    batch = make_batch(rng, B=1, L=1, frac=1.0)
    head = refresh_head(model, 40, 2)
    first = value_grad(head, h, batch)
    assert head.pop_exact()
    second = value_grad(head, h, batch)
    assert not head.pop_exact()
    assert_close(second[0], first[0], rtol=1e-4)
    assert_close(second[1], first[1], rtol=1e-4)


def test_renormalized_and_neighbour_subsets_are_never_reported_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELORA_CACHE", str(tmp_path))
    model, _ = build_tiny_model("llama", quantize_bits=4)
    rng = np.random.default_rng(15)
    h = mx.array(rng.normal(size=(2, 11, 64)).astype(np.float32))
    batch = make_batch(rng)
    for c in [cfg(subset_k=40), cfg(subset_k=40, subset_fill="neighbours")]:
        head = loss.make_loss_head(model, "subset", c)
        value_grad(head, h, batch)
        assert not head.pop_exact()
    for head in [loss.make_loss_head(model, "chunked", cfg()), refresh_head(model, V, 4)]:
        value_grad(head, h, batch)
        assert head.pop_exact() and head.pop_exact()


@pytest.mark.parametrize("tile", [7, 16, V])
def test_tiled_ce_reads_each_tile_once_and_matches_full(tile):
    """The tiled head is one pass (online softmax): every vocabulary tile is read once (the
    two-pass version read each twice), and its loss and dx equal the full-logits reference;
    with grad=False the loss is the same number."""
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(0, 1, (V, 24)).astype(np.float32))
    x = mx.array(rng.normal(0, 1, (9, 24)).astype(np.float32))
    targets = rng.integers(0, V, 9)
    reads = []

    def rows(sel):
        reads.append(sel)
        return w[mx.array(sel.astype(np.int32)) if isinstance(sel, np.ndarray) else sel]

    value, dx = loss.tiled_ce(x, targets, rows, V, tile)
    tiles = [r for r in reads if isinstance(r, slice)]
    assert [(t.start, t.stop) for t in tiles] == [(s, min(s + tile, V)) for s in range(0, V, tile)]
    ref, ref_dx = mx.value_and_grad(lambda x: loss.full_ce(x, w, mx.array(targets)).sum())(x)
    assert_close(value.item(), ref.item())
    assert_close(dx, ref_dx)
    value_only, none = loss.tiled_ce(x, targets, rows, V, tile, grad=False)
    assert none is None and value_only.item() == value.item()
