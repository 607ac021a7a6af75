"""The memory plan: tracks measured peaks, orders the options sensibly, enforces the budget."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_tiny_model
from mlx.utils import tree_flatten

from mlx_edgelora import engine, lora, loss, plan, quant
from mlx_edgelora.batching import Batch
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.trainer import make_optimizer

SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=3,
    intermediate_size=768,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=8192,
    tie_word_embeddings=True,
)


def _model(cfg, **kw):
    model, _ = build_tiny_model("llama", quantize_bits=4, **{**SHAPE, **kw})
    lora.apply_adapter(model, cfg)
    quant.prepare_for_training(model)
    return model


def _foreign_bytes() -> int:
    """Bytes of arrays other tests left alive (a module-scoped fixture's model, a cached
    constant): mx.get_peak_memory() counts every live array of the process, the plan only this
    run's. Call before building the model; the step's peak is measured above it."""
    gc.collect()  # the previous test's model and step
    mx.clear_cache()
    return mx.get_active_memory()


def _peak_above(foreign: int, run) -> float:
    """GB of the peak of `run()` above the `foreign` bytes (cache cleared, peak reset first)."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    run()
    return (mx.get_peak_memory() - foreign) / plan.GB


def _measured_peak(model, cfg, foreign: int) -> float:
    L = cfg.max_seq_len
    toks = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (1, L + 1)).astype(np.int32)
    batch = Batch(toks[:, :-1], toks[:, 1:], np.ones((1, L), bool))
    step = engine.make_step(model, cfg, loss.make_loss_head(model, cfg.loss, cfg))
    return _peak_above(foreign, lambda: step(batch))


@pytest.mark.parametrize("engine_name", ["graph", "segments"])
def test_plan_is_never_under_the_measured_peak(tmp_path, engine_name):
    # The planner keeps a run under its budget only if the plan is never under the peak; 1.25:
    # on this tiny model the plan was 1.18x (graph) and 1.02x (segments) the measured peak
    # (bench/plan_accuracy.py holds the real-shape rows to 1.15).
    cfg = TrainConfig(max_seq_len=512, engine=engine_name, loss="full", out=str(tmp_path))
    foreign = _foreign_bytes()  # after the whole suite, earlier tests' arrays (once 2% here)
    model = _model(cfg)
    estimated = plan.estimate(model, cfg).total_gb
    measured = _measured_peak(model, cfg, foreign)
    assert 1.0 <= estimated / measured <= 1.25, (estimated, measured)


def test_options_that_save_memory_lower_the_plan(tmp_path):
    cfg = TrainConfig(max_seq_len=4096, out=str(tmp_path))
    model = _model(cfg, num_hidden_layers=8)  # more segments than boundaries in flight on disk

    def total(**kw):
        return plan.estimate(model, TrainConfig(**{**cfg.to_dict(), **kw})).total_gb

    assert total(engine="segments") < total(engine="graph")
    assert total(activations="disk") < total(activations="ram")
    # (the graph engine adds the loss head to everything else; the segment engine's peak is
    # the larger of the loss head and one segment's recompute, here the recompute)
    subset_nb = total(engine="graph", loss="subset", subset_k=256, subset_fill="neighbours")
    assert subset_nb < total(engine="graph", loss="chunked", vocab_chunk=1024)
    subset = total(engine="graph", loss="subset", subset_k=256)
    assert subset_nb < subset <= total(engine="graph", loss="chunked")  # scoring
    assert total(engine="graph", loss="chunked", vocab_chunk=1024) < total(
        engine="graph", loss="full"
    )
    assert total(stream_weights=True) < total()
    assert total(stream_weights=True, stream_state=True) < total(stream_weights=True)
    # a small head: the recompute peaks; short attention chunks: a whole block's MLP half (next
    # to what its attention half keeps) is its larger part, which half-blocks take apart
    small_head = dict(loss="subset", subset_k=256, subset_fill="neighbours", attn_chunk=64)
    assert total(split_blocks=True, **small_head) < total(split_blocks=False, **small_head)
    assert total(cache_policy="last") > total()  # the last segment lives with the loss head
    # kept attention outputs: every block's in RAM; with disk boundaries one attention half's
    # (half-block segments), two whole blocks'
    ram = total(activations="ram") - total(activations="ram", keep_attention=False)
    disk = total() - total(keep_attention=False)
    assert ram == pytest.approx(8 * disk) and disk > 0  # 8 blocks
    whole = total(split_blocks=False) - total(split_blocks=False, keep_attention=False)
    assert whole == pytest.approx(2 * disk)
    assert total(keep_attention=True, attn_chunk=0) == total(keep_attention=False, attn_chunk=0)
    assert plan.estimate(model, cfg, 0.3).total_gb < plan.estimate(model, cfg, 1.0).total_gb


@pytest.mark.parametrize("adapter", ["lora", "lars"])
def test_plan_counts_each_adapters_own_parameters(tmp_path, adapter):
    """LARS (U [in, r], V [r, in / 32], alpha) once was planned as LoRA's A and B: 2x here."""
    cfg = TrainConfig(adapter=adapter, rank=8, out=str(tmp_path))
    model = _model(cfg)
    created = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    planned = plan.estimate(model, cfg).parts["LoRA + optimizer"] * plan.GB
    assert planned == pytest.approx(created * plan.OPT_COPIES)


@pytest.mark.parametrize("engine_name", ["graph", "segments"])
@pytest.mark.parametrize("adapter", ["lora", "lars"])
def test_plan_bounds_a_training_steps_peak_for_each_adapter(tmp_path, adapter, engine_name):
    """Two optimizer steps (gradients + AdamW state) of a model whose adapter state matters
    (rank 64, small vocabulary): never above the plan, and within the plan's factor of 2."""
    cfg = TrainConfig(
        max_seq_len=1024, adapter=adapter, rank=64, engine=engine_name, loss="full",
        out=str(tmp_path),
    )  # fmt: skip
    foreign = _foreign_bytes()
    model = _model(cfg, vocab_size=1024)
    L = cfg.max_seq_len
    toks = np.random.default_rng(0).integers(0, 1024, (1, L + 1)).astype(np.int32)
    batch = Batch(toks[:, :-1], toks[:, 1:], np.ones((1, L), bool))
    step = engine.make_step(model, cfg, loss.make_loss_head(model, cfg.loss, cfg))
    opt = make_optimizer(cfg)

    def two_steps():
        for _ in range(2):
            grads = step(batch)[2]
            opt.update(model, grads)
            mx.eval(model.trainable_parameters(), opt.state)
            del grads

    measured = _peak_above(foreign, two_steps)
    estimated = plan.estimate(model, cfg).total_gb
    assert measured <= estimated < 2.0 * measured, (estimated, measured)
