"""--dtype (issue 17, item 2): half-precision kernels on this CPU, quality, memory, step time.

Parts (each writes its section of bench/results/dtype.json, then dtype.md is rebuilt):
- matmul (timing: run under the timing lock, not niced): a 2048x576 @ 576x1536 product in
  float32, bfloat16, float16 (MLX's CPU half matmul has no BLAS), and quant.matmul on
  bfloat16 operands (what --dtype bfloat16 runs on a CPU: exact upcast + float32 BLAS).
- quality (loss only: run niced): the embedded SmolLM2-135M fine-tuned for --steps steps at
  --max-seq-len tokens on the bundled chat set with --dtype float32, bfloat16, and "auto on a
  bfloat16 model" (the model marked bf16 so auto resolves as for an mlx-community folder on a
  CPU: bf16 weights and boundaries, float32 compute); same seed, same data order, a fresh
  model per run. Held-out exact loss of each adapter over every validation row, evaluated in
  float32 (and the run's own validation loss, in its dtype).
- step (timing + memory: under the timing lock): one forward+backward of SmolLM2 at --tokens
  tokens per variant, interleaved (A B C A B C ...), disk boundaries, streamed weights; the
  peak (`mx.get_peak_memory`, reset before each step) and wall time of each.
- qwen (memory: niced): bench/trainer_rows.py's Qwen2.5-0.5B-shape random INT4 folder (bf16
  scales and norms), `python -m mlx_edgelora.train` itself, 512 tokens, 3 steps, with
  --dtype float32 / auto / bfloat16: the trainer's reported peak and max RSS.

    flock /work/wt/_brief/timing.lock python bench/dtype.py matmul step
    nice -n 10 python bench/dtype.py quality qwen
    python bench/dtype.py --report
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import mlx_edgelora  # noqa: F401  (first: it preloads OpenBLAS before mlx loads)
import mlx.core as mx

# isort: on
import numpy as np

from mlx_edgelora import (
    TrainConfig,
    engine,
    load_dataset,
    load_model,
    lora,
    loss,
    precision,
    quant,
    train,
)
from mlx_edgelora.batching import Batch, iter_eval_batches

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "dtype.json"
DATA = ROOT / "assets" / "sample_chat.jsonl"
GB = 1024**3
HALF = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _save(section: str, value) -> None:
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result[section] = value
    OUT.write_text(json.dumps(result, indent=2))
    report()


def part_matmul(reps: int = 3) -> dict:
    a, b = mx.random.normal((2048, 576)), mx.random.normal((576, 1536))
    fns = {name: (lambda x, y: x @ y, dt) for name, dt in HALF.items()}
    fns["bfloat16 via quant.matmul"] = (quant.matmul, mx.bfloat16)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):  # interleaved: load hits every variant alike
        for name, (fn, dt) in fns.items():
            x, y = a.astype(dt), b.astype(dt)
            mx.eval(x, y, fn(x, y))  # warm-up
            t0 = time.perf_counter()
            mx.eval(fn(x, y))
            times[name].append((time.perf_counter() - t0) * 1000)
    return {
        "shape": "2048x576 @ 576x1536",
        "ms_median": {k: round(float(np.median(v)), 1) for k, v in times.items()},
        "ms_all": {k: [round(t, 1) for t in v] for k, v in times.items()},
        "loadavg": os.getloadavg(),
        "device": str(mx.default_device()),
    }


VARIANTS = {  # name -> (--dtype, the model's own dtype as auto sees it)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "auto on a bf16 model (CPU)": ("auto", mx.bfloat16),
}


def _loaded(native):
    loaded = load_model(None)
    if native is not None:
        loaded.dtype = native  # what auto sees for an mlx-community bf16 folder
    return loaded


def exact_loss_fp32(model, cfg, rows) -> float:
    """Mean exact CE over every trainable token of `rows`, computed in float32."""
    cfg32 = TrainConfig(**{**cfg.to_dict(), "dtype": "float32"})
    head = loss.exact_loss_head(model, cfg32)
    total = count = 0
    for batch in iter_eval_batches(rows, 1, None):
        s, n = engine.forward_loss(model, cfg32, head, batch)
        total, count = total + s, count + n
    return total / max(count, 1)


def part_quality(steps: int, seq: int, variants: list[str]) -> dict:
    """The runs of `variants` (separate processes may run the others: `_save_quality`)."""
    result = {"steps": steps, "max_seq_len": seq, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(
            data=str(DATA), steps=steps, max_seq_len=seq, lr=5e-4, warmup=3, eval_every=0,
            eval_batches=-1, save_every=0, overwrite=True, seed=0, out=f"{tmp}/r",
        )  # fmt: skip
        data = load_dataset(str(DATA), load_model(None).tokenizer, TrainConfig(**base))
        for name in variants:
            dtype, native = VARIANTS[name]
            loaded = _loaded(native)
            t0, load0 = time.perf_counter(), os.getloadavg()
            cfg = TrainConfig(**base, dtype=dtype)
            res = train(cfg, loaded=loaded, data=data)  # keep_model: weights back to fp32
            result["runs"][name] = {
                "val_exact_in_run_dtype": res.val_loss,
                "val_exact_fp32": exact_loss_fp32(loaded.model, cfg, data.val_rows),
                "train_loss_last": [r for r in res.history if "loss" in r][-1]["loss"],
                "peak_gb": round(res.peak_gb, 4),
                "wall_s_under_load": round(time.perf_counter() - t0, 1),
                "loadavg": [load0[0], os.getloadavg()[0]],
            }
            print(name, result["runs"][name], flush=True)
            del loaded
            gc.collect()
    result["val_rows"], result["val_tokens"] = len(data.val_rows), data.trainable_tokens("val")
    return result


def _save_quality(new: dict) -> None:
    """Merge with runs another process saved meanwhile; each run relative to float32's."""
    old = json.loads(OUT.read_text()).get("quality", {}) if OUT.exists() else {}
    if (old.get("steps"), old.get("max_seq_len")) == (new["steps"], new["max_seq_len"]):
        new["runs"] = {**old.get("runs", {}), **new["runs"]}
    ref = new["runs"].get("float32", {}).get("val_exact_fp32")
    for r in new["runs"].values():
        r["vs_float32_pct"] = round(100 * (r["val_exact_fp32"] / ref - 1), 3) if ref else None
    _save("quality", new)


