"""EMLoC: train LoRA on a small emulator of the model, then correct it for the original model.

`python -m mlx_edgelora.emloc --model M --data D --ratio 0.4 --out runs/e [train flags]`

Paper: Lin et al., "EMLoC" (arXiv 2506.12015), per /work/shared/methods.md. Three stages:
1. emulator (emulator.py): calibrate the original model on `calib_rows` rows of the user's
   training data and replace each target linear by its activation-aware SVD (cached on disk);
2. train LoRA on the emulator with our ordinary trainer (every engine option applies), in
   OUT/emulator-lora (resumable with --resume);
3. LoRA correction (`correct`): re-express the adapter so that, on the original model, inputs
   in span(A) see emulator + LoRA and inputs orthogonal to it see W unchanged. The result is
   an ordinary mlx-lm LoRA adapter in OUT for the ORIGINAL model (generate, fuse and
   `mlx_lm.generate --adapter-path` read it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import _blas  # noqa: F401  (OpenBLAS before mlx)
from .config import TrainConfig, parse_config
from .errors import UserError

DEFAULT_RATIO = 0.4  # the authors' default
DEFAULT_CALIB_ROWS = 64  # calibration rows (the code's 64 samples)
DEFAULT_CLAMP = 3.0  # L: the correction's row-wise clamp
RUN_DIR = "emulator-lora"  # the LoRA trained on the emulator, inside --out


@dataclass
class EmlocResult:
    out: Path  # the corrected adapter for the original model
    emulator_path: Path  # the cached emulator factors
    emulator_run: Path  # the (uncorrected) adapter trained on the emulator
    emulator_val_loss: float | None  # held-out loss of emulator + LoRA
    peak_gb: float  # training peak on the emulator


def correct(a, b, scale: float, w, w_emu, clamp: float = DEFAULT_CLAMP):
    """(A', B''): the LoRA (A [in, r], B [r, out]) trained on W_emu, corrected for W [out, in].

    A = U_a S_a V_a^T; A' = U_a, B' = S_a V_a^T B (so A'B' = AB); C = U_a^T (W - W_emu)^T,
    each row i scaled down so that mean|C_i| / mean|s B'_i| <= clamp; B'' = B' - C / s.
    Then x W^T + s x A' B'' = x W_emu^T + s x A B for x in span(A), x W^T for x orthogonal.
    """
    import mlx.core as mx

    u, sig, vt = mx.linalg.svd(a.astype(mx.float32), stream=mx.cpu)
    r = a.shape[1]
    a1 = u[:, :r]
    b1 = (sig[:, None] * vt) @ b.astype(mx.float32)
    c = a1.T @ (w - w_emu).T  # [r, out]
    if clamp != float("inf"):
        ratio = mx.abs(c).mean(axis=1) / mx.maximum(mx.abs(scale * b1).mean(axis=1), 1e-12)
        c = c * mx.minimum(1.0, clamp / mx.maximum(ratio, 1e-12))[:, None]
    return a1, b1 - c / scale


def heldout_loss(model, cfg: TrainConfig, rows: list) -> float:
    """Mean exact loss of `model` (as it is: any adapter applied) over validation `rows`."""
    from . import engine, loss, quant
    from .trainer import evaluate

    quant.prepare_for_training(model)  # the backend's fast quantized matmul (idempotent)

    class _Plain:  # evaluate() needs only forward_loss
        def forward_loss(self, head, batch):
            return engine.forward_loss(model, cfg, head, batch)

    return evaluate(_Plain(), cfg, rows, loss.exact_loss_head(model, cfg))[0]


def build_emulator(loaded, rows: list, cfg: TrainConfig, ratio: float, calib_rows: int, cache):
    """{path: EmulatorLinear} for `loaded`, from the cache or calibrated now; and its file."""
    from . import emulator

    sample = rows[:calib_rows]
    tokens, weights = emulator.calibration_batches(sample, len(sample) == len(rows))
    key = emulator.fingerprint(loaded.source, cfg.quantize, tokens, ratio, cfg.lora_keys)
    path = emulator.cache_root(cache) / f"{key}.safetensors"
    if path.is_file():
        print(f"emulator: reusing {path}", file=sys.stderr)
        return emulator.load(path), path
    loaded.model.freeze()
    built = emulator.build(loaded.model, tokens, weights, ratio, cfg.lora_keys, cfg.out)
    emulator.save(path, built)
    print(f"emulator: {len(built)} layers saved to {path}", file=sys.stderr)
    return built, path


def emloc(
    cfg: TrainConfig,
    ratio: float = DEFAULT_RATIO,
    calib_rows: int = DEFAULT_CALIB_ROWS,
    clamp: float = DEFAULT_CLAMP,
    emulator_dir: str | None = None,
) -> EmlocResult:
    """Build (or reuse) the emulator, train LoRA on it, write the corrected adapter to cfg.out."""
    from . import emulator, files, lora
    from .dataset import load_dataset
    from .loading import load_model
    from .trainer import train

    cfg = cfg.validate()
    if cfg.adapter != "lora":
        raise UserError("--adapter: EMLoC trains and corrects LoRA; use --adapter lora")
    if not 0 < ratio <= 1 or calib_rows < 1:
        raise UserError(f"--ratio must be in (0, 1] and --calib-rows >= 1 ({ratio}, {calib_rows})")
    out = files.check_out(  # refuses a user's non-empty folder before any work
        cfg.out, cfg.resume or cfg.overwrite, "--resume to continue it, --overwrite to replace it"
    )
    files.make_folder(out)
    loaded = load_model(cfg.model, cfg.quantize)
    data = load_dataset(cfg.data, loaded.tokenizer, cfg)
    built, path = build_emulator(loaded, data.train_rows, cfg, ratio, calib_rows, emulator_dir)
    emulator.install(loaded.model, built)
    # the emulator run's folder is ours: replaced unless resumed
    run_cfg = dataclasses.replace(cfg, out=str(Path(cfg.out) / RUN_DIR), overwrite=True)
    result = train(run_cfg, loaded=loaded, data=data, keep_model=False)
    del loaded, built
    original = load_model(cfg.model, cfg.quantize)
    acfg = lora.adapter_config(cfg, len(original.model.layers))
    acfg["emloc"] = {
        "ratio": ratio,
        "calib_rows": calib_rows,
        "clamp": clamp,
        "emulator": str(path),
    }
    write_corrected(original.model, result.out, emulator.load(path), acfg, clamp, out)
    return EmlocResult(out, path, result.out, result.val_loss, result.peak_gb)


def write_corrected(model, run: Path, built: dict, acfg: dict, clamp: float, folder: Path):
    """Correct every LoRA pair of the emulator run against the original `model`'s weights."""
    import mlx.core as mx

    from . import files, lora
    from .emulator import dense_weight

    adapter = mx.load(str(run / lora.ADAPTER_FILE))
    modules = dict(model.named_modules())
    scale = acfg["lora_parameters"]["scale"]
    out = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in adapter}):
        w = dense_weight(modules[name])
        w_emu = dense_weight(built[name]) if name in built else w
        a1, b2 = correct(
            adapter[f"{name}.lora_a"], adapter[f"{name}.lora_b"], scale, w, w_emu, clamp
        )
        mx.eval(a1, b2)
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = a1, b2
    with files.atomic_path(folder / lora.ADAPTER_FILE, durable=True) as tmp:
        mx.save_safetensors(str(tmp), out)
    files.write_text_atomic(folder / lora.CONFIG_FILE, json.dumps(acfg, indent=2), durable=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mlx_edgelora.emloc",
        description=__doc__.split("\n")[0],
        epilog="every other flag is a training flag (python -m mlx_edgelora.train --help)",
    )
    p.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="emulator size (0.4)")
    p.add_argument("--calib-rows", type=int, default=DEFAULT_CALIB_ROWS, help="rows (64)")
    p.add_argument("--clamp", type=float, default=DEFAULT_CLAMP, help="correction clamp L (3)")
    p.add_argument("--emulator-dir", help="emulator cache (default ~/.cache/mlx_edgelora/emloc)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = parse_config(rest)
        r = emloc(cfg, args.ratio, args.calib_rows, args.clamp, args.emulator_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loss = "n/a" if r.emulator_val_loss is None else f"{r.emulator_val_loss:.4f}"
    print(
        f"emulator + LoRA validation loss {loss}, peak {r.peak_gb:.2f} GB\n"
        f"corrected adapter for the original model in {r.out}; try it: "
        f"python -m mlx_edgelora.generate --adapter {r.out} --prompt hi"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
