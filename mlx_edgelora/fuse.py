"""Merge a LoRA adapter into its base and save an ordinary mlx-lm model folder.

`python -m mlx_edgelora.fuse --model M --adapter DIR --out FOLDER [--dequantize]`

Why: a fused folder needs neither this package nor the adapter: `mlx_lm.load`,
`mlx_lm.generate --model FOLDER` and `mlx_lm.server` read it as they read any mlx-community
model, also when the base was a GGUF file (its tokenizer, rebuilt from GGUF metadata, is saved
as tokenizer.json; its mixed 4/8-bit quantization becomes per-layer entries of config.json).
Each LoRA projection y = x W^T + scale * x A B becomes one matrix, W + scale * B^T A^T, with
mlx-lm's own `LoRALinear.fuse`.

Precision: by default a fused projection of a quantized base is quantized again to the base's
bits and group size. That is lossy: the adapter's update is small next to the quantization
step, so part of it rounds away. `--dequantize` keeps every weight in float (about 4x larger
at 4 bits) and reproduces base + adapter exactly, up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from . import _blas  # noqa: F401  (OpenBLAS before mlx)
from .errors import UserError

# Files a previous fuse wrote: removed first with --overwrite, so no stale shard is loaded.
_OUR_FILES = ["model*.safetensors", "model.safetensors.index.json", "config.json"]


def prepare_out(out: str | Path, overwrite: bool) -> Path:
    """The output folder, refusing to write into a non-empty one without --overwrite."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: folder is not empty; pass --overwrite to replace it "
                "or choose another --out"
            )
        for pattern in _OUR_FILES:
            for f in out.glob(pattern):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def fuse_lora(model, dequantize: bool = False) -> int:
    """Replace every LoRALinear by its fused linear (re-quantized unless `dequantize`)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)  # the (tied) embedding and any linear without LoRA too
    return len(fused)


def quantization_config(model) -> dict | None:
    """mlx-lm's `quantization` entry read off the modules: the common format + per-layer ones."""
    from mlx import nn

    formats = {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if not formats:
        return None
    common = Counter(tuple(f.items()) for f in formats.values()).most_common(1)[0][0]
    config = dict(common)
    config.update({name: f for name, f in formats.items() if tuple(f.items()) != common})
    return config


def trained_on(adapter: str | Path) -> tuple[str | None, int | None]:
    """(--model, --quantize) of the run that wrote `adapter`, from its adapter_config.json."""
    from .lora import CONFIG_FILE

    try:
        saved = json.loads((Path(adapter) / CONFIG_FILE).read_text()).get("edgelora", {})
    except (OSError, ValueError):
        return None, None  # not ours (or missing): load_adapters names the problem
    return saved.get("model"), saved.get("quantize")


def fuse(
    model: str | None,
    adapter: str,
    out: str,
    dequantize: bool = False,
    overwrite: bool = False,
    quantize: int | None = None,
) -> Path:
    """Load `model` + `adapter`, fuse, and save an mlx-lm folder at `out`; return its path.

    `model` / `quantize` None: the base the adapter was trained on, quantized as it was.
    """
    from mlx_lm.utils import save_config, save_model

    from .loading import load_model
    from .lora import load_adapters, saved_kind

    if refusal := saved_kind(adapter).fuse_refusal:
        raise UserError(f"--adapter {adapter}: cannot fuse: {refusal}")
    folder = prepare_out(out, overwrite)
    saved_model, saved_quantize = trained_on(adapter)
    loaded = load_model(model or saved_model, quantize or saved_quantize)
    load_adapters(loaded.model, adapter)
    fuse_lora(loaded.model, dequantize)
    config = {k: v for k, v in loaded.config.items() if k not in ("quantization_config",)}
    config.pop("quantization", None)
    if quant := quantization_config(loaded.model):
        config["quantization"] = quant
    # GGUF stop tokens (eos, end-of-turn) live in the tokenizer wrapper, not in a config file.
    config.setdefault("eos_token_id", sorted(loaded.tokenizer.eos_token_ids))
    save_model(folder, loaded.model)
    save_config(config, folder / "config.json")
    loaded.tokenizer.save_pretrained(str(folder))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mlx_edgelora.fuse", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--model", help="the base the adapter was trained on (default: the one it records)"
    )
    p.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        help="quantize a float base at load, as in training (default: as the adapter records)",
    )
    p.add_argument("--adapter", required=True, help="adapter folder (the --out of a training run)")
    p.add_argument("--out", required=True, help="folder for the fused mlx-lm model")
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="save float weights (exact, ~4x larger) instead of re-quantizing to the base's bits",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        folder = fuse(
            args.model, args.adapter, args.out, args.dequantize, args.overwrite, args.quantize
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"fused model saved to {folder}; try: mlx_lm.generate --model {folder} --prompt hi")
    return 0


if __name__ == "__main__":
    sys.exit(main())
