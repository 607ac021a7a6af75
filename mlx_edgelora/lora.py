"""LoRA over a (quantized) frozen base, saved and loaded in mlx-lm's adapter format.

Technique 1's other half: the base stays INT4/INT8 and frozen, the LoRA A/B matrices are
float32. We reuse mlx-lm's LoRALinear and adapter files, so `mlx_lm.generate --adapter-path`
reads what we write.

This module also holds the adapter registry (`--adapter lora|lars`): each kind swaps the
chosen linears for a module with its own trainable parameters (LoRALinear, lars.LARSLinear),
so the engine and the trainer never branch on the kind. Every kind is saved the same way
(trainable parameters + adapter_config.json naming its `fine_tune_type`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as _mlx_lm_load_adapters

from .config import TrainConfig
from .errors import UserError
from .files import atomic_path, write_safetensors, write_text_atomic

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_config(cfg: TrainConfig, n_blocks: int) -> dict:
    """The adapter_config.json mlx-lm expects (plus our resolved training config)."""
    num_layers = n_blocks if cfg.num_layers < 0 else min(cfg.num_layers, n_blocks)
    if cfg.adapter == "lars":
        from .lars import lars_parameters

        params = {"lars_parameters": lars_parameters(cfg)}
    else:
        params = {
            "lora_parameters": {
                "rank": cfg.rank,
                "scale": cfg.lora_scale,
                "dropout": cfg.lora_dropout,
                "keys": list(cfg.lora_keys),
            }
        }
    return {
        "fine_tune_type": cfg.adapter,
        "num_layers": num_layers,
        **params,
        "edgelora": cfg.to_dict(),
    }


@dataclass(frozen=True)
class AdapterKind:
    """One --adapter choice: how to wrap a model for training and how to load a saved one."""

    apply: Callable[[nn.Module, dict], None]  # (model, adapter_config) -> wrapped, frozen base
    load: Callable[[nn.Module, Path, dict], None]  # (model, folder, adapter_config)
    fuse_refusal: str | None = None  # why `fuse` cannot merge it (None: it can)


def _kinds() -> dict[str, AdapterKind]:
    from . import lars  # lars imports this module's neighbours; import it when needed

    return {
        "lora": AdapterKind(_wrap_lora, _load_lora),
        "lars": AdapterKind(
            lambda m, a: lars.wrap(m, a["num_layers"], a["lars_parameters"]),
            lambda m, f, a: lars.load(m, f, a, ADAPTER_FILE),
            "a LARS gate depends on the input (x * (1 + alpha (zU)V)), so it cannot be merged "
            "into W; use the adapter unfused (mlx_edgelora.generate --adapter)",
        ),
    }


def adapter_kind(name: str, where: str = "--adapter") -> AdapterKind:
    kinds = _kinds()
    if name not in kinds:
        raise UserError(f"{where}: unknown adapter kind '{name}'; use {' or '.join(kinds)}")
    return kinds[name]


def apply_adapter(model: nn.Module, cfg: TrainConfig) -> dict:
    """Freeze the base and wrap the chosen projections with cfg.adapter; return its config."""
    from . import blocks  # imported here: blocks -> models -> attention imports this module

    acfg = adapter_config(cfg, len(blocks.layers(model)))
    _check_keys(model, list(cfg.lora_keys))
    adapter_kind(cfg.adapter).apply(model, acfg)
    return acfg


def apply_lora(model: nn.Module, cfg: TrainConfig) -> dict:
    """Freeze the base and wrap the chosen projections with float32 LoRA; return its config."""
    if cfg.adapter != "lora":
        raise ValueError(f"apply_lora with adapter={cfg.adapter!r}: use apply_adapter")
    return apply_adapter(model, cfg)


def _wrap_lora(model: nn.Module, acfg: dict) -> None:
    model.freeze()
    linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"])
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_a = m.lora_a.astype(mx.float32)
            m.lora_b = m.lora_b.astype(mx.float32)
    mx.eval(model.trainable_parameters())


def _check_keys(model: nn.Module, keys: list[str]) -> None:
    """Every key must name a linear projection of a block (what LoRA can wrap: a linear, or
    a module with mlx-lm's `to_lora` hook, e.g. EMLoC's emulator layer)."""
    from . import blocks

    modules = blocks.layers(model)[0].named_modules()
    hooked = {name for name, m in modules if hasattr(m, "to_lora")}
    linear = hooked | {
        name
        for name, m in modules
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and name.rsplit(".", 1)[0] not in hooked
    }
    wrong = [k for k in keys if k not in linear]
    if wrong:
        raise UserError(
            f"--lora-keys: {', '.join(wrong)} is not a linear projection of the model's "
            f"blocks; choose from {', '.join(sorted(linear))}"
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
    """Write adapters.safetensors + adapter_config.json, each atomically and durably;
    `tensors` (lazily loaded, from streamed state) replaces the model's own LoRA weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ADAPTER_FILE, durable=True) as tmp:
        if tensors is None:
            mx.save_safetensors(str(tmp), lora_state(model))
        else:
            write_safetensors(tmp, tensors)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(acfg, indent=2), durable=True)


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, checked for what its kind's loader reads (else a KeyError there)."""
    path = folder / CONFIG_FILE
    try:
        acfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); copy it again from the run") from None
    if not isinstance(acfg, dict):
        raise UserError(f"{path}: expected a JSON object; copy it again from the run")
    kind = acfg.get("fine_tune_type", "lora")
    if kind == "full":
        return acfg
    section, fields = (
        ("lars_parameters", ("rank", "block"))
        if kind == "lars"
        else (
            "lora_parameters",
            ("rank", "scale", "dropout"),
        )
    )
    params = acfg.get(section)
    params = params if isinstance(params, dict) else {}
    values = {"num_layers": acfg.get("num_layers")}
    values.update({f"{section}.{k}": params.get(k) for k in fields})
    bad = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if kind not in ("lora", "dora", "lars"):
        bad.insert(0, f"fine_tune_type {kind!r}")
    if bad:
        raise UserError(
            f"{path}: incomplete or invalid adapter config (missing or wrong: {', '.join(bad)}); "
            "copy it again from the training run's --out"
        )
    return acfg


