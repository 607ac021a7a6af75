"""Step time of the thin recompute against the code before it, interleaved in one run.

Issue 17 item 3: the thinner recompute (fused LoRA VJP, token-chunked half-blocks) must not
cost much speed. Each variant is a source tree (`--before DIR`, `--after DIR`, default: this
checkout); each cell is one bench/cells.py child of that tree (SmolLM2-135M, the trainer's
defaults: segments, disk boundaries, half-blocks, chunked attention/MLP 256, streamed
weights, exact chunked CE, 30% trainable), run alternately so that load hits both alike.
Run it under the shared timing lock, not niced:

    flock /work/wt/_brief/timing.lock python bench/recompute_speed.py --before /tmp/old

Writes results/recompute_speed.{json,md}; every cell records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cells  # noqa: E402
import table1  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve().parent.parent


def run_child(root: Path, c: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "bench" / "cells.py"), "--child", json.dumps(c)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{root}: cell failed\n{p.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, default=HERE)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps per cell; the best is kept")
    p.add_argument("--name", default="recompute_speed", help="results/NAME.{json,md}")
    a = p.parse_args()
    rows = []
    for seq in a.seqs:
        c = cells.config(shape="smollm2", seq=seq, steps=a.steps, **table1.ROW_OPTS["exact"])
        for rep in range(a.reps):
            for label, root in (("before", a.before), ("after", a.after)):
                r = run_child(root, c)
                row = {"variant": label, "seq": seq, "rep": rep, "step_s": r["step_s"]}
                row.update(peak_gb=r["peak_gb"], loadavg=r["loadavg"])
                print(json.dumps(row), flush=True)
                rows.append(row)
                write(a.name, rows)  # after every cell: a run cut short keeps what it measured


def write(name: str, rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Thin recompute: SmolLM2 step time before/after (trainer defaults, one run, "
        "interleaved, under load)",
        "",
        "| seq | before s (best) | after s (best) | after / before | loadavg (1 min) |",
        "|---|---|---|---|---|",
    ]
    for seq in dict.fromkeys(r["seq"] for r in rows):
        times = {
            v: [r["step_s"] for r in rows if (r["seq"], r["variant"]) == (seq, v)]
            for v in ("before", "after")
        }
        if not all(times.values()):
            continue
        best = {v: min(t) for v, t in times.items()}
        loads = [r["loadavg"][0] for r in rows if r["seq"] == seq]
        lines.append(
            f"| {seq} | {best['before']} | {best['after']} | "
            f"{best['after'] / best['before']:.2f} | {min(loads)}-{max(loads)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
