"""LoRA vs LARS vs EMLoC on the same engine: held-out quality, step memory and time (issue 18).

1. quality: each method trains SmolLM2-135M-Instruct (the embedded Q4_1 GGUF) on the bundled
   prompt/completion lines (assets/sample_chat.jsonl, split once, seed 0, into 24 train / 8
   valid / 8 test records in mlx-lm's folder layout; completions carry loss) for the same
   steps at each learning rate of the same range, with the trainer's defaults otherwise
   (segments engine, half-block boundaries, streamed weights, disk spill, exact chunked loss).
   Scored by the exact loss over every valid and every test row: the report picks each
   method's learning rate on valid and states its test loss. For EMLoC (ratio 0.4) also the
   emulator alone, emulator + LoRA (what it trained), the naive merge (that LoRA on the
   original model) and the corrected merge (the adapter EMLoC writes). One fresh process per
   run (peak memory is per process); loss and memory do not depend on load, so these run
   without the timing lock (start the bench under `nice -n 10`).
2. smollm2: steps of the three methods in fresh processes (cells.py), SmolLM2 at 512 and 2048
   tokens with the trainer's default engine settings (the Table 1 "exact" row: streamed
   weights, half-block boundaries, chunked attention/MLP, exact chunked loss, 30% trainable
   positions); EMLoC's cell trains on the emulator the quality run built. Step times are
   reported, so the whole part holds the shared timing lock (TIMING_LOCK) and runs the three
   methods interleaved (lora, lars, emloc at 512, then at 2048), each cell recording its
   load average; the time is the fastest of `--time-steps` steps.
3. llama3b: the same cells on the Llama-3.2-3B shape (random 4-bit weights, 2 blocks measured,
   full depth derived as in table1.py: peak(2) + 26 x resident bytes per block), at 2048
   tokens, with and without weight streaming (without it, EMLoC's smaller weights show).
   Memory only: no lock.

    nice -n 10 python bench/methods.py --parts quality llama3b --steps 30 --lrs 5e-4 2e-3
    python bench/methods.py --parts smollm2 --time-steps 2   # takes the timing lock itself
    python bench/methods.py --report                           # rewrite methods.md from json

Results: bench/results/methods.{json,md}; finished runs are cached there and skipped
(`--redo` measures again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cells  # noqa: E402

RESULTS = HERE / "results"
DATA = HERE.parent / "assets" / "sample_chat.jsonl"
WORK = Path(os.environ.get("BENCH_TMP", "/tmp")) / "edgelora-methods"
METHODS = ["lora", "lars", "emloc"]
RATIO = 0.4
TRAIN = dict(max_seq_len=256, batch_size=1, warmup=2, eval_every=0, eval_batches=-1)
TRAIN.update(save_every=0, seed=0)
SPLIT = {"train": 24, "valid": 8, "test": 8}  # records of DATA, after a seed-0 shuffle
TIMING_LOCK = "/work/wt/_brief/timing.lock"  # shared by everyone on this machine who times
LLAMA_FULL = 28


# ------------------------------------------------------------------------------ quality


def split_data() -> Path:
    """DATA as an mlx-lm folder (train/valid/test.jsonl), the same split on every run."""
    import random

    lines = [ln for ln in DATA.read_text().splitlines() if ln.strip()]
    random.Random(0).shuffle(lines)
    folder, start = WORK / "data", 0
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in SPLIT.items():
        (folder / f"{name}.jsonl").write_text("\n".join(lines[start : start + n]) + "\n")
        start += n
    return folder


def _score(model_fn, cfg, data, res: dict, name: str) -> None:
    """res[name_val], res[name_test]: exact loss of model_fn() on the valid and test rows."""
    from mlx_edgelora.emloc import heldout_loss

    model = model_fn()
    res[f"{name}_val"] = heldout_loss(model, cfg, data.val_rows)
    res[f"{name}_test"] = heldout_loss(model, cfg, data.test_rows)


def train_child(spec: dict) -> dict:
    """One training run (fresh process); valid and test losses of what it produced."""
    import mlx_edgelora  # noqa: F401,I001  (OpenBLAS before mlx)
    import mlx.core as mx

    from mlx_edgelora import TrainConfig, emloc, emulator, load_dataset, load_model, train
    from mlx_edgelora.lora import load_adapters

    out = WORK / f"{spec['method']}-lr{spec['lr']}-s{spec['steps']}"
    data_dir = split_data()
    cfg = TrainConfig(
        data=str(data_dir),
        out=str(out),
        steps=spec["steps"],
        lr=spec["lr"],
        overwrite=True,
        **TRAIN,
    )
    t0 = time.perf_counter()
    if spec["method"] == "emloc":
        r = emloc(cfg, ratio=RATIO, emulator_dir=str(WORK / "emulator-cache"))
        res = {"emulator_file": str(r.emulator_path), "peak_gb": r.peak_gb}
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
    loaded = load_model(None)
    data = load_dataset(str(data_dir), loaded.tokenizer, cfg)
    res["rows"] = {"train": len(data.train_rows), "val": len(data.val_rows)}
    res["rows"]["test"] = len(data.test_rows)

    def with_adapter(folder, emulated=False):
        def build():
            m = load_model(None).model
            if emulated:
                emulator.install(m, emulator.load(r.emulator_path))
            if folder:
                load_adapters(m, folder)
            return m

        return build

    _score(with_adapter(out), cfg, data, res, "heldout")  # EMLoC: the corrected merge
    if spec["method"] == "emloc":
        _score(with_adapter(r.emulator_run), cfg, data, res, "naive_merge")
        _score(with_adapter(r.emulator_run, True), cfg, data, res, "emulator_lora")
        _score(with_adapter(None, True), cfg, data, res, "emulator_alone")
    if spec.get("base"):
        _score(with_adapter(None), cfg, data, res, "base")
    return res


def run_child(kind: str, spec: dict, timeout: int = 3600) -> dict:
    """One fresh child process (no lock: loss and memory do not depend on load)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--child-{kind}", json.dumps(spec)]
    t0 = time.time()
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**spec, "status": "error", "stderr_tail": p.stderr[-1500:]}
    return {
        **spec,
        **json.loads(lines[-1]),
        "status": "ok",
        "loadavg_at_start": load,
        "wall_incl_start_s": round(time.time() - t0, 1),
    }