def check_adapter(folder: str | Path) -> dict:
    """An adapter folder's config, once its files are known to be complete (before a model is
    loaded for it: a bad adapter should not cost a model load first)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise UserError(
            f"{folder}: not an adapter folder (needs {ADAPTER_FILE} and {CONFIG_FILE}); "
            "point --adapter at the --out folder of a training run"
        )
    acfg = read_adapter_config(folder)
    try:
        mx.load(str(folder / ADAPTER_FILE))  # lazy: reads the header and checks the sizes
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(
            f"{folder / ADAPTER_FILE}: unreadable ({str(e).splitlines()[0]}); the file is "
            "truncated or corrupt: copy it again from the training run"
        ) from None
    return acfg


def saved_kind(folder: str | Path) -> AdapterKind:
    """The AdapterKind that wrote the adapter in `folder` (dora and full load as mlx-lm's)."""
    kind = check_adapter(folder).get("fine_tune_type", "lora")
    return _kinds()["lars" if kind == "lars" else "lora"]


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a saved adapter (ours, of any kind, or mlx-lm's) to `model`."""
    folder = Path(folder)
    acfg = check_adapter(folder)
    saved_kind(folder).load(model, folder, acfg)
    model.eval()
    return model


def _load_lora(model: nn.Module, folder: Path, acfg: dict) -> None:
    """mlx-lm's own loader, so what mlx-lm wrote loads as mlx-lm loads it."""
    try:
        _mlx_lm_load_adapters(model, str(folder))
    except ValueError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise UserError(f"{folder}: adapter does not fit this model: {detail}{more}") from None
