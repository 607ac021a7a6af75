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
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from .errors import UserError
from .files import check_out, make_folder, write_safetensors

# Files a previous fuse wrote: a stale shard of ours left beside new ones would be loaded too.
_OUR_FILES = ["model*.safetensors", "model.safetensors.index.json", "config.json"]


def install(tmp: Path, out: Path) -> None:
    """Move the finished model from `tmp` into `out`: one rename when `out` is new; else
    each file replaces its old version, then our stale files (e.g. extra shards) go. The
    user's other files in `out` stay."""
    if not out.exists():
        os.rename(tmp, out)
        return
    new = {p.name for p in tmp.iterdir()}
    for name in new:
        os.replace(tmp / name, out / name)
    for pattern in _OUR_FILES:
        for f in out.glob(pattern):
            if f.name not in new:
                f.unlink()


def fuse_lora(model, dequantize: bool = False, rest: bool = True) -> int:
    """Replace every LoRALinear by its fused linear (re-quantized unless `dequantize`).

    `rest=False` with `dequantize`: layers without LoRA keep their quantization (GGUF export
    copies them block for block).
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize and rest:
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
    """(--model, --quantize) of the run that wrote `adapter` (None if not ours), once the
    adapter's files are checked: a bad adapter must not cost a model load first."""
    from .lora import check_adapter

    saved = check_adapter(adapter).get("edgelora")
    saved = saved if isinstance(saved, dict) else {}
    return saved.get("model"), saved.get("quantize")


def save_weights(folder: Path, model) -> None:
    """mlx-lm's shards and index (`mlx_lm.utils.save_model`'s layout), one tensor at a time.

    Why not save_model: it evaluates a whole shard (up to 5 GB) at once. Here the model is
    lazy (loaded from its files, fused, re-quantized as a graph) and gives up its references
    first, so each tensor is read, merged, quantized, written and released before the next:
    the whole model is never resident.
    """
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import get_total_parameters, make_shards

    weights = dict(tree_flatten(model.parameters()))
    index = {
        "metadata": {
            "total_size": sum(v.nbytes for v in weights.values()),
            "total_parameters": get_total_parameters(model),
        },
        "weight_map": {},
    }
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))  # only `weights` holds
    shards = make_shards(weights)
    weights.clear()
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    for i in range(len(shards)):
        shard, shards[i] = shards[i], None
        file = name.format(i + 1, len(shards))
        index["weight_map"].update(dict.fromkeys(shard, file))
        write_safetensors(folder / file, shard)  # consumes the shard tensor by tensor
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


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
    from mlx_lm.utils import save_config

    from .loading import describe_source, load_model
    from .lora import load_adapters, saved_kind
    from .spill import sweep_stale

    saved_model, saved_quantize = trained_on(adapter)
    if refusal := saved_kind(adapter).fuse_refusal:
        raise UserError(f"--adapter {adapter}: cannot fuse: {refusal}")
    base = model or saved_model
    folder = check_out(out, overwrite, inside=base)
    print(f"fuse: base model: {describe_source(base)}", file=sys.stderr)  # before any download
    loaded = load_model(base, quantize or saved_quantize, lazy=True)  # read as written
    load_adapters(loaded.model, adapter)
    fuse_lora(loaded.model, dequantize)
    config = {k: v for k, v in loaded.config.items() if k not in ("quantization_config",)}
    config.pop("quantization", None)
    if quant := quantization_config(loaded.model):
        config["quantization"] = quant
    # GGUF stop tokens (eos, end-of-turn) live in the tokenizer wrapper, not in a config file.
    config.setdefault("eos_token_id", sorted(loaded.tokenizer.eos_token_ids))
    make_folder(folder.parent)
    prefix = f".{folder.name}.fuse-"  # + pid: a killed fuse's folder is swept by the next one
    sweep_stale(folder.parent, prefix)
    tmp = folder.with_name(f"{prefix}{os.getpid()}-tmp")  # beside --out: same disk, renames
    try:
        make_folder(tmp)
        save_weights(tmp, loaded.model)
        save_config(config, tmp / "config.json")
        loaded.tokenizer.save_pretrained(str(tmp))
        install(tmp, folder)
    except OSError as e:
        raise UserError(f"{folder}: cannot save the fused model ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
