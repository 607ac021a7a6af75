"""Export a trained adapter as GGUF for llama.cpp, Ollama and LM Studio.

`python -m mlx_edgelora.export --adapter DIR --out FOLDER [--type q8_0|q4_0|q4_1|f16|bf16|f32]`
writes FOLDER/model.gguf (base + adapter merged) and an Ollama Modelfile;
`--lora` instead writes FOLDER/adapter.gguf, llama.cpp's LoRA adapter format
(`llama-cli -m base.gguf --lora adapter.gguf`), to apply on top of the user's own base GGUF.

Why both: a merged file runs anywhere as one model; an adapter file is a few MB and keeps the
base the user already has. The merge is fuse.py's (mlx-lm's `LoRALinear.fuse`, in float);
layers the adapter did not touch keep their quantization block for block when the base's
format is a GGUF one (Q4_0/Q4_1/Q8_0 from a GGUF, or MLX 4-bit group 32), so a Q4_1 base
stays exactly Q4_1 there. `--type` sets the format of the merged layers and of float weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import _blas  # noqa: F401  (OpenBLAS before mlx)
from .errors import UserError

MODEL_FILE, ADAPTER_GGUF, MODELFILE = "model.gguf", "adapter.gguf", "Modelfile"


def _check_adapter_kind(adapter: str | Path) -> dict:
    """The adapter's config; only plain LoRA maps onto llama.cpp's adapter and merge."""
    from .lora import CONFIG_FILE, check_adapter

    try:
        kind = json.loads((Path(adapter) / CONFIG_FILE).read_text()).get("fine_tune_type", "lora")
    except (OSError, ValueError, AttributeError):
        kind = "lora"  # check_adapter names the problem
    if kind != "lora":
        raise UserError(
            f"{adapter}: a '{kind}' adapter cannot be exported to GGUF (llama.cpp applies plain "
            "LoRA only); train with --adapter lora"
        )
    return check_adapter(adapter)


def _stops(tokenizer) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in sorted(tokenizer.eos_token_ids)]


def gguf_config(loaded) -> tuple[str, dict]:
    """(GGUF architecture, the hyper-parameters to write), or a UserError for a model llama.cpp
    cannot represent: the family decides (models/, Family.gguf_config)."""
    from .gguf_write import arch_of

    arch, info = arch_of(loaded.config)
    return arch, info.family.gguf_config(loaded.model, loaded.config)


def _model_keys(loaded, config: dict, qtype):
    import gguf

    from .gguf_vocab import copy_tokenizer, hf_tokenizer
    from .gguf_write import FILE_TYPES, add_hparams

    def keys(w: gguf.GGUFWriter) -> None:
        w.add_name(f"{Path(loaded.source).stem}-edgelora")
        w.add_file_type(FILE_TYPES[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(w, config)
        if loaded.kind == "gguf":
            copy_tokenizer(w, loaded.source)
        else:
            hf_tokenizer(w, loaded.tokenizer, config["vocab_size"])

    return keys


def _lora_keys(acfg: dict, config: dict):
    import gguf

    from .gguf_write import add_hparams

    lora = acfg["lora_parameters"]

    def keys(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales B A x by alpha / rank, mlx-lm by `scale`: alpha = scale * rank
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora["scale"]) * lora["rank"])
        add_hparams(w, config)

    return keys


def check_file(path: Path, entries: list, required_keys: list[str]) -> None:
    """Read the written file's header back: every tensor (name, type, shape) and key is there."""
    from .gguf_header import read_header

    header = read_header(str(path))
    got = {t.name: (t.type_id, tuple(reversed(t.dims))) for t in header.tensors}
    want = {e.name: (int(e.qtype), tuple(e.shape)) for e in entries}
    if got != want:
        bad = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise UserError(f"{path}: written tensors differ from the model ({bad}); please report")
    if missing := [k for k in required_keys if k not in header.metadata]:
        raise UserError(f"{path}: metadata keys {missing} missing after writing; please report")


