"""Streamed trainable state (state.py) against mlx's in-memory AdamW and the in-memory trainer."""

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from conftest import build_tiny_model
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from test_trainer import TEXT, _adapter, _cfg, _StopAt

from mlx_edgelora import checkpoint, lora
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.files import write_safetensors
from mlx_edgelora.state import SegmentOptimizer
from mlx_edgelora.trainer import make_optimizer, train


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(6):
        (folder / f"day{i}.txt").write_text(f"Day {i}. " + TEXT * 3)
    return folder


def _lora_model(num_layers=-1):
    model, _ = build_tiny_model("llama", quantize_bits=4)
    cfg = TrainConfig(rank=4, num_layers=num_layers, steps=5, warmup=2, lr=1e-2)
    lora.apply_lora(model, cfg)
    return model, cfg


def _micro_grads(model, seed):
    """Random gradients shaped like the LoRA tree, of very different sizes per block (so a
    per-block clip would differ from the global one)."""
    mx.random.seed(seed)
    flat = tree_flatten(model.trainable_parameters())
    return tree_unflatten(
        [(k, mx.random.normal(v.shape) * 10.0 ** int(k.split(".")[2])) for k, v in flat]
    )


def test_segment_optimizer_is_exactly_clip_grad_norm_then_adamw(tmp_path):
    """Three steps of two micro-batches: accumulate, mean, global clip, AdamW (schedule
    included) give the same weights and moments streamed unit by unit as in memory."""
    ref, cfg = _lora_model(num_layers=3)  # block 0 has no LoRA
    model, _ = _lora_model(num_layers=3)
    model.update(ref.trainable_parameters())
    opt_ref, opt = make_optimizer(cfg), make_optimizer(cfg)
    state = SegmentOptimizer(model, opt, grad_clip=0.5, folder=str(tmp_path))
    assert model.layers[1].self_attn.q_proj.lora_a.size == 0  # offloaded
    for step in range(3):
        micro = [_micro_grads(ref, 10 * step + m) for m in range(2)]
        total = tree_map(mx.add, micro[0], micro[1])
        mean = tree_map(lambda g: g / 7, total)
        clipped, norm = optim.clip_grad_norm(mean, 0.5)
        assert norm.item() > 0.5  # clipping is active
        opt_ref.update(ref, clipped)
        state.begin_step()
        for g in micro:
            for i, block in enumerate(g["model"]["layers"]):
                state.add_gradients(i, block)
        state.apply(7)
    assert opt.learning_rate.item() == opt_ref.learning_rate.item()
    streamed = state.optimizer_tensors()
    for k, v in tree_flatten(opt_ref.state):
        assert mx.allclose(streamed[k], v, atol=1e-6, rtol=1e-5), k
    state.restore()
    for (k, a), (_, b) in zip(
        tree_flatten(ref.trainable_parameters()), tree_flatten(model.trainable_parameters())
    ):
        assert mx.allclose(a, b, atol=1e-6), k
    state.close()
    assert not list(tmp_path.glob("edgelora-state-*"))


def test_streamed_writer_matches_mx_save_safetensors(tmp_path):
    tensors = {"a": mx.random.normal((3, 5)), "step": mx.array(7, mx.uint64), "s": mx.array(0.5)}
    write_safetensors(tmp_path / "x.safetensors", dict(tensors))
    back = mx.load(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and mx.array_equal(back[k], v), k


@pytest.mark.parametrize("resume_streamed", [True, False])
def test_streamed_trainer_matches_in_memory_trainer_across_a_resume(
    tmp_path, tiny_model_dir, notes, resume_streamed
):
    """6 steps, 2 micro-batches each, clipping active, interrupted after step 3 and resumed
    (by the streamed trainer, or by the in-memory one from the streamed checkpoint): the same
    adapter and optimizer state as the in-memory trainer's uninterrupted run."""
    kw = dict(grad_accum=2, grad_clip=0.05, num_layers=3)
    ref = tmp_path / "ref"
    train(_cfg(tiny_model_dir, notes, ref, stream_state=False, **kw))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, notes, cut, stream_state=True, **kw), reporter=_StopAt(3, 6))
    train(_cfg(tiny_model_dir, notes, cut, stream_state=resume_streamed, resume=True, **kw))
    a, b = _adapter(ref), _adapter(cut)
    assert a.keys() == b.keys() and len(a) == 3 * 7 * 2
    # the same bits: both clip with state.global_norm's order (optim.clip_grad_norm's tree
    # order left a 2e-6 difference after 3 clipped steps)
    for k in a:
        assert mx.array_equal(a[k], b[k]), k
    oa = mx.load(str(checkpoint.latest(ref) / "optimizer.safetensors"))
    ob = mx.load(str(checkpoint.latest(cut) / "optimizer.safetensors"))
    assert oa.keys() == ob.keys()
    for k in oa:
        assert mx.array_equal(oa[k], ob[k]), k
    assert not list(tmp_path.glob("edgelora-*"))


def test_stream_state_defaults_follow_stream_weights_and_needs_segments(
    tmp_path, tiny_model_dir, notes
):
    from mlx_edgelora.errors import UserError

    assert _cfg(tiny_model_dir, notes, tmp_path / "o").validate().stream_state
    cfg = _cfg(tiny_model_dir, notes, tmp_path / "o", stream_weights=False).validate()
    assert not cfg.stream_state
    cfg = _cfg(tiny_model_dir, notes, tmp_path / "o", engine="graph", stream_state=True)
    with pytest.raises(UserError, match="--stream-state"):
        train(cfg)
