"""Whole SmolLM2 training step: exact chunked CE vs subset loss heads (issue 21, target 3).

Why: the loss-head benchmark (subset_cost.py) times the head alone; what a user feels is the
whole step (forward, backward through every block, the head, the AdamW update). Each variant
trains SmolLM2-135M (Q4_1, embedded) through the public `train()` for --steps optimizer steps
on the pydoc corpus at --max-seq-len tokens, batch 1, same seed and data order; the variants
are interleaved round by round in one process, so that load hits them alike. A step's time is
the difference of the reporter's elapsed_s; step 1 (warm-up, and every subset's first scoring
pass) is dropped, so with --steps 5 and --subset-refresh 4 the four timed steps hold exactly
one scoring pass (the amortized cost). Run under the timing lock, not niced:

    flock /work/wt/_brief/timing.lock python bench/subset_step.py --rounds 2
Writes bench/results/subset_step.{json,md} after every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

# isort: off
import mlx_edgelora  # noqa: F401  (first: it preloads OpenBLAS before mlx loads)
import mlx.core as mx

# isort: on
from mlx_edgelora import TrainConfig, load_dataset, load_model, train

sys.path.insert(0, str(Path(__file__).parent))
from subset_quality import corpus_path, fresh_model, variant_cfg  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["chunked", "subset-983-r4", "sampled-983-r4"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--engine", default="graph")
    p.add_argument("--out", default=str(RESULTS / "subset_step"))
    args = p.parse_args(argv)
    result = {"settings": vars(args), "mlx": mx.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(
            data=corpus_path("pydoc", tmp), steps=args.steps, max_seq_len=args.max_seq_len,
            val_fraction=0.0, eval_every=0, save_every=0, overwrite=True, seed=0,
            engine=args.engine, stream_weights=args.engine == "segments", out=f"{tmp}/r",
        )  # fmt: skip
        data = load_dataset(base["data"], load_model(None).tokenizer, TrainConfig(**base))
        for r in range(args.rounds):
            for variant in args.variants:
                load = os.getloadavg()[0]
                res = train(
                    TrainConfig(**base, **variant_cfg(variant)), loaded=fresh_model(), data=data
                )
                el = [h["elapsed_s"] for h in res.history if "loss" in h]
                steps = [b - a for a, b in zip(el, el[1:])]  # steps 2..N
                tokens = sum(h["tokens"] for h in res.history if "loss" in h and h["step"] > 1)
                mean = sum(steps) / len(steps)
                result["runs"].append(
                    {"variant": variant, "round": r, "step_s": steps, "mean_step_s": mean,
                     "tokens": tokens, "loadavg_start": load, "loadavg_end": os.getloadavg()[0],
                     "peak_gb": res.peak_gb}
                )  # fmt: skip
                print(f"round {r} {variant}: {result['runs'][-1]}", file=sys.stderr)
                gc.collect()
                write(result, Path(args.out))
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    s = result["settings"]
    runs = result["runs"]
    loads = [r["loadavg_start"] for r in runs] + [r["loadavg_end"] for r in runs]
    lines = [
        "# Whole SmolLM2 step: exact chunked CE vs subset heads (bench/subset_step.py)",
        "",
        f"SmolLM2-135M Q4_1, pydoc corpus, seq {s['max_seq_len']}, batch 1, --engine "
        f"{s['engine']}; steps 2..{s['steps']} of each run timed (step 1 dropped); variants "
        f"interleaved over {s['rounds']} rounds in one process under the timing lock. UNDER "
        f"LOAD: load average {min(loads):.1f}-{max(loads):.1f}; compare the ratios.",
        "",
        "| variant | mean step s (per round) | x chunked | peak GB |",
        "|---|---|---|---|",
    ]
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    ref = by.get("chunked")
    for v, rs in by.items():
        per_tok = [r["mean_step_s"] for r in rs]
        ratio = ""
        if ref:
            n = min(len(rs), len(ref))
            ratios = [rs[i]["mean_step_s"] / ref[i]["mean_step_s"] for i in range(n)]
            ratio = (
                f"{statistics.median(ratios):.2f} (rounds: "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + ")"
            )
        lines.append(
            f"| {v} | {' / '.join(f'{x:.2f}' for x in per_tok)} | {ratio} "
            f"| {max(r['peak_gb'] for r in rs):.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
