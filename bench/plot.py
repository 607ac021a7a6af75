"""Peak memory vs context: our full-depth estimates (table1.json) against the paper's Table 1.

python bench/plot.py   # -> assets/memory_vs_context.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

ROOT = Path(__file__).parent.parent
NAMES = {"llama3b": "Llama-3.2-3B shape", "qwen3b": "Qwen2.5-3B shape"}


def main() -> None:
    results = json.loads((ROOT / "bench/results/table1.json").read_text())
    data = results["table"]
    rows = list(next(iter(data.values())))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8), sharey=True)
    for ax, (shape, entries) in zip(axes, data.items()):
        for i, entry in enumerate(entries.values()):
            color = f"C{i}"
            ctx = [int(c) for c in entry["contexts"]]
            paper = [
                (c, d["paper_gb"])
                for c, d in zip(ctx, entry["contexts"].values())
                if isinstance(d["paper_gb"], float)
            ]
            if paper:
                ax.plot(*zip(*paper), "--", color=color, alpha=0.6, lw=1.2)
            ours = [
                (c, d["full_depth_gb"])
                for c, d in zip(ctx, entry["contexts"].values())
                if d.get("full_depth_gb")
            ]
            if ours:
                ax.plot(*zip(*ours), "o-", color=color, lw=2)
        for check in results.get("full_depth_checks", []):
            if check["shape"] == shape:
                color = f"C{rows.index(check['row'])}"
                ax.plot(check["seq"], check["measured_full_depth_gb"], "*", ms=14, color=color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1024, 2048, 4096, 8192, 16384], ["1K", "2K", "4K", "8K", "16K"])
        ax.axhline(1.02, color="grey", lw=0.8, ls=":")
        ax.set_title(NAMES[shape])
        ax.set_xlabel("context (tokens), batch 1")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("peak memory, GB (log)")
    first = next(iter(data.values()))
    handles = [
        Line2D([], [], color=f"C{i}", lw=2, label=e["label"]) for i, e in enumerate(first.values())
    ]
    handles += [
        Line2D([], [], color="k", marker="o", lw=2, label="ours (full-depth estimate)"),
        Line2D([], [], color="k", ls="--", lw=1.2, label="paper Table 1"),
        Line2D([], [], color="k", marker="*", ms=12, lw=0, label="ours, measured at full depth"),
    ]
    # below the panels: inside either one it hides measured points
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(
        "Peak memory of one LoRA step: ours (solid, MLX CPU, full-depth estimate from "
        "2-block runs) vs paper Table 1 (dashed, A100)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    out = ROOT / "assets/memory_vs_context.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
