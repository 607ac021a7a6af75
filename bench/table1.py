"""The paper's Table 1, cumulative rows, on Llama-3.2-3B / Qwen2.5-3B shapes (issue 5).

Each cell is one forward+backward step in a fresh process (cells.py), batch 1, random
weights of the model's shape at REDUCED DEPTH (a 3B step at full depth takes many minutes on
this 2-core CPU). Every result carries the measured reduced-depth peak AND a derived
full-depth estimate:
- graph-engine rows (the first three): every block holds its activations (and, for the FP32
  baseline, its gradients) until the backward pass, so the peak grows per block by an
  amount we measure at 1, 2 and 4 blocks. Between 1 and 2 blocks the peak can still move
  between phases (the head's temporaries, the FP32 embedding gradient), so the slope comes
  from the two deepest cells that ran: per_block = [peak(4) - peak(2)] / 2 (else
  peak(2) - peak(1), flagged); full = peak(2) + (n-2) x per_block. Both slopes are reported, and
  INT4 graph cells that fit are also run at full depth (CHECKS).
- segment-engine rows: the peak holds one segment's recompute; more blocks only add what
  stays resident per block, which is counted exactly: frozen block weights (0 when streamed)
  + LoRA params and their gradients (+ the boundary when kept in RAM; on disk here). full =
  peak(2) + (n-2) x that.
Cells already measured are cached in results/table1_cells.jsonl (delete it to re-run);
`--report` only rebuilds table1.json / table1.md from that cache.

    python bench/table1.py                       # every cell not cached yet (a day on 2 cores)
    python bench/table1.py --only llama3b:1024   # one model:context
    python bench/table1.py --full-depth          # the CHECKS cells at full depth
    python bench/table1.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cells  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "table1_cells.jsonl"
CONTEXTS = [1024, 2048, 4096, 8192, 16384]
FULL_DEPTH = {"llama3b": 28, "qwen3b": 36}
NAMES = {"llama3b": "Llama-3.2-3B", "qwen3b": "Qwen2.5-3B"}

_CKPT = dict(bits=4, engine="segments", activations="disk")
_STREAM = dict(_CKPT, trainable=0.3, attn_chunk=256, mlp_chunk=256, stream_weights=True)
# (key, label, cell options, paper row); each row adds to the ones above it
ROWS = [
    ("fp32", "FP32 baseline (full fine-tune)", dict(full_ft=True), "FP32 baseline"),
    ("lora", "+ LoRA r=16", dict(), "+ LoRA"),
    ("int4", "+ INT4 quantization", dict(bits=4), "+ INT4 quantization"),
    ("ckpt", "+ checkpointing (segments, disk spill)", dict(_CKPT), "+ checkpointing"),
    ("subset", "+ subset softmax k=1000", dict(_CKPT, loss="subset"), "+ softmax approx."),
    (
        "mask",
        "+ logits masking (30% trainable)",
        dict(_CKPT, loss="subset", trainable=0.3),
        "+ logits masking",
    ),
    (
        "chunk",
        "+ chunked attention/MLP (ours)",
        dict(_CKPT, loss="subset", trainable=0.3, attn_chunk=256, mlp_chunk=256),
        None,
    ),
    ("stream", "+ weight streaming (ours)", dict(_STREAM, loss="subset"), None),
    (
        "split",
        "+ half-block checkpoint boundaries (ours)",
        dict(_STREAM, loss="subset", split_blocks=True),
        None,
    ),
    (
        "exact",
        "all on, exact chunked CE instead of subset (ours; the trainer's defaults)",
        dict(_STREAM, loss="chunked", split_blocks=True),
        None,
    ),
]
ROW_OPTS = {k: o for k, _, o, _ in ROWS}
ROW_OPTS_LABEL = {k: label for k, label, _, _ in ROWS}

PAPER = {  # paper.md, Table 1 (A100, batch 1, FP32 compute, LoRA r=16; GB)
    "llama3b": {
        "fp32": [27.60, 29.97, 47.96, None, None],
        "lora": [19.10, 26.20, 40.41, 68.83, None],
        "int4": [8.80, 14.68, 27.48, 53.07, None],
        "ckpt": [2.37, 3.33, 6.29, 12.21, 24.05],
        "subset": [1.30, 2.43, 5.41, 11.58, 23.79],
        "mask": [0.70, 1.02, 1.59, 3.24, 6.95],
    },
    "qwen3b": {
        "fp32": [27.11, 35.25, 57.87, None, None],
        "lora": [21.68, 30.51, 48.38, None, None],
        "int4": [11.21, 19.46, 36.03, 69.17, None],
        "ckpt": [2.06, 3.79, 7.29, 14.27, 28.24],
        "subset": [1.26, 3.03, 6.58, 13.79, 27.98],
        "mask": [0.66, 1.01, 1.71, 3.90, 8.34],
    },
}

# What runs, in priority order: every cell of both tables, our rows before the paper's at the
# long contexts; a cell whose estimate cannot fit is recorded as OOM without running.
GRAPH = ["fp32", "lora", "int4"]
DEEP = 4  # the graph rows' second slope point: far enough from the head to see the trend
SEGS = ["ckpt", "subset", "mask", "chunk", "stream", "split", "exact"]
OURS = ["exact", "split", "stream", "chunk"]
PLAN = (
    [(m, seq, GRAPH + SEGS) for seq in CONTEXTS[:2] for m in FULL_DEPTH]
    + [(m, seq, OURS) for seq in CONTEXTS[2:] for m in FULL_DEPTH]
    + [(m, seq, GRAPH + SEGS[:3]) for seq in CONTEXTS[2:] for m in FULL_DEPTH]
)
# Cells also run at FULL depth, to test the 2-block derivation against a real measurement.
CHECKS = [
    ("llama3b", 1024, "stream"),
    ("llama3b", 1024, "exact"),
    ("llama3b", 1024, "int4"),
    ("qwen3b", 1024, "int4"),
]


def cell_for(shape: str, seq: int, row: str, layers: int) -> dict:
    return cells.config(shape=shape, seq=seq, layers=layers, **ROW_OPTS[row])


def depths(row: str) -> list[int]:
    """Depth 2 first: when it cannot fit, the slope cells (1 and DEEP blocks) are skipped."""
    return [2, 1, DEEP] if row in GRAPH else [2]


def load_cache() -> dict:
    out = {}
    if CACHE.exists():
        for line in CACHE.read_text().splitlines():
            r = json.loads(line)
            if r["status"] == "error":  # a crash is a bug to fix, not a result: run it again
                continue
            # cells cached before a key existed ran with what is now that key's default,
            # except subset_fill: they used the (memory-equivalent) neighbour stand-in
            old_fill = "neighbours" if r["config"]["loss"] == "subset" else "predicted"
            r["config"] = cells.config(**{"subset_fill": old_fill, **r["config"]})
            out[json.dumps(r["config"], sort_keys=True)] = r
    return out


def run_plan(plan, timeout: int, full_depth: bool = False) -> None:
    """Run the plan's cells not cached yet; `full_depth` runs them at the model's depth."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = load_cache()
    for shape, seq, rows in plan:
        for row in rows:
            for n in [FULL_DEPTH[shape]] if full_depth else depths(row):
                c = cell_for(shape, seq, row, n)
                if json.dumps(c, sort_keys=True) in done:
                    continue
                deeper = done.get(json.dumps(cell_for(shape, seq, row, 2), sort_keys=True))
                if n != 2 and deeper is not None and deeper["status"] == "oom":
                    continue
                r = cells.run_cell(c, timeout=timeout)
                r["row"] = row
                with CACHE.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                done[json.dumps(c, sort_keys=True)] = r
                print(
                    f"{shape} {seq} {row} depth {n}: {r['status']} "
                    f"peak {r.get('peak_gb')} GB step {r.get('step_s')} s",
                    flush=True,
                )


