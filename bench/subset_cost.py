"""Cost of the loss head: exact chunked CE vs the predicted subset (issue 21, target 3).

Times loss + dL/dh of one call of each head on a random 4-bit head (group 32, as models
ship) of a given shape, over N trainable rows with random targets:
  - chunked:       the exact vocabulary-chunked CE (the trainer's default);
  - subset-fresh:  --loss subset, predicted fill + tail, scoring pass every call
                   (--subset-refresh 1, today's default subset);
  - subset-cached: the same head between refreshes (--subset-refresh N > 1): cached ranking
                   and tail statistics, no pass over the vocabulary;
  - sampled-cached: --subset-fill sampled between refreshes: cached ranking, k / 2 of the
                   k rows importance-sampled from the proposal over V (numpy, per call).
The variants are interleaved, repeat by repeat, in one process, so that a loaded machine
slows all of them alike and the ratios stay meaningful; the median of the repeats is kept.
The amortized cost of --subset-refresh N is (fresh + (N - 1) x cached) / N, from the medians
(the sampled fill's scoring calls are the predicted fill's, so its fresh call is subset-fresh).
Rows of other (shape, rows) cells already in --out are kept (each invocation adds its cells).
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
VARIANTS = ["chunked", "subset-fresh", "subset-cached", "sampled-cached"]


class HeadCfg:
    """The loss-head options the heads read (TrainConfig's names)."""

    def __init__(self, k: int, refresh: int, vocab_chunk: int = 8192, fill: str = "predicted"):
        self.subset_k, self.subset_refresh, self.vocab_chunk = k, refresh, vocab_chunk
        self.subset_fill, self.subset_tail, self.subset_samples, self.seed = fill, True, 0, 0


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
    sampled = loss.subset_loss(model, HeadCfg(k, 10**9, fill="sampled"))
    return {
        "chunked": lambda x, t: loss.chunked_ce(x, t, model, 8192),
        "subset-fresh": fresh,
        "subset-cached": cached,
        "sampled-cached": sampled,
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


def bench_shape(name: str, rows: list[int], k: int, repeats: int):
    V, D = SHAPES[name]
    model = head_model(V, D)
    rng = np.random.default_rng(0)
    for n in rows:
        x = mx.array(rng.normal(size=(n, D)).astype(np.float32))
        t = rng.integers(0, V, n).astype(np.int32)
        mx.eval(x)
        fns = heads(model, k)
        fns["subset-cached"](x, t)  # prime the caches (their scoring passes are not timed)
        fns["sampled-cached"](x, t)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        peaks: dict[str, float] = {}
        for r in range(repeats):  # interleaved: load hits every variant alike
            for v in VARIANTS:
                secs, peak = measure(fns[v], x, t)
                times[v].append(secs)
                peaks[v] = max(peaks.get(v, 0.0), peak)
                print(f"{name} N={n} rep {r}: {v} {secs:.2f} s, {peak:.0f} MB", file=sys.stderr)
        yield summarize(name, V, D, n, k, times, peaks)


def summarize(name, V, D, n, k, times, peaks) -> dict:
    med = {v: statistics.median(ts) for v, ts in times.items()}
    rec = {"shape": name, "V": V, "D": D, "rows": n, "k": k, "times_s": times}
    rec["loadavg"] = os.getloadavg()[0]
    rec["command"] = "python bench/subset_cost.py " + " ".join(sys.argv[1:])
    rec["repeats"] = len(times["chunked"])
    rec["median_s"] = {v: round(s, 3) for v, s in med.items()}
    rec["peak_mb"] = {v: round(p, 1) for v, p in peaks.items()}
    ratio = {v: round(med[v] / med["chunked"], 3) for v in med}
    for refresh in (4, 8, 16):
        for fill in ("subset", "sampled"):
            if f"{fill}-cached" not in med:
                continue
            amortized = (med["subset-fresh"] + (refresh - 1) * med[f"{fill}-cached"]) / refresh
            ratio[f"{fill}-refresh-{refresh}"] = round(amortized / med["chunked"], 3)
    rec["time_vs_chunked"] = ratio
    return rec


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Loss head cost: exact chunked CE vs subset heads (issue 21)",
        "",
        "Times are one loss + dL/dh on the shared 2-core CPU, under load (the load average of "
        "each cell is given); the variants of a cell ran interleaved in one process, so its "
        "ratios (x = time / chunked's) are what compares. Amortized = (fresh + (N-1) x "
        "cached) / N. Peak MB above the inputs (independent of load). Random 4-bit head "
        "(group 32), random targets.",
        "",
        "Commands (under `flock /work/wt/_brief/timing.lock`, not niced):",
        "",
        *sorted({f"    {r['command']}" for r in result["runs"] if "command" in r}),
        "",
        "| shape (V, D) | rows | k | load | chunked s | fresh s (x) | subset cached s (x) "
        "| sampled cached s (x) | subset refresh 4 / 8 (x) | sampled refresh 4 / 8 (x) "
        "| peak MB chunked / fresh / subset cached / sampled cached |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["runs"], key=lambda r: (r["shape"], r["rows"])):
        m, x, p = r["median_s"], r["time_vs_chunked"], r["peak_mb"]

        def cell(v, digits=3, m=m, x=x):
            return f"{m[v]:.{digits}f} ({x[v]:.{digits}f})" if v in m else "not measured"

        def amort(fill, x=x):
            keys = [f"{fill}-refresh-{n}" for n in (4, 8)]
            return " / ".join(f"{x[k]:.2f}" for k in keys) if keys[0] in x else "-"

        peaks = " / ".join(f"{p[v]:.0f}" if v in p else "-" for v in VARIANTS)
        load = r.get("loadavg")
        lines.append(
            f"| {r['shape']} ({r['V']}, {r['D']}) | {r['rows']} | {r['k']} "
            f"| {'' if load is None else f'{load:.1f}'} | {m['chunked']:.2f} "
            f"| {cell('subset-fresh', 2)} | {cell('subset-cached')} | {cell('sampled-cached')} "
            f"| {amort('subset')} | {amort('sampled')} | {peaks} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["gemma3-270m", "llama3.2-3b"], choices=SHAPES)
    p.add_argument("--rows", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--k", type=int, default=983)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "subset_cost"))
    args = p.parse_args(argv)
    out = Path(args.out)
    old = (
        json.loads(out.with_suffix(".json").read_text())
        if out.with_suffix(".json").is_file()
        else {}
    )
    result = {
        "note": f"mlx {mx.__version__}, {platform.machine()} CPU ({os.cpu_count()} cores)",
        "runs": old.get("runs", []),
    }
    for name in args.shapes:
        for rec in bench_shape(name, args.rows, args.k, args.repeats):
            key = (rec["shape"], rec["rows"])
            result["runs"] = [r for r in result["runs"] if (r["shape"], r["rows"]) != key]
            result["runs"].append(rec)
            write(result, out)
    return result


if __name__ == "__main__":
    main()
