"""--subset-fill sampled: consistent gradient, honest loss labels, exact resume (issue 21)."""

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_VOCAB, build_tiny_model
from test_trainer import _adapter, _cfg, _StopAt, notes  # noqa: F401  (notes: a fixture)

from mlx_edgelora import checkpoint, loss
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.errors import UserError
from mlx_edgelora.loading import load_model
from mlx_edgelora.trainer import train

V = TINY_VOCAB


def sampled_head(model, k, samples, refresh=10_000, seed=0):
    c = SimpleNamespace(
        vocab_chunk=64, subset_k=k, subset_fill="sampled", subset_tail=True,
        subset_refresh=refresh, subset_samples=samples, seed=seed,
    )  # fmt: skip
    return loss.make_loss_head(model, "subset", c)


def value_grad(head, h, batch):
    value, grad = mx.value_and_grad(lambda h: head(h, batch))(h)
    return value.item(), np.array(grad, np.float64)


def batch_of(rng, B=2, L=9):
    return SimpleNamespace(
        targets=rng.integers(0, V, (B, L)).astype(np.int32), mask=rng.random((B, L)) < 0.7
    )


def test_sampled_gradient_tends_to_the_exact_one_as_samples_grow():
    """The deterministic part is fixed (30 tokens: targets + cached most expected); the
    mean over 40 seeded draws of the sampled-softmax gradient approaches the exact dL/dh as m
    grows (bias and noise both fall), and its loss value approaches the exact loss."""
    model, _ = build_tiny_model("llama", quantize_bits=None)
    rng = np.random.default_rng(3)
    h = mx.array(2 * rng.normal(size=(2, 9, 64)).astype(np.float32))
    batch = batch_of(rng)
    exact_v, exact_g = value_grad(
        loss.make_loss_head(model, "chunked", SimpleNamespace(vocab_chunk=64)), h, batch
    )
    errs, verrs = {}, {}
    for m in (8, 64, 240):
        head = sampled_head(model, 30 + m, m)
        value_grad(head, h, batch)  # the scoring call: exact
        assert head.pop_exact()
        vals, grads = [], []
        for _ in range(40):
            v, g = value_grad(head, h, batch)
            assert not head.pop_exact()
            vals.append(v)
            grads.append(g)
        mean = np.mean(grads, axis=0)
        errs[m] = np.linalg.norm(mean - exact_g) / np.linalg.norm(exact_g)
        verrs[m] = abs(np.mean(vals) - exact_v) / exact_v
    assert errs[240] < errs[64] < errs[8], errs
    assert errs[240] < 0.02 and verrs[240] < verrs[8] and verrs[240] < 0.01, (errs, verrs)


def test_scoring_calls_are_exact_and_sampled_calls_are_labelled_approximate():
    model, _ = build_tiny_model("qwen2", quantize_bits=4)
    rng = np.random.default_rng(4)
    head = sampled_head(model, 60, 20, refresh=3)
    labels = []
    for _ in range(5):
        h = mx.array(rng.normal(size=(2, 9, 64)).astype(np.float32))
        batch = batch_of(rng)
        value, grad = value_grad(head, h, batch)
        assert np.isfinite(value) and np.isfinite(grad).all()
        t = batch.targets.ravel()[batch.mask.ravel()]
        assert set(t) <= set(head.ce.last_subset) and len(head.ce.last_subset) <= 60
        labels.append(head.pop_exact())
    assert labels == [True, False, False, True, False]
    # the scoring call's value is the exact CE (the tail pseudo-token holds the exact rest)
    h = mx.array(rng.normal(size=(2, 9, 64)).astype(np.float32))
    batch = batch_of(rng)
    fresh = sampled_head(model, 60, 20)
    exact = loss.make_loss_head(model, "chunked", SimpleNamespace(vocab_chunk=64))
    assert abs(value_grad(fresh, h, batch)[0] - value_grad(exact, h, batch)[0]) < 1e-3


@pytest.mark.parametrize("fill", ["sampled", "predicted"])
def test_running_state_round_trips_through_json_and_continues_identically(fill):
    """A head restored from state_dict (via JSON, as state.json holds it) gives the same
    values and gradients on the next calls as the head that never stopped."""
    model, _ = build_tiny_model("llama", quantize_bits=4)
    rng = np.random.default_rng(5)
    inputs = [
        (mx.array(rng.normal(size=(2, 9, 64)).astype(np.float32)), batch_of(rng)) for _ in range(6)
    ]
    if fill == "sampled":
        make = lambda: sampled_head(model, 50, 20, refresh=4, seed=7)  # noqa: E731
    else:
        c = SimpleNamespace(vocab_chunk=64, subset_k=50, subset_fill="predicted",
                            subset_tail=True, subset_refresh=4)  # fmt: skip
        make = lambda: loss.make_loss_head(model, "subset", c)  # noqa: E731
    unbroken, first = make(), make()
    want = [value_grad(unbroken, h, b) for h, b in inputs]
    for h, b in inputs[:2]:
        value_grad(first, h, b)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for (h, b), (v, g) in zip(inputs[2:], want[2:]):
        got = value_grad(resumed, h, b)
        assert got[0] == v and np.array_equal(got[1], g)


def test_killed_sampled_run_resumes_exactly_where_it_stopped(tmp_path, tiny_model_dir, notes):  # noqa: F811
    opts = dict(grad_accum=2, loss="subset", subset_fill="sampled", subset_k=120,
                subset_refresh=3, eval_every=0)  # fmt: skip
    full = tmp_path / "full"
    train(_cfg(tiny_model_dir, notes, full, **opts))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, notes, cut, **opts), reporter=_StopAt(3, 6))
    assert checkpoint.latest(cut).name == "step-000003"
    state = json.loads((checkpoint.latest(cut) / "state.json").read_text())
    assert state["loss_head"]["calls"] == 6  # 3 steps x 2 micro-batches
    loaded = load_model(str(tiny_model_dir))
    result = train(_cfg(tiny_model_dir, notes, cut, resume=True, **opts), loaded=loaded)
    assert [r["step"] for r in result.history if "loss" in r] == [4, 5, 6]
    a, b = _adapter(full), _adapter(cut)
    for k in a:
        assert mx.array_equal(a[k], b[k]), k


def test_subset_samples_flag_is_checked():
    with pytest.raises(UserError, match="--subset-samples must be in"):
        TrainConfig(
            loss="subset", subset_fill="sampled", subset_k=100, subset_samples=100
        ).validate()
    with pytest.raises(UserError, match="--subset-samples applies to"):
        TrainConfig(loss="subset", subset_k=100, subset_samples=10).validate()
    TrainConfig(loss="subset", subset_fill="sampled", subset_k=100, subset_refresh=4).validate()


def test_memory_plan_counts_the_sampled_fills_scoring_pass():
    """The sampled fill runs the predicted fill's scoring pass over vocabulary tiles: the
    planner gives it the same loss-head term (it once planned only k columns)."""
    from mlx_edgelora import plan

    shape = SimpleNamespace(V=262144, D=640)
    opts = dict(loss="subset", subset_k=983, vocab_chunk=8192)
    sampled = plan._loss_head_bytes(shape, 512, TrainConfig(subset_fill="sampled", **opts))
    predicted = plan._loss_head_bytes(shape, 512, TrainConfig(subset_fill="predicted", **opts))
    assert (
        sampled
        == predicted
        > plan._loss_head_bytes(shape, 512, TrainConfig(subset_fill="neighbours", **opts))
    )
