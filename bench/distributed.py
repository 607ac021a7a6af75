"""Two data-parallel ranks on this machine vs one process: correctness and per-rank peak.

The real embedded SmolLM2-135M-Instruct Q4_1 model, the bundled sample notes, trainer
defaults (segment engine, spilled boundaries, streamed weights), LoRA r=16, 256 tokens per
sequence. Three runs from the same seed, each in fresh processes:
  - 2 ranks x --batch-size 1 (mlx.launch --backend ring on 127.0.0.1),
  - 1 process x --batch-size 1 x --grad-accum 2 (the same rows and the same sums),
  - 1 process x --batch-size 2.
It records the largest adapter difference, the training and validation losses, and each
rank's (and process's) MLX peak memory. The two ranks share this machine's 2 CPU cores, so
no speed figure is recorded: local ranks say nothing about two Macs on a network.

    python bench/distributed.py          # -> results/distributed.json, results/distributed.md
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(steps=4, max_seq_len=256, eval_every=0, eval_batches=-1, save_every=0, seed=0)


def worker(spec: dict) -> None:
    """One rank (or a plain process): train, then write this rank's peak to its own file."""
    import mlx_edgelora  # noqa: F401  (OpenBLAS before mlx)
    from mlx_edgelora.config import TrainConfig
    from mlx_edgelora.trainer import train

    result = train(TrainConfig(**spec["cfg"]), keep_model=False)
    peak = {"rank": result.rank, "peak_gb": result.peak_gb}
    Path(spec["peaks"], f"rank{result.rank}.json").write_text(json.dumps(peak))


def _run(name: str, tmp: Path, ranks: int, **kw) -> dict:
    out, peaks = tmp / name, tmp / f"{name}-peaks"
    peaks.mkdir()
    spec = {"cfg": {**OPTIONS, **kw, "out": str(out)}, "peaks": str(peaks)}
    tail = [__file__, "--worker", json.dumps(spec)]
    cmd = [sys.executable, *tail]
    if ranks > 1:  # what a user runs, with this machine as every host
        launch = Path(sys.executable).with_name("mlx.launch")
        cmd = [str(launch), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks)]
        cmd += ["-p", str(_free_port()), "--python", sys.executable, "--", *tail]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "out": out,
        "train_loss": [r["loss"] for r in recs if "loss" in r],
        "val_loss": [r["val_loss"] for r in recs if "val_loss" in r],
        "peak_gb": {
            p.stem: json.loads(p.read_text())["peak_gb"] for p in sorted(peaks.glob("*.json"))
        },
    }


def _free_port() -> int:
    """A port whose next one is likely free too (the ring takes one per rank)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: Path, b: Path) -> float:
    # isort: off
    import mlx_edgelora  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx

    # isort: on

    wa, wb = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    return max(mx.abs(wa[k] - wb[k]).max().item() for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only rewrite the .md from the .json")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.report:
        result = json.loads((RESULTS / "distributed.json").read_text())
        return (RESULTS / "distributed.md").write_text(markdown(result))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        runs = {
            "2 ranks x batch 1": _run("ranks", tmp, 2, batch_size=1),
            "1 process x batch 1 x grad-accum 2": _run("accum", tmp, 1, grad_accum=2),
            "1 process x batch 2": _run("batch2", tmp, 1, batch_size=2),
        }
        ref = runs["2 ranks x batch 1"]["out"]
        for r in runs.values():
            r["adapter_max_abs_diff_vs_2_ranks"] = _max_diff(ref, r.pop("out"))
    result = {"options": OPTIONS, "model": "embedded SmolLM2-135M-Instruct Q4_1", "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "distributed.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    o = result["options"]
    lines = [
        "# Two local ranks vs one process (bench/distributed.py)",
        "",
        f"{result['model']}, {o['steps']} steps of {o['max_seq_len']} tokens per sequence, "
        "trainer defaults, seed 0. Peaks are MLX's allocator peak per process. The ranks share "
        "this machine's 2 CPU cores: no speed figure.",
        "",
        "| run | adapter max abs diff vs 2 ranks | final train loss | val losses | peak GB |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        peaks = r["peak_gb"]
        peaks = (
            ", ".join(f"{k} {v:.3f}" for k, v in peaks.items())
            if len(peaks) > 1
            else (f"{peaks['rank0']:.3f}")
        )
        vals = ", ".join(f"{v:.4f}" for v in r["val_loss"])
        lines.append(
            f"| {name} | {r['adapter_max_abs_diff_vs_2_ranks']:.2e} | {r['train_loss'][-1]:.4f}"
            f" | {vals} | {peaks} |"
        )
    lines += [
        "",
        "2 ranks x batch 1 and batch 1 x grad-accum 2 sum the same rows' gradients in the same "
        "order: the adapters are bit-identical. --batch-size 2 adds inside batched matmuls in "
        "another order; AdamW turns those rounding differences into small weight differences "
        "where a gradient is near zero (losses equal to the digits shown). The single process "
        "with --grad-accum 2 peaks higher than a rank because it holds the accumulated "
        "gradients beside the next micro-batch's (one more copy of the LoRA gradients).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