def quality(args, results: dict) -> None:
    steps, lrs, methods = args.steps, args.lrs, args.methods
    done = {_identity(q) for q in results.get("quality", []) if q.get("status") == "ok"}
    for lr in lrs:  # every method at the first lr before the next: partial results compare
        for method in methods:
            spec = {"method": method, "lr": lr, "steps": steps, "base": lr == lrs[0]}
            spec["base"] = spec["base"] and method == methods[0] and not args.skip_base
            if _identity(spec) in done and not args.redo:
                continue  # measured already
            r = run_child("train", spec)
            print(json.dumps(r)[:400], flush=True)
            results["quality"] = [
                q for q in results.get("quality", []) if _identity(q) != _identity(r)
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


def _plan(shape: str, time_steps: int) -> list[tuple[str, dict]]:
    """(method, cell) in run order: methods interleaved within each sequence length."""
    cached = sorted((WORK / "emulator-cache").glob("*.safetensors"), key=os.path.getmtime)
    emu = str(cached[-1]) if cached else None  # the quality run's SmolLM2 emulator
    plan = []
    if shape == "smollm2":
        for seq in (512, 2048):
            kw = dict(shape="smollm2", seq=seq, bits=None, steps=time_steps)
            plan += [(m, method_cell(m, emu, **kw)) for m in METHODS]
        return plan
    for stream in (True, False):
        for m in METHODS:
            spec = f"random:{RATIO}" if m == "emloc" else None
            kw = dict(shape="llama3b", seq=2048, layers=2, stream_weights=stream, steps=1)
            plan.append((m, method_cell(m, spec, **kw)))
    return plan


def _derive(r: dict) -> None:
    """Llama-3.2-3B full depth from 2 measured blocks (as table1.py)."""
    pl = r["per_layer_bytes"]
    per = pl["frozen"] + pl["trainable_and_grads"]
    r["derived_full_depth_gb"] = round((r["peak_bytes"] + (LLAMA_FULL - 2) * per) / cells.GB, 3)
    r["derivation"] = f"peak(2 blocks) + {LLAMA_FULL - 2} x {per / 2**20:.1f} MB resident per block"


def memory(results: dict, shape: str, args) -> None:
    """Run the part's cells not yet in results; smollm2 (timed) holds TIMING_LOCK per length
    unless --memory-only (then its times are marked as taken without the lock)."""
    import fcntl

    key, methods, redo = f"memory_{shape}", args.methods, args.redo
    timed = shape == "smollm2" and not args.memory_only
    seqs = args.seqs or [512, 2048]
    plan = [(m, c) for m, c in _plan(shape, args.time_steps) if m in methods and c["seq"] in seqs]
    done = {json.dumps(x["config"], sort_keys=True) for x in results.get(key, [])}
    todo = [(m, c) for m, c in plan if redo or json.dumps(c, sort_keys=True) not in done]
    os.environ["BENCH_LOCK_HELD"] = "1"  # cells.py: no lock of its own (ours, or none)
    for seq in sorted({c["seq"] for _, c in todo}):
        with open(TIMING_LOCK if timed else os.devnull) as lock:
            if timed:
                print(f"waiting for {TIMING_LOCK} ...", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            for m, c in [(m, c) for m, c in todo if c["seq"] == seq]:
                _run_cell(results, key, m, c, timed)


def _run_cell(results: dict, key: str, m: str, c: dict, timed: bool) -> None:
    if m == "emloc" and not c["emulator"]:
        print("no emulator file yet: run --parts quality first", file=sys.stderr)
        return
    r = cells.run_cell(c, timeout=2400)
    r["method"], r["timing_lock"] = m, timed
    if c["shape"] == "llama3b" and r["status"] == "ok":
        _derive(r)
    show = ("method", "status", "peak_gb", "step_times_s", "loadavg", "derived_full_depth_gb")
    print(json.dumps({k: r.get(k) for k in show}), flush=True)
    rows = [x for x in results.get(key, []) if _identity(x) != _identity(r)]
    results[key] = rows + [r]
    save(results, key)


# ------------------------------------------------------------------------------ output


def _identity(row: dict) -> str:
    """What makes a result row the same measurement: method + lr + steps, or method + cell."""
    key = [row["method"], row.get("lr"), row.get("steps"), row.get("config")]
    return json.dumps(key, sort_keys=True)


def save(results: dict, key: str | None = None) -> None:
    """Write `key` of results (all with None) into methods.json, keeping what another
    invocation wrote meanwhile (parts and methods may run in parallel processes)."""
    import fcntl

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "methods.json"
    with open(RESULTS / ".methods.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # read-merge-write is one step among processes
        merged = json.loads(path.read_text()) if path.exists() else {}
        if key is not None and key != "commands":  # other invocations' rows stay
            mine = {_identity(q) for q in results[key]}
            others = [q for q in merged.get(key, []) if _identity(q) not in mine]
            merged[key] = others + results[key]
        elif key == "commands":
            merged["commands"] = sorted(set(merged.get("commands", [])) | set(results[key]))
        else:
            merged.update(results)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        os.replace(tmp, path)
        (RESULTS / "methods.md").write_text(markdown(merged))


def _f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def _row(cells_: list) -> str:
    return "| " + " | ".join(str(c) for c in cells_) + " |"


def _table(head: list[str], rows: list[list]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *map(_row, rows), ""]


QUALITY_HEAD = ["method", "lr", "valid loss", "test loss", "training peak GB"]
QUALITY_HEAD += ["wall s (under load, start loadavg)"]
EMLOC_HEAD = ["lr", "stage", "valid loss", "test loss"]
EMLOC_STAGES = [
    ("emulator_alone", "emulator alone (no LoRA)"),
    ("emulator_lora", "emulator + LoRA (what trained)"),
    ("naive_merge", "naive merge (that LoRA on the original)"),
    ("heldout", "corrected merge (the adapter EMLoC writes)"),
]
MEMORY_HEAD = ["method", "tokens", "streamed weights", "peak GB (measured)"]
MEMORY_HEAD += ["derived full depth GB", "resident GB", "step s", "timing lock", "loadavg (1 min)"]
MEMORY_TITLES = {
    "memory_smollm2": "Steps of SmolLM2, trainer defaults (Table 1 exact row), methods "
    "interleaved; step s is comparable only for rows timed under the timing lock",
    "memory_llama3b": "One step, Llama-3.2-3B shape, 2K tokens, INT4: 2 blocks measured, "
    "28 derived (memory only: step s measured under load, not comparable)",
}


def _quality_md(q: list[dict]) -> list[str]:
    base = next((r for r in q if r.get("base_val") is not None), {})
    steps = sorted({r["steps"] for r in q})
    lines = [
        f"## Quality: SmolLM2-135M Q4_1, sample_chat (24 train / 8 valid / 8 test records), "
        f"{'/'.join(map(str, steps))} steps of 256 tokens",
        "",
        f"Base model: valid {_f(base.get('base_val'))}, test {_f(base.get('base_test'))}. "
        "Each method's learning rate is picked on valid (lowest valid loss); its test loss is "
        "the result. EMLoC's row is its corrected merge, the adapter it writes. "
        f"Rows of 256 tokens: {base.get('rows')} (small: differences under ~0.1 are noise).",
        "",
    ]
    best = {}
    for r in q:
        if r["method"] not in best or r["heldout_val"] < best[r["method"]]["heldout_val"]:
            best[r["method"]] = r
    rows = [
        [m, f"{r['lr']:g}", _f(r["heldout_val"]), _f(r["heldout_test"])] for m, r in best.items()
    ]
    lines += ["### Picked on valid", "", *_table(QUALITY_HEAD[:4], rows)]
    rows = [
        [r["method"], f"{r['lr']:g}", _f(r.get("heldout_val")), _f(r.get("heldout_test"))]
        + [_f(r.get("peak_gb")), f"{r.get('wall_s')} ({r['loadavg_at_start'][0]:.0f})"]
        for r in sorted(q, key=lambda r: (r["method"], r["lr"]))
    ]
    lines += ["### Every run", "", *_table(QUALITY_HEAD, rows)]
    em = [r for r in q if r["method"] == "emloc"]
    rows = [
        [f"{r['lr']:g}", label, _f(r.get(f"{k}_val")), _f(r.get(f"{k}_test"))]
        for r in em
        for k, label in EMLOC_STAGES
    ]
    if rows:
        lines += ["### EMLoC stages (ratio 0.4)", "", *_table(EMLOC_HEAD, rows)]
    return lines


def _memory_row(r: dict) -> list:
    c = r["config"]
    if r["status"] != "ok":
        return [r["method"], c["seq"], c["stream_weights"], r["status"], "", "", "", "", ""]
    times = "/".join(f"{t:g}" for t in r.get("step_times_s", [r["step_s"]]))
    return [
        r["method"],
        c["seq"],
        c["stream_weights"],
        f"{r['peak_gb']:.3f}",
        _f(r.get("derived_full_depth_gb")),
        f"{r['resident_gb']:.3f}",
        times,
        "yes" if r.get("timing_lock") else "no (under load)",
        r["loadavg"][0],
    ]


def markdown(res: dict) -> str:
    lines = ["# LoRA vs LARS vs EMLoC (bench/methods.py)", "", "Commands:", ""]
    lines += [f"    {c}" for c in res.get("commands", [])] + [""]
    lines += [f"- {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    q = [r for r in res.get("quality", []) if r["status"] == "ok" and "heldout_val" in r]
    if q:
        lines += _quality_md(q)
    for key, title in MEMORY_TITLES.items():
        if res.get(key):
            rows = [_memory_row(r) for r in res[key]]
            lines += [f"## {title}", "", *_table(MEMORY_HEAD, rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child-train":
        print(json.dumps(train_child(json.loads(sys.argv[2]))), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["quality", "smollm2", "llama3b"])
    p.add_argument("--steps", type=int, default=30, help="training steps of each quality run")
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-3])
    p.add_argument("--time-steps", type=int, default=2, help="steps of each smollm2 cell")
    p.add_argument("--memory-only", action="store_true", help="smollm2 without the timing lock")
    p.add_argument("--seqs", type=int, nargs="+", help="smollm2: only these lengths (512 2048)")
    p.add_argument("--methods", nargs="+", default=METHODS, help="methods to run")
    p.add_argument("--skip-base", action="store_true", help="do not score the base model")
    p.add_argument("--redo", action="store_true", help="measure runs already in the json")
    p.add_argument("--report", action="store_true", help="only rewrite methods.md from the json")
    args = p.parse_args()
    path = RESULTS / "methods.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        results["commands"] = sorted(
            set(results.get("commands", []))
            | {" ".join(["python bench/methods.py", *sys.argv[1:]])}
        )
        WORK.mkdir(parents=True, exist_ok=True)
        if "quality" in args.parts:
            quality(args, results)
        for shape in ("smollm2", "llama3b"):
            if shape in args.parts:
                memory(results, shape, args)
    save(results, "commands")


if __name__ == "__main__":
    main()
