"""The real trainer's memory: `python -m mlx_edgelora.train` itself, as a user runs it.

Why: bench/cells.py measures one forward+backward with no optimizer update, which misses
AdamW's moments (created by the first update: measure >= 3 steps) and everything outside the
step (loading, saving). Each row here runs the CLI in a fresh process under
`/usr/bin/time -f %M` on a random-weight INT4 mlx-lm folder (bench/make_random_model.py:
group 64, bf16 scales and norms) and records:
- the trainer's own reported peak (`mx.get_peak_memory()` over the training loop) per step,
  from metrics.jsonl, and the final "peak memory" line;
- the process's max RSS from start to exit, load included;
- the RSS floor of an idle `python -c "import mlx_edgelora"` and of importing the trainer.
Memory figures do not depend on the machine's load; wall times here were taken on a shared,
loaded 2-core machine and are labelled so. Rows are cached in results/trainer_rows.jsonl
(delete a line to re-run it); `--report` rebuilds trainer_rows.{json,md}.

With weights and trainable state streamed, nothing resident grows with depth (every block's
frozen weights, LoRA weights, gradients and moments are on disk between uses), so a row run
at reduced depth (`layers`) stands for the full model; such rows say "derived".

    python bench/trainer_rows.py --only qwen0.5b:512        # one row
    python bench/trainer_rows.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_random_model import build  # noqa: E402

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "trainer_rows.jsonl"
PY = sys.executable
FULL_DEPTH = {"llama3b": 28, "qwen3b": 36, "qwen0.5b": 24}
# (shape, context, steps, layers or None for full depth, extra CLI flags)
ROWS = [
    ("qwen0.5b", 512, 3, None, []),
    ("llama3b", 2048, 3, 4, []),
    ("qwen3b", 2048, 3, 4, []),
    ("llama3b", 1024, 3, 4, []),
    ("llama3b", 4096, 3, 4, []),
    ("llama3b", 2048, 2, None, []),  # 2 steps: step 2 runs with AdamW's moments
    ("llama3b", 2048, 3, None, []),
    ("qwen3b", 2048, 3, None, []),
    ("llama3b", 2048, 3, 4, ["--no-stream-state"]),
    ("llama3b", 2048, 3, 1, []),  # the headline row on today's code, quickly (1 block)
]


def _key(shape: str, seq: int, steps: int, layers: int | None, flags: list[str]) -> str:
    depth = f"L{layers}" if layers else "full"
    return ":".join([shape, str(seq), f"{steps}steps", depth, *flags, f"code-{CODE}"])


def _commit() -> str:
    """The checkout's commit: a row measures one version of the engine, and says which."""
    p = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True
    )
    return p.stdout.strip() or "unknown"


CODE = _commit()


def max_rss_gb(code: str) -> float:
    """Max RSS of `python -c code`, in GB."""
    p = subprocess.run(
        ["/usr/bin/time", "-f", "%M", PY, "-c", code], capture_output=True, text=True, check=True
    )
    return int(p.stderr.strip().splitlines()[-1]) / 1024**2