def write_model(loaded, path: Path, qtype: str, donate: bool = False) -> Path:
    """A loaded model without LoRA layers (fused or plain) -> GGUF at `path`, checked.

    `donate`: the model gives up its weights once the tensors to write are listed, so with a
    lazily loaded model each tensor is read, merged, converted, written and released in turn
    (the whole model is never resident); the model is empty afterwards.
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    from .gguf_write import TYPES, model_entries, write_gguf

    arch, config = gguf_config(loaded)
    entries = list(model_entries(loaded.model, config, TYPES[qtype]))
    if donate:
        loaded.model.update(tree_map(lambda _: mx.array([]), loaded.model.parameters()))
    write_gguf(path, arch, _model_keys(loaded, config, TYPES[qtype]), entries)
    check_file(
        path, entries, ["tokenizer.ggml.model", "tokenizer.ggml.tokens", f"{arch}.block_count"]
    )
    return path


def write_lora(loaded, acfg: dict, path: Path) -> Path:
    """The LoRA layers of a loaded model -> llama.cpp adapter GGUF at `path`, checked."""
    from .gguf_write import lora_entries, write_gguf

    arch, config = gguf_config(loaded)
    entries = list(lora_entries(loaded.model, config))
    write_gguf(path, arch, _lora_keys(acfg, config), entries)
    need = ["general.type", "adapter.type", "adapter.lora.alpha", f"{arch}.block_count"]
    check_file(path, entries, need)
    return path


def export(
    model: str | None,
    adapter: str,
    out: str,
    qtype: str = "q8_0",
    lora_only: bool = False,
    overwrite: bool = False,
    quantize: int | None = None,
) -> Path:
    """Write model.gguf (or adapter.gguf with `lora_only`) and a Modelfile into `out`."""
    from .files import check_out, make_folder, write_text_atomic
    from .fuse import fuse_lora
    from .gguf_write import TYPES, arch_of
    from .loading import load_model
    from .lora import load_adapters
    from .ollama import modelfile

    if qtype not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)} (got {qtype})")
    acfg = _check_adapter_kind(adapter)
    saved = acfg.get("edgelora")  # the run that wrote it, if ours
    saved = saved if isinstance(saved, dict) else {}
    base = model or saved.get("model")
    folder = check_out(out, overwrite, inside=base)
    loaded = load_model(base, quantize or saved.get("quantize"), lazy=True)  # read as written
    gguf_config(loaded)  # refuse a model llama.cpp cannot represent before any work
    load_adapters(loaded.model, adapter)
    make_folder(folder)
    family, chat = arch_of(loaded.config)[1].family, loaded.tokenizer.chat_template
    stops = _stops(loaded.tokenizer)
    if lora_only:
        path = write_lora(loaded, acfg, folder / ADAPTER_GGUF)
        base = loaded.source if loaded.kind == "gguf" else "./base.gguf"
        text, note = modelfile(base, family, chat, stops, path.name)
        if loaded.kind != "gguf":
            text = "# replace ./base.gguf by your GGUF of the base model\n" + text
    else:
        fuse_lora(loaded.model, dequantize=True, rest=False)
        path = write_model(loaded, folder / MODEL_FILE, qtype, donate=True)
        text, note = modelfile(f"./{path.name}", family, chat, stops)
    write_text_atomic(folder / MODELFILE, text)
    if note:
        print(f"{folder / MODELFILE}: {note}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mlx_edgelora.export", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", help="the base the adapter was trained on (default: as recorded)")
    p.add_argument(
        "--quantize", type=int, choices=[4, 8], help="as in training (default: recorded)"
    )
    p.add_argument("--adapter", required=True, help="adapter folder (the --out of a training run)")
    p.add_argument("--out", required=True, help="folder for the .gguf and the Ollama Modelfile")
    p.add_argument(
        "--type",
        default="q8_0",
        choices=["q8_0", "q4_0", "q4_1", "f16", "bf16", "f32"],
        help="format of the merged layers and float weights; layers without LoRA that are "
        "already Q4_0/Q4_1/Q8_0 are copied exactly (default: q8_0)",
    )
    p.add_argument(
        "--lora", action="store_true", help="write the adapter alone (llama.cpp --lora format)"
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = p.parse_args(argv)
    try:
        path = export(
            args.model, args.adapter, args.out, args.type, args.lora, args.overwrite, args.quantize
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = path.parent
    print(f"wrote {path} and {folder / MODELFILE}")
    if args.lora:
        print(f"try: llama-cli -m BASE.gguf --lora {path} -cnv")
    else:
        print(f"try: ollama create my-model -f {folder / MODELFILE} && ollama run my-model")
        print(f"  or: llama-cli -m {path} -cnv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
