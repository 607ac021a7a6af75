"""Subset softmax (paper technique 3) vs the exact loss: gradient fidelity, quality, memory.

Issue 4's benchmark, not a test. Fine-tunes the embedded SmolLM2-135M (Q4_1) on the bundled
prompt/completion set (assets/sample_chat.jsonl, deterministic by-document split) for a fixed
number of steps with --loss full, chunked and subset (k = 256, 1000, 4000): same seed, same
data order, a freshly loaded model per run, through the public API. For each loss it reports
  - grad_cos: cosine similarity of dL/dh (h = the last block's output, the loss head's input)
    with the exact (full) one, on the held-out batches at the initial model and after training;
  - val_exact: the held-out *exact* loss after training (the trainer validates with the exact
    chunked loss whatever --loss trains with);
  - head_peak_mb: peak memory of the loss head alone (loss + dL/dh over --head-rows rows of
    real targets), above its inputs.
The subset loss needs the SmolLM2 neighbour table (one-time, ~4 min exact on this CPU): it is
built (or read from the cache) once, before the runs, and its cost is reported.

    python bench/subset_quality.py            # ~15 min on a 2-core CPU
Writes bench/results/subset_quality.json and .md. Run heavy jobs under
`flock /tmp/edgelora-bench.lock` on the shared machine.
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
from types import SimpleNamespace

import mlx_edgelora  # noqa: F401,I001  (must precede mlx)
from mlx_edgelora import TrainConfig, load_dataset, load_model, train

import mlx.core as mx
import numpy as np

from mlx_edgelora import attention, blocks, loss, neighbours, quant
from mlx_edgelora.batching import iter_eval_batches, make_batch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "assets" / "sample_chat.jsonl"
RESULTS = ROOT / "bench" / "results"
MB = 1024**2


def run_specs(ks: list[int]) -> list[tuple[str, str, int]]:
    """(name, --loss, subset_k) of every run; the exact full loss first (the reference)."""
    return [("full", "full", 0), ("chunked", "chunked", 0)] + [
        (f"subset-{k}", "subset", k) for k in ks
    ]


def fresh_model():
    """The embedded SmolLM2, prepared as the trainer prepares it (no LoRA: B = 0 at init)."""
    loaded = load_model(None)
    quant.prepare_for_training(loaded.model)
    return loaded


def last_hidden(model, batch) -> mx.array:
    """The last block's output [B, L, D] (the loss head's input), evaluated block by block."""
    h = blocks.embed(model, mx.array(batch.inputs))
    for layer in blocks.layers(model):
        h = attention.block_forward(layer, h, 512, 256)
        mx.eval(h)
    return h


def hidden_grads(model, head, hs, batches) -> list[np.ndarray]:
    """dL/dh of `head` for each (h, batch), as flat float64 vectors."""
    out = []
    for h, batch in zip(hs, batches):
        g = mx.grad(lambda h: head(h, batch))(h)
        mx.eval(g)
        out.append(np.array(g, dtype=np.float64).ravel())
    return out


def grad_cosines(model, cfg, batches, kinds: dict) -> dict[str, float]:
    """Cosine of each head's dL/dh with the full loss's, over all batches' gradients."""
    hs = [last_hidden(model, b) for b in batches]
    ref = np.concatenate(hidden_grads(model, loss.make_loss_head(model, "full", cfg), hs, batches))
    out = {}
    for name, (kind, k) in kinds.items():
        head = loss.make_loss_head(model, kind, SimpleNamespace(vocab_chunk=cfg.vocab_chunk, subset_k=k))
        g = np.concatenate(hidden_grads(model, head, hs, batches))
        out[name] = float(g @ ref / (np.linalg.norm(g) * np.linalg.norm(ref)))
    return out


def head_peak_mb(head, D: int, targets: np.ndarray) -> float:
    """Peak MB of loss + dL/dh over len(targets) rows, above what was allocated before."""
    rng = np.random.default_rng(0)
    n = len(targets)
    h = mx.array(rng.normal(size=(1, n, D)).astype(np.float32))
    batch = SimpleNamespace(targets=targets[None, :], mask=np.ones((1, n), bool))
    mx.eval(h)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    value, grad = mx.value_and_grad(lambda h: head(h, batch))(h)
    mx.eval(value, grad)
    peak = (mx.get_peak_memory() - base) / MB
    del value, grad
    return peak


def head_peaks(cfg, specs, targets: np.ndarray) -> dict[str, float]:
    model = fresh_model().model
    D = loss.head_shape(model)[1]
    out = {}
    for name, kind, k in specs:
        head = loss.make_loss_head(model, kind, SimpleNamespace(vocab_chunk=cfg.vocab_chunk, subset_k=k))
        out[name] = round(head_peak_mb(head, D, targets), 1)
        print(f"loss head peak {name}: {out[name]} MB", file=sys.stderr)
    return out