def run_row(shape: str, seq: int, steps: int, layers: int | None, flags: list[str]) -> dict:
    folder = build(shape, layers)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:  # git-ignored
        out = Path(tmp) / "out"
        cmd = [PY, "-m", "mlx_edgelora.train", "--model", str(folder), "--out", str(out)]
        cmd += ["--steps", str(steps), "--max-seq-len", str(seq), "--eval-every", "0"]
        cmd += ["--eval-batches", "1", "--save-every", "0", *flags]
        t0 = time.time()
        p = subprocess.run(
            ["/usr/bin/time", "-f", "maxrss_kb %M", *cmd],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        wall = time.time() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{cmd}: exit {p.returncode}\n{p.stderr[-2000:]}")
        steps_log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rss = int(re.search(r"maxrss_kb (\d+)", p.stderr).group(1)) / 1024**2
    reported = float(re.search(r"peak memory ([\d.]+) GB", p.stdout).group(1))
    return {
        "key": _key(shape, seq, steps, layers, flags),
        "shape": shape,
        "context": seq,
        "steps": steps,
        "layers": layers or FULL_DEPTH[shape],
        "derived": bool(layers),
        "flags": flags,
        "code": CODE,
        "reported_peak_gb": reported,
        "step_peaks_gb": [round(r["peak_gb"], 4) for r in steps_log if "peak_gb" in r],
        "max_rss_gb": round(rss, 3),
        "wall_s_under_load": round(wall, 1),
        "load_average": os.getloadavg()[0],
    }


# What the trainer does before its first step (load, LoRA, offload of weights and state), alone:
# the load's share of the max RSS, at full depth even where a training step takes too long here.
LOAD_ONLY = """
import sys
import mlx_edgelora
import mlx.core as mx
from mlx_edgelora import engine, lora, loss, quant
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.loading import load_model
from mlx_edgelora.state import SegmentOptimizer
from mlx_edgelora.trainer import make_optimizer
cfg = TrainConfig(model=sys.argv[1], out=sys.argv[2]).validate()
model = load_model(cfg.model, int(sys.argv[4]) or None, lazy=sys.argv[3] == "lazy").model
lora.apply_lora(model, cfg)
quant.prepare_for_training(model)
state = SegmentOptimizer(model, make_optimizer(cfg), cfg.grad_clip, None, cfg.out)
step = engine.make_step(model, cfg, loss.make_loss_head(model, cfg.loss, cfg), state)
if sys.argv[5:] == ["save"]:  # the trainer's checkpoint save, from the streamed state
    from pathlib import Path
    state.save_checkpoint(Path(sys.argv[2]))
print("peak_gb", mx.get_peak_memory() / 2**30, "active_gb", mx.get_active_memory() / 2**30)
step.close(restore=False)
state.close()
"""


# Real GGUF files measured by --load-only besides the random folders: the --model value.
GGUF_MODELS = {"smollm2-gguf": None, "gemma3-270m-gguf": "gemma3-270m"}


def _model_arg(shape: str) -> str:
    """--model for a load-only row: a real GGUF (GGUF_MODELS) or a random folder."""
    if shape.endswith("-bf16"):  # a float folder, for --quantize at load
        return str(build(shape.removesuffix("-bf16"), quantize=False))
    if shape not in GGUF_MODELS:
        return str(build(shape))
    from mlx_edgelora.loading import default_model_path

    return GGUF_MODELS[shape] or default_model_path()


def load_row(
    shape: str, lazy: bool, label: str = "", quantize: int = 0, save: bool = False
) -> dict:
    """Max RSS of loading `shape` and offloading it (no step), lazily or eagerly."""
    model = _model_arg(shape)
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent / ".models") as tmp:
        p = subprocess.run(
            ["/usr/bin/time", "-f", "maxrss_kb %M", PY, "-c", LOAD_ONLY, model, tmp]
            + ["lazy" if lazy else "eager", str(quantize)]
            + (["save"] if save else []),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    found = re.search(r"peak_gb ([\d.e-]+) active_gb ([\d.e-]+)", p.stdout)
    peak, active = map(float, found.groups())
    rss = int(re.search(r"maxrss_kb (\d+)", p.stderr).group(1)) / 1024**2
    return {
        "key": f"{shape}:load-only:{'lazy' if lazy else 'eager'}{label}"
        + (f":quantize{quantize}" if quantize else "")
        + (":save" if save else ""),
        "save": save,
        "quantize": quantize or None,
        "shape": shape,
        "load_only": True,
        "lazy": lazy,
        "label": label,
        "mlx_peak_gb": round(peak, 3),
        "active_after_offload_gb": round(active, 3),
        "max_rss_gb": round(rss, 3),
    }


# An adapter for the path rows: LoRA on the lazily loaded model (lora_b zero: the merge runs
# all the same), saved without ever evaluating the base.
MAKE_ADAPTER = """
import sys
import mlx_edgelora
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.loading import load_model
from mlx_edgelora.lora import apply_lora, save_adapters
cfg = TrainConfig(model=sys.argv[1], out=sys.argv[2]).validate()
model = load_model(cfg.model, lazy=True).model
save_adapters(model, sys.argv[2], apply_lora(model, cfg))
"""


def path_rows(shape: str, root: Path, label: str, only: str | None = None) -> Iterator[dict]:
    """Max RSS of fuse and generate (resident and --stream-weights) on `shape` at full depth,
    each its own CLI process, with the package at `root`. (Not export: its numpy Q8_0
    re-quantization of a 3B model takes too long here; tests/test_export.py checks its peak.)"""
    folder = _model_arg(shape)
    env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent / ".models") as tmp:
        adapter = Path(tmp) / "adapter"
        subprocess.run([PY, "-c", MAKE_ADAPTER, folder, str(adapter)], env=env, check=True)
        runs = {
            "fuse": ["mlx_edgelora.fuse", "--adapter", str(adapter), "--out", f"{tmp}/fused"],
            "generate": ["mlx_edgelora.generate", "--prompt", "hi", "--raw", "--max-tokens", "2"],
        }
        runs["generate --stream-weights"] = runs["generate"] + ["--stream-weights"]
        for name, args in runs.items():
            if only and name != only:
                continue
            t0 = time.time()
            p = subprocess.run(
                ["/usr/bin/time", "-f", "maxrss_kb %M", PY, "-m", *args, "--model", folder],
                capture_output=True,
                text=True,
                env=env,
            )
            if p.returncode != 0:
                if "--stream-weights" in args and "unrecognized" in p.stderr:
                    continue  # the code before streaming has no such flag
                raise RuntimeError(f"{args}: {p.stderr[-2000:]}")
            rss = int(re.search(r"maxrss_kb (\d+)", p.stderr).group(1)) / 1024**2
            shutil.rmtree(f"{tmp}/fused", ignore_errors=True)
            yield {
                "key": f"{shape}:path:{name}{label}",
                "shape": shape,
                "path": name,
                "label": label,
                "max_rss_gb": round(rss, 3),
                "wall_s_under_load": round(time.time() - t0, 1),
                "load_average": os.getloadavg()[0],
            }


