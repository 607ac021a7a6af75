"""Checkpoints: exact round trip, atomic replacement, pruning."""

import json

import mlx.core as mx
import mlx.optimizers as optim
from conftest import build_tiny_model
from mlx.utils import tree_flatten

from mlx_edgelora import checkpoint
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.lora import apply_lora


def _trained(seed=0):
    model, _ = build_tiny_model("llama", quantize_bits=4)
    apply_lora(model, TrainConfig(rank=4))
    opt = optim.AdamW(learning_rate=1e-2)
    mx.random.seed(seed)
    grads = {k: v for k, v in model.trainable_parameters().items()}
    from mlx.utils import tree_map

    grads = tree_map(lambda p: mx.random.normal(p.shape), grads)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    return model, opt


def test_round_trip_restores_adapter_and_optimizer(tmp_path):
    model, opt = _trained()
    checkpoint.save(tmp_path, 3, model, opt, {"data": {"epoch": 1, "position": 4}})
    fresh, fresh_opt = _trained(seed=1)
    state = checkpoint.load(checkpoint.latest(tmp_path), fresh, fresh_opt)
    assert state["step"] == 3 and state["data"] == {"epoch": 1, "position": 4}
    a = dict(tree_flatten(model.trainable_parameters()))
    b = dict(tree_flatten(fresh.trainable_parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    sa, sb = dict(tree_flatten(opt.state)), dict(tree_flatten(fresh_opt.state))
    assert sa.keys() == sb.keys() and all(mx.array_equal(sa[k], sb[k]) for k in sa)


def test_latest_survives_a_killed_save_and_old_ones_are_pruned(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, {})
    root = checkpoint.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000002", "step-000003"]
    (root / ".tmp-step-000004-1").mkdir()  # a save killed before its rename
    assert checkpoint.latest(tmp_path).name == "step-000003"
    assert json.loads((root / "latest.json").read_text())["step"] == 3
    checkpoint.save(tmp_path, 4, model, opt, {})
    assert not list(root.glob(".tmp-*"))
