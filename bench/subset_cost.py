"""Cost of the loss head: exact chunked CE vs the predicted subset (issue 21, target 3).

Times loss + dL/dh of one call of each head on a random 4-bit head (group 32, as models
ship) of a given shape, over N trainable rows with random targets:
  - chunked:       the exact vocabulary-chunked CE (the trainer's default);
  - subset-fresh:  --loss subset, predicted fill + tail, scoring pass every call
                   (--subset-refresh 1, today's default subset);
  - subset-cached: the same head between refreshes (--subset-refresh N > 1): cached ranking
                   and tail statistics, no pass over the vocabulary.
The variants are interleaved, repeat by repeat, in one process, so that a loaded machine
slows all of them alike and the ratios stay meaningful; the median of the repeats is kept.
The amortized cost of --subset-refresh N is (fresh + (N - 1) x cached) / N, from the medians.
Peak memory is mx.get_peak_memory above the inputs (independent of load).

    python bench/subset_cost.py --shapes gemma3-270m llama3.2-3b --rows 512 2048 --repeats 3
Writes bench/results/subset_cost.json and .md after every shape (partial results survive).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# isort: off
import mlx_edgelora  # noqa: F401  (first: it preloads OpenBLAS before mlx loads)
import mlx.core as mx

# isort: on
import numpy as np
from mlx import nn
from mlx_lm.models import llama

from mlx_edgelora import loss

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MB = 1024**2
SHAPES = {"gemma3-270m": (262144, 640), "llama3.2-3b": (128256, 3072), "smollm2": (49152, 576)}
VARIANTS = ["chunked", "subset-fresh", "subset-cached"]


class HeadCfg:
    """The loss-head options the heads read (TrainConfig's names)."""

    def __init__(self, k: int, refresh: int, vocab_chunk: int = 8192):
        self.subset_k, self.subset_refresh, self.vocab_chunk = k, refresh, vocab_chunk
        self.subset_fill, self.subset_tail = "predicted", True


def head_model(V: int, D: int, seed: int = 0) -> nn.Module:
    """A one-block Llama whose only part that matters here is its tied [V, D] head, 4-bit."""
    args = llama.ModelArgs(
        model_type="llama", hidden_size=D, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=max(1, D // 128), num_key_value_heads=1, rms_norm_eps=1e-5,
        vocab_size=V, tie_word_embeddings=True,
    )  # fmt: skip
    mx.random.seed(seed)
    model = llama.Model(args)
    emb = model.model.embed_tokens
    emb.weight = mx.random.normal(emb.weight.shape) * 0.02  # a real head's scale
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def heads(model: nn.Module, k: int) -> dict:
    """variant -> a callable x [N, D], targets -> summed CE (the LossHead's inner ce)."""
    fresh = loss.subset_loss(model, HeadCfg(k, 1))
    cached = loss.subset_loss(model, HeadCfg(k, 10**9))
    return {
        "chunked": lambda x, t: loss.chunked_ce(x, t, model, 8192),
        "subset-fresh": fresh,
        "subset-cached": cached,
    }


def measure(ce, x: mx.array, t: np.ndarray) -> tuple[float, float]:
    """(seconds, peak MB above the inputs) of one loss + dL/dx."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    value, grad = mx.value_and_grad(lambda x: ce(x, t))(x)
    mx.eval(value, grad)
    secs = time.perf_counter() - t0
    peak = (mx.get_peak_memory() - base) / MB
    del value, grad
    return secs, peak


def bench_shape(name: str, rows: list[int], k: int, repeats: int) -> list[dict]:
    V, D = SHAPES[name]
    model = head_model(V, D)
    rng = np.random.default_rng(0)
    out = []
    for n in rows:
        x = mx.array(rng.normal(size=(n, D)).astype(np.float32))
        t = rng.integers(0, V, n).astype(np.int32)
        mx.eval(x)
        fns = heads(model, k)
        fns["subset-cached"](x, t)  # prime the cache (its scoring pass is not timed)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        peaks: dict[str, float] = {}
        for r in range(repeats):  # interleaved: load hits every variant alike
            for v in VARIANTS:
                secs, peak = measure(fns[v], x, t)
                times[v].append(secs)
                peaks[v] = max(peaks.get(v, 0.0), peak)
                print(f"{name} N={n} rep {r}: {v} {secs:.2f} s, {peak:.0f} MB", file=sys.stderr)
        out.append(summarize(name, V, D, n, k, times, peaks))
    return out


def summarize(name, V, D, n, k, times, peaks) -> dict:
    med = {v: statistics.median(ts) for v, ts in times.items()}
    rec = {"shape": name, "V": V, "D": D, "rows": n, "k": k, "times_s": times}
    rec["median_s"] = {v: round(s, 3) for v, s in med.items()}
    rec["peak_mb"] = {v: round(p, 1) for v, p in peaks.items()}
    ratio = {v: round(med[v] / med["chunked"], 3) for v in VARIANTS}
    for refresh in (4, 8, 16):
        amortized = (med["subset-fresh"] + (refresh - 1) * med["subset-cached"]) / refresh
        ratio[f"subset-refresh-{refresh}"] = round(amortized / med["chunked"], 3)
    rec["time_vs_chunked"] = ratio
    return rec


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Loss head cost: exact chunked CE vs predicted subset (issue 21)",
        "",
        f"{result['note']}",
        "",
        "| shape (V, D) | rows | chunked s | subset fresh s (x) | subset cached s (x) "
        "| refresh 4 / 8 / 16 (x, amortized) | peak MB chunked / fresh / cached |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        m, x, p = r["median_s"], r["time_vs_chunked"], r["peak_mb"]
        lines.append(
            f"| {r['shape']} ({r['V']}, {r['D']}) | {r['rows']} | {m['chunked']:.2f} "
            f"| {m['subset-fresh']:.2f} ({x['subset-fresh']:.2f}) "
            f"| {m['subset-cached']:.3f} ({x['subset-cached']:.3f}) "
            f"| {x['subset-refresh-4']:.2f} / {x['subset-refresh-8']:.2f} / "
            f"{x['subset-refresh-16']:.2f} "
            f"| {p['chunked']:.0f} / {p['subset-fresh']:.0f} / {p['subset-cached']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["gemma3-270m", "llama3.2-3b"], choices=SHAPES)
    p.add_argument("--rows", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "subset_cost"))
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    result = {
        "note": (
            f"mlx {mx.__version__}, {platform.machine()} CPU ({os.cpu_count()} cores), load "
            f"average {load:.1f} at start: times are under load; ratios come from interleaved "
            f"repeats (median of {args.repeats}); k = {args.k}; random 4-bit head, random targets"
        ),
        "args": vars(args),
        "runs": [],
    }
    for name in args.shapes:
        result["runs"] += bench_shape(name, args.rows, args.k, args.repeats)
        write(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