def report() -> None:
    rows = [json.loads(x) for x in CACHE.read_text().splitlines()] if CACHE.exists() else []
    loads = [r for r in rows if r.get("load_only")]
    paths = [r for r in rows if r.get("path")]
    rows = [r for r in rows if not r.get("load_only") and not r.get("path")]
    floor = {
        "import mlx_edgelora": round(max_rss_gb("import mlx_edgelora"), 3),
        "import mlx_edgelora.trainer": round(max_rss_gb("import mlx_edgelora.trainer"), 3),
    }
    (RESULTS / "trainer_rows.json").write_text(
        json.dumps(
            {"rss_floor_gb": floor, "rows": rows, "load_only": loads, "paths": paths}, indent=2
        )
    )
    md = [
        "| model (random INT4, bf16 scales) | context | steps | depth | flags | reported peak "
        "(GB) | per-step peaks | max RSS (GB) | wall s | load avg | code |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        depth = f"{r['layers']} blocks" + (" (derived for full depth)" if r["derived"] else "")
        md.append(
            f"| {r['shape']} | {r['context']} | {r['steps']} | {depth} | "
            f"{' '.join(r['flags']) or 'defaults'} | {r['reported_peak_gb']:.2f} | "
            f"{', '.join(f'{x:.3f}' for x in r['step_peaks_gb'])} | {r['max_rss_gb']:.2f} | "
            f"{r['wall_s_under_load']:.0f} | {r.get('load_average', 0):.0f} | "
            f"{r.get('code', '?')} |"
        )
    md += [
        f"- {r['shape']} {r['context']} {r['layers']} blocks ({r['code']}): {r['note']}"
        for r in rows
        if r.get("note")
    ]
    md += ["", "Load only (load, LoRA, offload of weights and state; no step), full depth:", ""]
    md += ["| model | load | mlx peak (GB) | active after offload (GB) | max RSS (GB) |"]
    md += ["|---|---|---|---|---|"]
    for r in loads:
        how = "lazy (streamed)" if r["lazy"] else "eager"
        how += f", --quantize {r['quantize']}" if r.get("quantize") else ""
        how += ", then a checkpoint save" if r.get("save") else ""
        how += " (code before GGUF streaming)" if r.get("label") == ":before" else ""
        md.append(
            f"| {r['shape']} | {how} | "
            f"{r['mlx_peak_gb']:.3f} | {r['active_after_offload_gb']:.3f} | {r['max_rss_gb']:.2f} |"
        )
    md += ["", "Other paths, full depth, each its own process (max RSS from start to exit):", ""]
    md += [
        "| model | command | code | max RSS (GB) | wall s (under load) |",
        "|---|---|---|---|---|",
    ]
    for r in paths:
        code = "before streaming" if r["label"] == ":before" else "streamed"
        md.append(
            f"| {r['shape']} | {r['path']} | {code} | {r['max_rss_gb']:.2f} | "
            f"{r['wall_s_under_load']:.0f} |"
        )
    md.append("")
    md += [f'RSS floor, `python -c "{k}"`: {v:.3f} GB' for k, v in floor.items()]
    (RESULTS / "trainer_rows.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="shape:context[:flag] of the rows to run (--paths: a command)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument(
        "--load-only",
        help="shape, smollm2-gguf or gemma3-270m-gguf: measure load + offload only, lazy and eager",
    )
    ap.add_argument("--label", default="", help="appended to a --load-only row's key")
    ap.add_argument("--quantize", type=int, default=0, help="--load-only with --quantize N")
    ap.add_argument("--save", action="store_true", help="--load-only, lazy, + a checkpoint save")
    ap.add_argument("--paths", help="shape: max RSS of fuse and generate (full depth)")
    ap.add_argument("--root", default=str(ROOT), help="--paths: the package checkout to run")
    args = ap.parse_args(argv)
    if args.paths:
        for result in path_rows(args.paths, Path(args.root), args.label, args.only):
            print(json.dumps(result), flush=True)
            with CACHE.open("a") as f:
                f.write(json.dumps(result) + "\n")
    elif args.load_only:
        for lazy in (True,) if args.save else (True, False):
            result = load_row(args.load_only, lazy, args.label, args.quantize, args.save)
            print(json.dumps(result), flush=True)
            with CACHE.open("a") as f:
                f.write(json.dumps(result) + "\n")
    elif not args.report:
        done = (
            {json.loads(x)["key"] for x in CACHE.read_text().splitlines()}
            if CACHE.exists()
            else set()
        )
        for row in ROWS:
            key = _key(*row)
            if key in done or (args.only and not key.startswith(args.only)):
                continue
            print(f"running {key}", flush=True)
            result = run_row(*row)
            print(json.dumps(result), flush=True)
            with CACHE.open("a") as f:
                f.write(json.dumps(result) + "\n")
    report()


if __name__ == "__main__":
    main(sys.argv[1:])