def depth_checks(cache: dict) -> list[dict]:
    """Every cached full-depth cell next to the figure derived from its 2-block cell."""
    out = []
    for shape, seq, row in {
        (r["config"]["shape"], r["config"]["seq"], r["row"]) for r in cache.values() if r.get("row")
    }:
        n = FULL_DEPTH[shape]
        full = cache.get(json.dumps(cell_for(shape, seq, row, n), sort_keys=True))
        if full is None or full["status"] != "ok":
            continue
        d = derive(shape, seq, row, cache)
        out.append(
            {
                "shape": shape,
                "seq": seq,
                "row": row,
                "layers": n,
                "measured_full_depth_gb": full["peak_gb"],
                "step_s_full_depth": full["step_s"],
                "derived_from_depth2_gb": d.get("full_depth_gb"),
            }
        )
    return sorted(out, key=lambda x: (x["shape"], x["seq"], x["row"]))


def derive(shape: str, seq: int, row: str, cache: dict) -> dict:
    """Measured depth-2 peak and the derived full-depth estimate (or why there is none)."""
    n_full = FULL_DEPTH[shape]
    r2 = cache.get(json.dumps(cell_for(shape, seq, row, 2), sort_keys=True))
    r1 = cache.get(json.dumps(cell_for(shape, seq, row, 1), sort_keys=True))
    if r2 is None and r1 is not None and r1["status"] == "ok":
        return {
            "status": "depth 1 only",
            "measured_gb_depth1": r1["peak_gb"],
            "step_s_depth1": r1["step_s"],
            "loadavg": r1["loadavg"],
        }
    if r2 is None:
        return {"status": "not run"}
    if r2["status"] != "ok":
        return {
            "status": r2["status"],
            "note": r2.get("note", ""),
            "estimate_gb": r2.get("estimate_gb"),
        }
    out = {
        "status": "ok",
        "measured_gb_depth2": r2["peak_gb"],
        "step_s_depth2": r2["step_s"],
        "resident_gb_depth2": r2["resident_gb"],
        "loadavg": r2["loadavg"],
    }
    if row in GRAPH:
        r4 = cache.get(json.dumps(cell_for(shape, seq, row, DEEP), sort_keys=True))
        ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
        if ok(r1):
            out["measured_gb_depth1"] = r1["peak_gb"]
            out["slope_1_2_gb"] = round((r2["peak_bytes"] - r1["peak_bytes"]) / cells.GB, 4)
        if ok(r4):
            per = (r4["peak_bytes"] - r2["peak_bytes"]) / (DEEP - 2)
            out[f"measured_gb_depth{DEEP}"] = r4["peak_gb"]
            out[f"slope_2_{DEEP}_gb"] = round(per / cells.GB, 4)
            out["derivation"] = (
                f"peak(2) + {n_full - 2} x [peak({DEEP}) - peak(2)] / {DEEP - 2} (measured slope)"
            )
        elif ok(r1):
            per = r2["peak_bytes"] - r1["peak_bytes"]
            out["derivation"] = (
                f"peak(2) + {n_full - 2} x [peak(2) - peak(1)] (measured slope; "
                "no depth-4 cell, so the peak may still be moving between phases)"
            )
        else:
            out["full_depth_gb"] = None
            out["derivation"] = "no depth-1 or depth-4 cell: no per-block slope"
            return out
    else:
        pl = r2["per_layer_bytes"]
        per = pl["frozen"] + pl["trainable_and_grads"]
        out["derivation"] = (
            f"peak(2) + {n_full - 2} x resident bytes per block "
            "(frozen weights, 0 if streamed, + LoRA params and grads)"
        )
    out["per_block_gb"] = round(per / cells.GB, 4)
    out["full_depth_gb"] = round((r2["peak_bytes"] + (n_full - 2) * per) / cells.GB, 3)
    return out