def neighbour_table_once() -> dict:
    """Build (or read) SmolLM2's neighbour table once, timed, so no run pays it silently."""
    model = fresh_model().model
    V, _ = loss.head_shape(model)
    path = neighbours.cache_root() / f"{neighbours.head_fingerprint(model)}"
    cached = any(path.parent.glob(f"{path.name}-*-n{neighbours.DEFAULT_NEIGHBOURS}.npy"))
    print(f"neighbour table: {'reading cache' if cached else 'building once (~4 min)'} "
          f"under {neighbours.cache_root()}", file=sys.stderr)
    t0, c0 = time.perf_counter(), time.process_time()
    neighbours.neighbour_table(model)
    return {"cached_before": cached, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1), "cache_dir": str(neighbours.cache_root()),
            "method": "exact" if V * V * loss.head_shape(model)[1] <= neighbours.EXACT_MAX_MACS else "approx"}


def real_targets(data, n: int) -> np.ndarray:
    """n trainable target tokens from the training rows (repeated if needed): real frequencies."""
    t = np.concatenate([tok[1:][m[1:]] for tok, m in data.train_rows]).astype(np.int32)
    return np.resize(t, n)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ks", type=int, nargs="+", default=[256, 1000, 4000])
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--head-rows", type=int, default=2048)
    p.add_argument("--out", default=str(RESULTS / "subset_quality"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    specs = run_specs(args.ks)
    base = dict(data=str(DATA), steps=args.steps, max_seq_len=args.max_seq_len, lr=args.lr,
                warmup=max(1, args.steps // 10), val_fraction=args.val_fraction, seed=0,
                eval_every=0, eval_batches=-1, save_every=0, activations="ram", overwrite=True)
    cfg0 = TrainConfig(**base)
    data = load_dataset(str(DATA), load_model(None).tokenizer, cfg0)  # one split, one order
    val_batches = list(iter_eval_batches(data.val_rows, 1, None))
    table = neighbour_table_once()
    peaks = head_peaks(cfg0, specs, real_targets(data, args.head_rows))

    model = fresh_model().model
    kinds = {name: (kind, k) for name, kind, k in specs}
    cos0 = grad_cosines(model, cfg0, val_batches, kinds)
    del model
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, k in specs:
            cfg = TrainConfig(**base, loss=kind, subset_k=k or 1000, out=f"{tmp}/{name}")
            loaded = fresh_model()  # train() applies LoRA to this model in place
            t0 = time.perf_counter()
            res = train(cfg, loaded=loaded, data=data)
            wall = time.perf_counter() - t0
            cos1 = grad_cosines(loaded.model, cfg0, val_batches, {name: (kind, k)})[name]
            runs[name] = {"loss": kind, "subset_k": k or None, "val_exact": res.val_loss,
                          "train_loss_last": res.history[-1]["loss"], "grad_cos_init": cos0[name],
                          "grad_cos_trained": cos1, "head_peak_mb": peaks[name],
                          "train_wall_s": round(wall, 1), "step_s": round(wall / args.steps, 2)}
            print(f"{name}: {runs[name]}", file=sys.stderr)
            del loaded
            gc.collect()
    ref = runs["full"]["val_exact"]
    for r in runs.values():
        r["val_exact_rel"] = r["val_exact"] / ref - 1
    result = {"runs": runs, "neighbour_table": table, "settings": vars(args) | {
        "data": str(DATA.relative_to(ROOT)), "train_rows": len(data.train_rows),
        "val_rows": len(data.val_rows), "train_tokens": data.trainable_tokens("train"),
        "val_tokens": data.trainable_tokens("val"), "vocab_chunk": cfg0.vocab_chunk},
        "loadavg_end": os.getloadavg(), "wall_s": round(time.perf_counter() - t_start, 1),
        "mlx": mx.__version__, "device": str(mx.default_device())}
    write(result, Path(args.out))
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    s, t = result["settings"], result["neighbour_table"]
    lines = [
        "# Subset softmax vs exact loss (SmolLM2-135M Q4_1, bench/subset_quality.py)", "",
        f"{s['steps']} steps, seq {s['max_seq_len']}, lr {s['lr']}, {s['train_rows']} train / "
        f"{s['val_rows']} held-out rows ({s['val_tokens']} held-out trainable tokens); "
        f"loss-head peak over {s['head_rows']} rows of real targets; load average at end "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_end'])}; total {result['wall_s']} s.",
        f"Neighbour table ({t['method']}): {'read from cache' if t['cached_before'] else 'built'} "
        f"once before the runs in {t['wall_s']} s wall ({t['cpu_s']} CPU-s), then cached.", "",
        "| loss | grad cos (init) | grad cos (trained) | held-out exact loss | vs full | "
        "loss-head peak MB | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"| {name} | {r['grad_cos_init']:.4f} | {r['grad_cos_trained']:.4f} | "
            f"{r['val_exact']:.4f} | {100 * r['val_exact_rel']:+.2f}% | {r['head_peak_mb']} | "
            f"{r['step_s']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
