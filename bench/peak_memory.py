"""Peak memory of --engine graph vs --engine segments (RAM and disk boundaries), issue 3.

The real embedded SmolLM2-135M-Instruct Q4_1 GGUF (`load_model(None)`), all 30 blocks, LoRA
r=16 on the 7 projections, batch 1, every token trainable (plain-text data), trainer defaults
otherwise (exact chunked loss, attention chunk 512, MLP chunk 256 in the segment recompute).
Each configuration is one fresh process (cells.py). Targets: segments >= 5x below graph at
2048 tokens; disk spill <= 10% slower than RAM.

    python bench/peak_memory.py            # -> results/peak_memory.json, results/peak_memory.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cells  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ENGINES = [
    ("graph", dict(engine="graph")),
    ("segments, RAM", dict(engine="segments", activations="ram")),
    ("segments, disk", dict(engine="segments", activations="disk")),
]
COMMON = dict(shape="smollm2", loss="chunked", attn_chunk=512, mlp_chunk=256)


def run(contexts: list[int], steps: int, timeout: int) -> list[dict]:
    rows = []
    for seq in contexts:
        for label, opts in ENGINES:
            c = cells.config(seq=seq, steps=steps, **COMMON, **opts)
            r = cells.run_cell(c, timeout=timeout)
            r["label"] = label
            rows.append(r)
            print(
                f"{seq} {label}: {r['status']} peak {r.get('peak_gb')} GB "
                f"step {r.get('step_times_s')} s",
                flush=True,
            )
    return rows


def summarize(rows: list[dict]) -> dict:
    by = {(r["config"]["seq"], r["label"]): r for r in rows if r["status"] == "ok"}
    out = {}
    for seq in sorted({r["config"]["seq"] for r in rows}):
        g, ram, disk = (by.get((seq, k)) for k, _ in ENGINES)
        s = {}
        if g and ram:
            s["graph_over_segments_ram"] = round(g["peak_bytes"] / ram["peak_bytes"], 2)
        if g and disk:
            s["graph_over_segments_disk"] = round(g["peak_bytes"] / disk["peak_bytes"], 2)
        if ram and disk:
            s["disk_time_over_ram"] = round(disk["step_s"] / ram["step_s"], 3)
        out[str(seq)] = s
    return out


def markdown(rows: list[dict], summary: dict) -> str:
    lines = [
        "| tokens | engine | peak GB | resident GB | step s (fastest) | load avg |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['config']['seq']} | {r['label']} | {r['status']} | | | |")
            continue
        lines.append(
            f"| {r['config']['seq']} | {r['label']} | {r['peak_gb']:.3f} | "
            f"{r['resident_gb']:.3f} | {r['step_s']:.1f} | {r['loadavg'][0]:.1f} |"
        )
    lines.append("")
    for seq, s in summary.items():
        parts = [f"{k.replace('_', ' ')} = {v}" for k, v in s.items()]
        lines.append(f"- {seq} tokens: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 512])
    p.add_argument("--steps", type=int, default=2, help="steps per cell (time = fastest)")
    p.add_argument("--timeout", type=int, default=1800)
    a = p.parse_args()
    rows = run(a.contexts, a.steps, a.timeout)
    old = RESULTS / "peak_memory.json"
    if old.exists():  # keep cells of other contexts from earlier runs
        rows = [
            r for r in json.loads(old.read_text())["cells"] if r["config"]["seq"] not in a.contexts
        ] + rows
    summary = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "SmolLM2-135M-Instruct Q4_1 (embedded GGUF), 30 blocks, LoRA r=16",
        "machine": "Linux, 2 CPU cores (shared), 24 GB RAM, MLX CPU backend + OpenBLAS",
        "measure": "mx.get_peak_memory() over the steps, reset after the model is built",
    }
    (RESULTS / "peak_memory.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "cells": rows}, indent=1)
    )
    (RESULTS / "peak_memory.md").write_text(markdown(rows, summary))
    print(markdown(rows, summary))


if __name__ == "__main__":
    main()
