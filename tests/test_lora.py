"""LoRA: fresh adapters change nothing; saved adapters load with mlx-lm's own loader."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from conftest import write_tiny_model_dir
from mlx.utils import tree_flatten

from mlx_edgelora.config import TrainConfig
from mlx_edgelora.errors import UserError
from mlx_edgelora.lora import apply_lora, load_adapters, save_adapters

TOKENS = mx.array([[5, 17, 33, 2, 9, 41, 7, 8]])


def _randomize_lora_b(model):
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.load_weights([(name, mx.random.normal(p.shape) * 0.05)], strict=False)


@pytest.mark.parametrize("quantize_bits", [None, 4])
def test_fresh_lora_is_the_base_and_only_lora_trains(tmp_path, arch, quantize_bits):
    path = write_tiny_model_dir(tmp_path / "m", arch, quantize_bits)
    model, _ = mlx_lm.load(str(path))
    base = model(TOKENS)
    acfg = apply_lora(model, TrainConfig(rank=4))
    assert mx.allclose(model(TOKENS), base, atol=1e-6)
    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in names)
    assert len(names) == 2 * 7 * len(model.layers)
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.trainable_parameters()))
    assert acfg["lora_parameters"]["rank"] == 4 and acfg["num_layers"] == len(model.layers)


def test_saved_adapter_loads_in_mlx_lm_and_changes_logits(tmp_path, arch):
    path = write_tiny_model_dir(tmp_path / "m", arch, 4)
    model, _ = mlx_lm.load(str(path))
    base = model(TOKENS)
    acfg = apply_lora(model, TrainConfig(rank=4))
    _randomize_lora_b(model)
    ours = model(TOKENS)
    save_adapters(model, tmp_path / "adapter", acfg)
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fine_tune_type"]
        == "lora"
    )
    theirs, _ = mlx_lm.load(str(path), adapter_path=str(tmp_path / "adapter"))
    assert mx.allclose(theirs(TOKENS), ours, atol=1e-4)
    assert not mx.allclose(theirs(TOKENS), base, atol=1e-3)
    # and our own loader agrees with mlx-lm's
    again, _ = mlx_lm.load(str(path))
    load_adapters(again, tmp_path / "adapter")
    assert mx.allclose(again(TOKENS), ours, atol=1e-4)


def test_bad_keys_and_bad_adapter_folder_are_user_errors(tmp_path):
    path = write_tiny_model_dir(tmp_path / "m", "llama")
    model, _ = mlx_lm.load(str(path))
    with pytest.raises(UserError, match="--lora-keys"):
        apply_lora(model, TrainConfig(lora_keys=["self_attn.qq_proj"]))
    with pytest.raises(UserError, match="not an adapter folder"):
        load_adapters(model, tmp_path)
