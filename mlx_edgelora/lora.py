"""LoRA over a (quantized) frozen base, saved and loaded in mlx-lm's adapter format.

Technique 1's other half: the base stays INT4/INT8 and frozen, the LoRA A/B matrices are
float32. We reuse mlx-lm's LoRALinear and adapter files, so `mlx_lm.generate --adapter-path`
reads what we write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as _mlx_lm_load_adapters

from .config import TrainConfig
from .errors import UserError
from .state import write_safetensors

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_config(cfg: TrainConfig, n_blocks: int) -> dict:
    """The adapter_config.json mlx-lm expects (plus our resolved training config)."""
    num_layers = n_blocks if cfg.num_layers < 0 else min(cfg.num_layers, n_blocks)
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": cfg.rank,
            "scale": cfg.lora_scale,
            "dropout": cfg.lora_dropout,
            "keys": list(cfg.lora_keys),
        },
        "edgelora": cfg.to_dict(),
    }


def apply_lora(model: nn.Module, cfg: TrainConfig) -> dict:
    """Freeze the base and wrap the chosen projections with float32 LoRA; return its config."""
    n_blocks = len(model.layers)
    acfg = adapter_config(cfg, n_blocks)
    _check_keys(model, acfg["lora_parameters"]["keys"])
    model.freeze()
    linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"])
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_a = m.lora_a.astype(mx.float32)
            m.lora_b = m.lora_b.astype(mx.float32)
    mx.eval(model.trainable_parameters())
    return acfg


def _check_keys(model: nn.Module, keys: list[str]) -> None:
    present = {name for name, _ in model.layers[0].named_modules()}
    missing = [k for k in keys if k not in present]
    if missing:
        options = sorted(k for k in present if k.count(".") == 1)
        raise UserError(
            f"--lora-keys: {', '.join(missing)} not found in the model's blocks; "
            f"choose from {', '.join(options)}"
        )


def has_active_dropout(module: nn.Module) -> bool:
    """True if a LoRA dropout inside `module` would draw a new mask on every call.

    Recompute (segment checkpointing, chunked MLP) would then see a second, different mask.
    """
    return any(
        isinstance(m, nn.Dropout) and m.training and m._p_1 < 1.0 for _, m in module.named_modules()
    )


def lora_state(model: nn.Module) -> dict[str, mx.array]:
    """Flat {name: array} of the adapter weights only (what adapters.safetensors holds)."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(
    model: nn.Module, folder: str | Path, acfg: dict, tensors: dict | None = None
) -> None:
    """Write adapters.safetensors + adapter_config.json atomically (tmp file, then rename);
    `tensors` (lazily loaded, from streamed state) replaces the model's own LoRA weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ADAPTER_FILE}.tmp.safetensors"
    if tensors is None:
        mx.save_safetensors(str(tmp), lora_state(model))
    else:
        write_safetensors(tmp, tensors)
    os.replace(tmp, folder / ADAPTER_FILE)
    tmp_cfg = folder / f".{CONFIG_FILE}.tmp"
    tmp_cfg.write_text(json.dumps(acfg, indent=2))
    os.replace(tmp_cfg, folder / CONFIG_FILE)


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a saved adapter (ours or mlx-lm's) to `model` with mlx-lm's own loader."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise UserError(
            f"{folder}: not an adapter folder (needs {ADAPTER_FILE} and {CONFIG_FILE}); "
            "point --adapter at the --out folder of a training run"
        )
    try:
        _mlx_lm_load_adapters(model, str(folder))
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{folder}: adapter does not fit this model ({first})") from None
    model.eval()
    return model