def _bound_fp32_by_lora(rows: dict) -> None:
    """FP32's figure is at least LoRA's: it keeps every activation LoRA keeps, plus gradients.

    At 1-4 blocks the FP32 peak can sit at the end of the backward (all gradients, the
    embedding's included) and grow slower per block than the activations do; deeper, the
    activations take over, so its own slope understates the full depth (a peak that is the
    largest of several linearly growing phases only steepens with depth).
    """
    for seq, d in rows["fp32"]["contexts"].items():
        lora = rows["lora"]["contexts"][seq]
        own, bound = d.get("full_depth_gb"), lora.get("full_depth_gb")
        if own and bound and bound > own:
            d["full_depth_own_slope_gb"] = own
            d["full_depth_gb"] = bound
            d["derivation"] += "; raised to the LoRA row's full-depth figure (a lower bound)"
            d["lower_bound"] = True


def report() -> dict:
    cache = load_cache()
    table = {}
    for shape in FULL_DEPTH:
        table[shape] = {}
        for key, label, _, paper_row in ROWS:
            entry = {"label": label, "paper_row": paper_row, "contexts": {}}
            for i, seq in enumerate(CONTEXTS):
                d = derive(shape, seq, key, cache)
                paper = PAPER[shape].get(key)
                d["paper_gb"] = (paper[i] if paper[i] is not None else "OOM") if paper else None
                entry["contexts"][str(seq)] = d
            table[shape][key] = entry
        _bound_fp32_by_lora(table[shape])
    meta = {
        "what": "peak memory of one forward+backward step, batch 1, no optimizer update",
        "machine": "Linux, 2 CPU cores (shared), 24 GB RAM, MLX CPU backend + OpenBLAS",
        "depth": "cells run at 2 blocks (graph rows also at 1 and 4: the slope); see derivation",
        "weights": "random, model shape from paper.md; INT4 = nn.quantize(group 64, 4 bits), "
        "float32 scales; embedding/LM head (tied) quantized too",
        "subset": "k=1000, --subset-fill predicted (our default: the targets plus the "
        "tokens the model expects most, found by two no-gradient passes over the head)",
        "masking": "first 70% of positions are prompt (no loss); rows above use 100%",
    }
    checks = depth_checks(cache)
    out = {"meta": meta, "table": table, "full_depth_checks": checks}
    (RESULTS / "table1.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "table1.md").write_text(markdown(table, checks))
    sync_readme(table)
    return out


def _fmt(d: dict) -> str:
    if d["status"] == "ok":
        full = d.get("full_depth_gb")
        if not full:
            return f"{d['measured_gb_depth2']:.2f} → ?"
        shallow = "slope_1_2_gb" in d and f"slope_2_{DEEP}_gb" not in d  # see SHALLOW
        bound = "≥ " if d.get("lower_bound") else ""
        return f"{d['measured_gb_depth2']:.2f} → {bound}{full:.2f}{'†' if shallow else ''}"
    if d["status"] == "oom":
        return f"OOM here at 2 blocks (est. {d['estimate_gb']:.0f} GB > {cells.MAX_GB:.0f})"
    if d["status"] == "depth 1 only":
        return f"{d['measured_gb_depth1']:.2f} at 1 block → ?"
    return d["status"]


BOUND = (
    "≥: an FP32 figure raised to the LoRA row's (it keeps every activation LoRA keeps, plus "
    "gradients; its own 1-4 block slope is set by the end of the backward and understates)."
)
SHALLOW = (
    "† graph row whose slope comes from 1 → 2 blocks only (no 4-block cell): the peak may "
    "still be moving between phases there, so read it as ±15%."
)


def slopes(table: dict) -> list[str]:
    """The graph rows' per-block slopes, 1→2 and 2→DEEP blocks: linear where they agree."""
    lines = [
        "### Graph rows: the per-block slope (GB per block)",
        "",
        f"| model | row | context | 1 → 2 blocks | 2 → {DEEP} blocks |",
        "|---|---|---|---|---|",
    ]
    for shape, rows in table.items():
        for key in GRAPH:
            for seq, d in rows[key]["contexts"].items():
                a, b = d.get("slope_1_2_gb"), d.get(f"slope_2_{DEEP}_gb")
                if a is not None or b is not None:
                    lines.append(
                        f"| {NAMES[shape]} | {rows[key]['label']} | {seq} | "
                        f"{'–' if a is None else f'{a:.3f}'} | {'–' if b is None else f'{b:.3f}'} |"
                    )
    return lines + [""]


def markdown(table: dict, checks: list[dict]) -> str:
    lines = [
        "Peak memory, GB, of one forward+backward step (batch 1). Each cell: **measured at 2 "
        "blocks → derived full depth** (see bench/table1.py for the derivation); paper = "
        "Table 1 (A100, full depth). Random weights of the model's shape; MLX CPU backend.",
        "",
    ]
    for shape, rows in table.items():
        lines += [
            f"### {NAMES[shape]} ({FULL_DEPTH[shape]} blocks)",
            "",
            "| row | " + " | ".join(str(c) for c in CONTEXTS) + " |",
            "|---|" + "---|" * len(CONTEXTS),
        ]
        for entry in rows.values():
            cellstr = []
            for seq in CONTEXTS:
                d = entry["contexts"][str(seq)]
                paper = d["paper_gb"]
                s = _fmt(d)
                if paper is not None:
                    s += f" (paper {paper})"
                cellstr.append(s)
            lines.append(f"| {entry['label']} | " + " | ".join(cellstr) + " |")
        lines.append("")
    if any(
        "†" in _fmt(d)
        for rows in table.values()
        for e in rows.values()
        for d in e["contexts"].values()
    ):
        lines += [SHALLOW, ""]
    if any(
        d.get("lower_bound") for rows in table.values() for d in rows["fp32"]["contexts"].values()
    ):
        lines += [BOUND, ""]
    lines += slopes(table)
    if checks:
        lines += [
            "### The derivation, checked: cells also run at full depth",
            "",
            "| model | context | row | measured at full depth | derived from 2 blocks | step s |",
            "|---|---|---|---|---|---|",
        ]
        for c in checks:
            derived = c["derived_from_depth2_gb"]
            lines.append(
                f"| {NAMES[c['shape']]} ({c['layers']} blocks) | {c['seq']} | "
                f"{ROW_OPTS_LABEL[c['row']]} | {c['measured_full_depth_gb']:.3f} GB | "
                f"{'?' if derived is None else f'{derived:.3f} GB'} | "
                f"{c['step_s_full_depth']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


README = Path(__file__).parent.parent / "README.md"
README_START, README_END = "<!-- table1:start -->", "<!-- table1:end -->"
OURS_BOLD = {"split", "exact"}  # our headline rows: their full-depth figure in bold


def _readme_cell(key: str, d: dict) -> str:
    """Compact: '2 blocks → full depth (paper)'; OOM from the estimate; – not run."""
    paper = "" if d["paper_gb"] is None else f" ({d['paper_gb']})"
    if d["status"] == "ok" and d.get("full_depth_gb"):
        full = f"{d['full_depth_gb']:.2f}"
        full = f"**{full}**" if key in OURS_BOLD else full
        full = f"≥ {full}" if d.get("lower_bound") else full
        mark = "†" if _fmt(d).endswith("†") else ""
        return f"{d['measured_gb_depth2']:.2f} → {full}{mark}{paper}"
    return ("OOM" if d["status"] == "oom" else "–") + paper


def readme_tables(table: dict) -> str:
    """The README's Table 1 block, rebuilt from the same results as table1.md."""
    lines = []
    for shape, rows in table.items():
        lines += [
            f"{NAMES[shape]} shape ({FULL_DEPTH[shape]} blocks), GB, "
            '"2 blocks → full depth (paper)":',
            "",
            "| row (cumulative) | " + " | ".join(str(c) for c in CONTEXTS) + " |",
            "|---|" + "---|" * len(CONTEXTS),
        ]
        for key, entry in rows.items():
            cells_ = [_readme_cell(key, entry["contexts"][str(c)]) for c in CONTEXTS]
            lines.append(f"| {entry['label']} | " + " | ".join(cells_) + " |")
        lines.append("")
    lines.append(
        f"OOM = the 2-block cell's up-front estimate is above this machine's {cells.MAX_GB:.0f} "
        "GB guard, so it was not run; – = not run. " + SHALLOW + " " + BOUND
    )
    return "\n".join(lines)


def sync_readme(table: dict) -> None:
    """Replace the README's block between the table1 markers (nothing else is touched)."""
    text = README.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: the {README_START} / {README_END} markers are missing")
    head = text[: start + len(README_START)]
    README.write_text(head + "\n" + readme_tables(table) + "\n" + text[end:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", action="store_true", help="only rebuild table1.json/.md")
    p.add_argument("--only", help="model:context, e.g. llama3b:1024")
    p.add_argument("--cells", nargs="+", help="model:context:row[,row...] items, run in order")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument(
        "--full-depth", action="store_true", help="run the chosen cells at full depth (CHECKS)"
    )
    a = p.parse_args()
    if not a.report:
        plan = PLAN
        if a.only:
            shape, seq = a.only.split(":")
            plan = [(s, q, r) for s, q, r in PLAN if s == shape and q == int(seq)]
        if a.cells:
            plan = [
                (m, int(q), rows.split(",")) for m, q, rows in (item.split(":") for item in a.cells)
            ]
        if a.full_depth and not a.cells:
            plan = [(s, q, [r]) for s, q, r in CHECKS]
        run_plan(plan, a.timeout, a.full_depth)
    report()


if __name__ == "__main__":
    main()