def _step_fn(name: str, tokens: int, tmp: str, layers: int | None):
    dtype, native = VARIANTS[name]
    loaded = _loaded(native)
    if layers:  # the first blocks only: with streamed weights and disk boundaries a step's
        loaded.model.model.layers = loaded.model.model.layers[:layers]  # peak is per block
    cfg = TrainConfig(
        max_seq_len=tokens, dtype=dtype, out=f"{tmp}/{len(os.listdir(tmp))}", stream_state=False
    ).validate()
    model = loaded.model
    prec = precision.resolve(cfg.dtype, loaded.dtype)
    precision.cast_weights(model, prec.storage)
    lora.apply_adapter(model, cfg)
    quant.prepare_for_training(model)
    head = loss.make_loss_head(model, cfg.loss, cfg)
    return engine.make_step(model, cfg, head, None, prec), prec


def part_step(tokens: int, reps: int, warmup: bool, layers: int | None) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (1, tokens + 1)).astype(np.int32)
    batch = Batch(ids[:, :-1], ids[:, 1:], np.ones((1, tokens), bool))
    out: dict = {"tokens": tokens, "reps": reps, "warmup": warmup, "layers": layers}
    out["variants"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        steps = {name: _step_fn(name, tokens, tmp, layers) for name in VARIANTS}
        for step, _ in steps.values() if warmup else []:  # first-call allocations
            step(batch)
        rows = {name: {"peak_gb": [], "s": [], "loadavg": []} for name in steps}
        for _ in range(reps):
            for name, (step, _) in steps.items():
                gc.collect()
                mx.clear_cache()
                mx.reset_peak_memory()
                base = mx.get_active_memory()
                t0 = time.perf_counter()
                step(batch)
                rows[name]["s"].append(round(time.perf_counter() - t0, 2))
                rows[name]["peak_gb"].append(round((mx.get_peak_memory() - base) / GB, 4))
                rows[name]["loadavg"].append(os.getloadavg()[0])
        for name, (step, prec) in steps.items():
            step.close(restore=False)
            out["variants"][name] = {**rows[name], "precision": prec.describe()}
    return out


def part_qwen(layers: int | None) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from trainer_rows import run_row

    rows = {}
    for dtype in ("float32", "auto", "bfloat16"):
        rows[dtype] = run_row("qwen0.5b", 512, 3, layers, ["--dtype", dtype])
        print(dtype, rows[dtype], flush=True)
    return {"layers": layers, "rows": rows}


def report() -> None:
    r = json.loads(OUT.read_text()) if OUT.exists() else {}
    md = ["# --dtype (issue 17, item 2)", ""]
    if m := r.get("matmul"):
        md += [f"## CPU matmul {m['shape']} ({m['device']}; ms, median of interleaved runs, "
               f"under the timing lock, load {m['loadavg'][0]:.1f})", "",
               "| dtype | ms |", "|---|---|"]  # fmt: skip
        md += [f"| {k} | {v} |" for k, v in m["ms_median"].items()] + [""]
    if q := r.get("quality"):
        md += [f"## SmolLM2-135M Q4_1: {q['steps']} steps at {q['max_seq_len']} tokens, "
               f"held-out exact loss ({q['val_rows']} rows, {q['val_tokens']} tokens)", "",
               "| run | held-out loss (fp32 eval) | vs float32 | own val loss | last train "
               "loss | peak GB | wall s (under load) |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, x in q["runs"].items():
            vs = "n/a" if x.get("vs_float32_pct") is None else f"{x['vs_float32_pct']:+.2f}%"
            md.append(
                f"| {name} | {x['val_exact_fp32']:.4f} | {vs} | "
                f"{x['val_exact_in_run_dtype']:.4f} | {x['train_loss_last']:.4f} | "
                f"{x['peak_gb']:.3f} | {x['wall_s_under_load']:.0f} |"
            )
        md.append("")
    if s := r.get("step"):
        depth = f"first {s['layers']} of 30 blocks" if s.get("layers") else "30 blocks"
        md += [f"## SmolLM2 one forward+backward at {s['tokens']} tokens, {depth} (segments, "
               "disk boundaries, streamed weights; variants interleaved in one process)", "",
               "| run | peak above resident (GB) | step s | load | resolved |",
               "|---|---|---|---|---|"]  # fmt: skip
        for name, x in s["variants"].items():
            md.append(
                f"| {name} | {min(x['peak_gb']):.3f} | {float(np.median(x['s'])):.1f} "
                f"({', '.join(map(str, x['s']))}) | {np.mean(x['loadavg']):.1f} | "
                f"{x['precision']} |"
            )
        md.append("")
    if w := r.get("qwen"):
        depth = f"{w['layers']} blocks (derived)" if w["layers"] else "full depth"
        md += [f"## Qwen2.5-0.5B shape, random INT4 (bf16 scales), 512 tokens, 3 steps, "
               f"`python -m mlx_edgelora.train`, {depth}", "",
               "| --dtype | reported peak (GB) | per-step peaks | max RSS (GB) | wall s "
               "(under load) |", "|---|---|---|---|---|"]  # fmt: skip
        for dtype, x in w["rows"].items():
            md.append(
                f"| {dtype} | {x['reported_peak_gb']:.3f} | "
                f"{', '.join(f'{p:.3f}' for p in x['step_peaks_gb'])} | {x['max_rss_gb']:.2f} | "
                f"{x['wall_s_under_load']:.0f} |"
            )
        md.append("")
    (RESULTS / "dtype.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="*", choices=["matmul", "quality", "step", "qwen"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", action="store_true", help="an untimed step per variant first")
    ap.add_argument("--qwen-layers", type=int, default=None, help="reduced depth (derived)")
    ap.add_argument("--step-layers", type=int, default=None, help="SmolLM2's first N blocks")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    for part in args.parts:
        if part == "matmul":
            _save("matmul", part_matmul())
        elif part == "quality":
            _save_quality(part_quality(args.steps, args.max_seq_len, args.variants))
        elif part == "step":
            _save("step", part_step(args.tokens, args.reps, args.warmup, args.step_layers))
        elif part == "qwen":
            _save("qwen", part_qwen(args.qwen_layers))
    if args.report:
        report()


if __name__ == "__main__":
    main()
