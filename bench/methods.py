"""LoRA vs LARS vs EMLoC on the same engine: held-out quality, step memory and time (issue 18).

1. quality: each method trains SmolLM2-135M-Instruct (the embedded Q4_1 GGUF) on the bundled
   prompt/completion lines (assets/sample_chat.jsonl; completions carry loss) for the same
   steps at each learning rate of the same range, with the trainer's defaults otherwise
   (segments engine, half-block boundaries, streamed weights, disk spill, exact chunked loss).
   Scored by the exact held-out loss over every validation row. For EMLoC (ratio 0.4) three
   held-out losses: emulator + LoRA (what it trained), the naive merge (that LoRA on the
   original model) and the corrected merge (the adapter EMLoC writes). One fresh process per
   run (peak memory is per process), serialised with the other benchmarks (locked.py).
2. memory: one training step in a fresh process per cell (cells.py), SmolLM2 at 512 and 2048
   tokens with the trainer's default engine settings (the Table 1 "exact" row: streamed
   weights, half-block boundaries, chunked attention/MLP, exact chunked loss, 30% trainable
   positions); EMLoC's cell trains on the emulator the quality run built.
3. llama3b: the same cells on the Llama-3.2-3B shape (random 4-bit weights, 2 blocks measured,
   full depth derived as in table1.py: peak(2) + 26 x resident bytes per block), at 2048
   tokens, with and without weight streaming (without it, EMLoC's smaller weights show).

    python bench/methods.py                    # all parts
    python bench/methods.py --parts quality --steps 20 --lrs 5e-4 2e-3

Timings are measured on a shared 2-core machine under load (loadavg recorded): compare
memory, treat seconds as indicative only. Results: bench/results/methods.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from locked import run_locked

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cells  # noqa: E402

RESULTS = HERE / "results"
DATA = HERE.parent / "assets" / "sample_chat.jsonl"
WORK = Path(os.environ.get("BENCH_TMP", "/tmp")) / "edgelora-methods"
METHODS = ["lora", "lars", "emloc"]
RATIO = 0.4
TRAIN = dict(max_seq_len=256, batch_size=1, warmup=2, eval_every=0, eval_batches=-1)
TRAIN.update(val_fraction=0.2, save_every=0, seed=0)
LLAMA_FULL = 28


# ------------------------------------------------------------------------------ quality


def train_child(spec: dict) -> dict:
    """One training run (fresh process); held-out losses of what it produced."""
    import mlx_edgelora  # noqa: F401,I001  (OpenBLAS before mlx)
    import mlx.core as mx

    from mlx_edgelora import TrainConfig, emloc, load_dataset, load_model, train
    from mlx_edgelora.emloc import heldout_loss
    from mlx_edgelora.lora import load_adapters

    out = WORK / f"{spec['method']}-lr{spec['lr']}"
    cfg = TrainConfig(
        data=str(DATA), out=str(out), steps=spec["steps"], lr=spec["lr"], overwrite=True, **TRAIN
    )
    t0 = time.perf_counter()
    log = out / "metrics.jsonl"
    done = [json.loads(x) for x in log.open()] if log.is_file() else []
    if spec["method"] != "emloc" and any(d.get("step") == spec["steps"] for d in done):
        r = None  # trained by an earlier invocation: score it again only
        res = {"peak_gb": max(d.get("peak_gb", 0) for d in done), "reused_training": True}
        metrics = out / "metrics.jsonl"
    elif spec["method"] == "emloc":
        r = emloc(cfg, ratio=RATIO, emulator_dir=str(WORK / "emulator-cache"))
        res = {"emulator_val_loss": r.emulator_val_loss, "emulator_file": str(r.emulator_path)}
        res["peak_gb"] = r.peak_gb
        metrics = r.emulator_run / "metrics.jsonl"
    else:
        cfg.adapter = spec["method"]
        r = train(cfg, keep_model=False)
        res = {"peak_gb": r.peak_gb}
        metrics = r.out / "metrics.jsonl"
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    steps = [json.loads(x) for x in metrics.open()]
    res["train_tok_s"] = [s["tokens_per_s"] for s in steps if "tokens_per_s" in s][-5:]
    losses = [s["loss"] for s in steps if "loss" in s]
    res["train_loss_first_last"] = [losses[0], losses[-1]]
    mx.reset_peak_memory()
    scored = {"heldout": out}  # for EMLoC: the corrected merge, what it writes
    if spec["method"] == "emloc":
        scored["naive_merge"] = r.emulator_run
    for name, adapter in scored.items():
        loaded = load_model(None)
        data = load_dataset(str(DATA), loaded.tokenizer, cfg)
        load_adapters(loaded.model, adapter)
        res[f"{name}_loss"] = heldout_loss(loaded.model, cfg, data.val_rows)
    if spec["method"] == "emloc":  # the emulator alone, before any LoRA
        from mlx_edgelora import emulator

        loaded = load_model(None)
        emulator.install(loaded.model, emulator.load(r.emulator_path))
        rows = load_dataset(cfg.data, loaded.tokenizer, cfg).val_rows
        res["emulator_alone_loss"] = heldout_loss(loaded.model, cfg, rows)
    if spec.get("base"):
        loaded = load_model(None)
        rows = load_dataset(cfg.data, loaded.tokenizer, cfg).val_rows
        res["base_loss"] = heldout_loss(loaded.model, cfg, rows)
    return res


def run_child(kind: str, spec: dict, timeout: int = 3600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--child-{kind}", json.dumps(spec)]
    t0 = time.time()
    load = [round(x, 2) for x in os.getloadavg()]
    p = run_locked(cmd, timeout)
    if p is None:
        return {**spec, "status": "timeout"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**spec, "status": "error", "stderr_tail": p.stderr[-1500:]}
    return {
        **spec,
        **json.loads(lines[-1]),
        "status": "ok",
        "loadavg_at_start": load,
        "wall_incl_lock_s": round(time.time() - t0, 1),
    }


def quality(steps: int, lrs: list[float], results: dict, methods: list[str]) -> None:
    for lr in lrs:  # every method at the first lr before the next: partial results compare
        for method in methods:
            spec = {
                "method": method,
                "lr": lr,
                "steps": steps,
                "base": method == "lora" and lr == lrs[0],
            }
            r = run_child("train", spec)
            print(json.dumps(r)[:400], flush=True)
            results["quality"] = [
                q for q in results.get("quality", []) if (q["method"], q["lr"]) != (method, lr)
            ] + [r]
            save(results, "quality")


# ------------------------------------------------------------------------------ memory

EXACT_ROW = dict(bits=4, engine="segments", activations="disk", trainable=0.3, attn_chunk=256)
EXACT_ROW.update(mlp_chunk=256, stream_weights=True, split_blocks=True, loss="chunked", steps=1)


def method_cell(method: str, emulator: str | None, **kw) -> dict:
    extra = {"adapter": "lars"} if method == "lars" else {}
    if method == "emloc":
        extra = {"emulator": emulator}
    return cells.config(**{**EXACT_ROW, **kw, **extra})


def memory(results: dict, shape: str, methods: list[str], redo: bool = False) -> None:
    cached = sorted((WORK / "emulator-cache").glob("*.safetensors"), key=os.path.getmtime)
    emu = str(cached[-1]) if cached else None  # the quality run's SmolLM2 emulator
    plan = []
    if shape == "smollm2":
        for seq in (512, 2048):
            plan += [(m, method_cell(m, emu, shape="smollm2", seq=seq, bits=None)) for m in METHODS]
    else:
        for stream in (True, False):
            for m in METHODS:
                spec = f"random:{RATIO}" if m == "emloc" else None
                plan.append(
                    (
                        m,
                        method_cell(
                            m,
                            spec,
                            shape="llama3b",
                            seq=2048,
                            layers=2,
                            stream_weights=stream,
                            steps=1,
                        ),
                    )
                )
    key = f"memory_{shape}"
    plan = [(m, c) for m, c in plan if m in methods]
    done = {json.dumps(x["config"], sort_keys=True) for x in results.get(key, [])}
    for m, c in plan:
        if json.dumps(c, sort_keys=True) in done and not redo:
            continue  # measured already (--redo measures again)
        if m == "emloc" and not c["emulator"]:
            print("no emulator file yet: run --parts quality first", file=sys.stderr)
            continue
        r = cells.run_cell(c, timeout=2400)
        r["method"] = m
        if shape == "llama3b" and r["status"] == "ok":
            pl = r["per_layer_bytes"]
            per = pl["frozen"] + pl["trainable_and_grads"]
            r["derived_full_depth_gb"] = round(
                (r["peak_bytes"] + (LLAMA_FULL - 2) * per) / cells.GB, 3
            )
            r["derivation"] = (
                f"peak(2 blocks) + {LLAMA_FULL - 2} x {per / 2**20:.1f} MB resident per block"
            )
        print(
            json.dumps(
                {
                    k: r.get(k)
                    for k in ("method", "status", "peak_gb", "step_s", "derived_full_depth_gb")
                }
            ),
            flush=True,
        )
        rows = [
            x
            for x in results.get(key, [])
            if (x.get("method"), json.dumps(x["config"], sort_keys=True))
            != (m, json.dumps(c, sort_keys=True))
        ]
        results[key] = rows + [r]
        save(results, key)


# ------------------------------------------------------------------------------ output


def _identity(row: dict) -> str:
    """What makes a result row the same measurement: method + lr, or method + cell config."""
    return json.dumps([row["method"], row.get("lr"), row.get("config")], sort_keys=True)


def save(results: dict, key: str | None = None) -> None:
    """Write `key` of results (all with None) into methods.json, keeping what another
    invocation wrote meanwhile (parts may run at the same time)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "methods.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    if key is not None and key != "commands":  # other invocations' rows stay
        mine = {_identity(q) for q in results[key]}
        others = [q for q in merged.get(key, []) if _identity(q) not in mine]
        merged[key] = others + results[key]
    else:
        merged.update(results if key is None else {key: results[key]})
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, path)
    (RESULTS / "methods.md").write_text(markdown(merged))


def _f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


QUALITY_HEAD = [
    "method",
    "lr",
    "held-out loss",
    "EMLoC: emulator alone",
    "EMLoC: emulator + LoRA",
    "EMLoC: naive merge",
    "training peak GB",
    "trainable tok/s (under load)",
]
MEMORY_HEAD = [
    "method",
    "tokens",
    "streamed weights",
    "peak GB (measured)",
    "derived full depth GB",
    "resident GB",
    "step s (under load)",
    "loadavg",
]
MEMORY_TITLES = {
    "memory_smollm2": "One step, SmolLM2, trainer defaults (Table 1 exact row)",
    "memory_llama3b": "One step, Llama-3.2-3B shape, 2K tokens, INT4: 2 blocks measured, "
    "28 derived",
}


def _row(cells_: list) -> str:
    return "| " + " | ".join(str(c) for c in cells_) + " |"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *map(_row, rows), ""]


def markdown(res: dict) -> str:
    lines = ["# LoRA vs LARS vs EMLoC (bench/methods.py)", ""]
    lines += ["Timings under load on a shared 2-core CPU: indicative only; memory is exact.", ""]
    q = [r for r in res.get("quality", []) if r["status"] == "ok"]
    if q:
        base = next((r["base_loss"] for r in q if r.get("base_loss")), None)
        lines += [
            f"## Held-out exact loss: SmolLM2-135M Q4_1, sample_chat, {q[0]['steps']} steps "
            f"(base model {_f(base)}; EMLoC's held-out loss is its corrected merge)",
            "",
        ]
        rows = [
            [
                r["method"],
                f"{r['lr']:g}",
                _f(r.get("heldout_loss")),
                _f(r.get("emulator_alone_loss")),
                _f(r.get("emulator_val_loss")),
                _f(r.get("naive_merge_loss")),
                _f(r.get("peak_gb")),
                _f((r.get("train_tok_s") or [None])[-1], 0),
            ]
            for r in q
        ]
        lines += _table(QUALITY_HEAD, rows)
    for key, title in MEMORY_TITLES.items():
        if not res.get(key):
            continue
        rows = []
        for r in res[key]:
            c = r["config"]
            if r["status"] != "ok":
                rows.append(
                    [r["method"], c["seq"], c["stream_weights"], r["status"], "", "", "", ""]
                )
                continue
            rows.append(
                [
                    r["method"],
                    c["seq"],
                    c["stream_weights"],
                    f"{r['peak_gb']:.3f}",
                    _f(r.get("derived_full_depth_gb")),
                    f"{r['resident_gb']:.3f}",
                    r["step_s"],
                    r["loadavg"][0],
                ]
            )
        lines += [f"## {title}", "", *_table(MEMORY_HEAD, rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child-train":
        print(json.dumps(train_child(json.loads(sys.argv[2]))), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["quality", "smollm2", "llama3b"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--methods", nargs="+", default=METHODS, help="methods to run")
    p.add_argument("--redo", action="store_true", help="measure cells already in the json")
    p.add_argument("--report", action="store_true", help="only rewrite methods.md from the json")
    args = p.parse_args()
    path = RESULTS / "methods.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["commands"] = sorted(
        set(results.get("commands", [])) | {" ".join(["python bench/methods.py", *sys.argv[1:]])}
    )
    if not args.report:
        WORK.mkdir(parents=True, exist_ok=True)
        if "quality" in args.parts:
            quality(args.steps, args.lrs, results, args.methods)
        for shape in ("smollm2", "llama3b"):
            if shape in args.parts:
                memory(results, shape, args.methods, args.redo)
    save(results, "commands")


if __name__ == "__main__":
    main()
