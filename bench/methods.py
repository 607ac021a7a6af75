"""LoRA vs LARS vs EMLoC on the same engine: held-out quality, step memory and time (issue 18).

1. quality: each method trains SmolLM2-135M-Instruct (the embedded Q4_1 GGUF) on the bundled
   prompt/completion lines (assets/sample_chat.jsonl, 40 records, split once, seed 0, into
   20 train / 10 valid / 10 test records in mlx-lm's folder layout; completions carry loss)
   for the same steps at each learning rate of the same range, on the graph engine (exact
   gradients, the same as the default segments engine's, and faster) with the trainer's
   defaults otherwise. Every valid and test record is scored alone by its exact loss, so each
   loss has a standard error across records and methods compare by paired differences on the
   same records; the report picks each method's learning rate on valid and states its test
   loss (`--seed 1` reruns a picked learning rate with another seed). For EMLoC (ratio 0.4)
   also the emulator alone, emulator + LoRA (what it trained), the naive merge (that LoRA on
   the original model) and the corrected merge (the adapter EMLoC writes). One fresh process
   per run (peak memory is per process); loss and memory do not depend on load, so these run
   without the timing lock (start the bench under `nice -n 10`).
2. smollm2: steps of the three methods in fresh processes (cells.py), SmolLM2 at 512 and 2048
   tokens with the trainer's default engine settings (the Table 1 "exact" row: streamed
   weights, half-block boundaries, chunked attention/MLP, exact chunked loss, 30% trainable
   positions); EMLoC's cell trains on the emulator the quality run built. Step times are
   reported, so each length runs in a child under `flock TIMING_LOCK` (the command line the
   machine's priority watcher boosts; so do not wrap this bench in flock yourself: it would
   wait for itself), the three methods interleaved (lora, lars, emloc), each cell recording
   its load average; the time is the fastest of `--time-steps` steps.
3. llama3b: the same cells on the Llama-3.2-3B shape (random 4-bit weights, 2 blocks measured,
   full depth derived as in table1.py: peak(2) + 26 x resident bytes per block), at 2048
   tokens, with and without weight streaming (without it, EMLoC's smaller weights show).
   Memory only: no lock.

    nice -n 10 python bench/methods.py --parts quality llama3b --steps 30 --lrs 5e-4 2e-3
    python bench/methods.py --parts smollm2 --time-steps 2   # takes the timing lock itself
    nice -n 10 python bench/methods.py --parts quality --lrs 5e-4 --seed 1 --methods lora
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
# the graph engine: the same exact gradients as the default segments engine, ~1.75x faster
# on SmolLM2 (bench/results/engine_speed.md); the memory engine's cost is part 2's subject
TRAIN.update(save_every=0, seed=0, engine="graph")
SPLIT = {"train": 20, "valid": 10, "test": 10}  # records of DATA (40), after a seed-0 shuffle
SCORED = (("val", "valid"), ("test", "test"))  # result key, file of the split
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


def _record_losses(model, cfg, docs) -> list[list[float]]:
    """[loss sum, scored tokens] of each record, scored alone (its own padded row or rows):
    per-record values give the held-out loss a standard error, and paired differences
    between methods on the same records."""
    from mlx_edgelora.batching import pack
    from mlx_edgelora.emloc import heldout_loss

    out = []
    for doc in docs:
        rows = pack([doc], cfg.max_seq_len)
        n = int(sum(mask[1:].sum() for _, mask in rows))
        out.append([heldout_loss(model, cfg, rows) * n, n])
    return out


def _score(model_fn, cfg, docs: dict, res: dict, name: str) -> None:
    """res[name_val], res[name_test]: exact loss of model_fn() over the valid and test records
    (token-weighted), and res[name_records] = {split: per-record [loss sum, tokens]}."""
    model = model_fn()
    recs = {split: _record_losses(model, cfg, d) for split, d in docs.items()}
    res[f"{name}_records"] = recs
    res[f"{name}_val"], res[f"{name}_test"] = (mean_se(recs[k])[0] for k in ("val", "test"))


def mean_se(records: list, minus: list | None = None) -> tuple[float, float]:
    """Token-weighted mean loss over records ([loss sum, tokens] each) and its standard error
    across records (ratio estimator); with `minus` (the same records under another model),
    of the paired difference."""
    import numpy as np

    s, n = np.array(records, dtype=float).T
    if minus is not None:
        s = s - np.array(minus, dtype=float)[:, 0]
    m = s.sum() / n.sum()
    k = len(s)
    se = np.sqrt(k / max(k - 1, 1) * ((s - m * n) ** 2).sum()) / n.sum()
    return float(m), float(se)


def train_child(spec: dict) -> dict:
    """One training run (fresh process); valid and test losses of what it produced."""
    import mlx_edgelora  # noqa: F401,I001  (OpenBLAS before mlx)
    import mlx.core as mx

    from mlx_edgelora import TrainConfig, emloc, emulator, load_dataset, load_model, train
    from mlx_edgelora.dataset import load_documents
    from mlx_edgelora.lora import load_adapters

    seed = spec.get("seed", 0)
    out = WORK / f"{spec['method']}-lr{spec['lr']}-s{spec['steps']}-seed{seed}"
    data_dir = split_data()
    cfg = TrainConfig(
        data=str(data_dir),
        out=str(out),
        steps=spec["steps"],
        lr=spec["lr"],
        overwrite=True,
        **{**TRAIN, "seed": seed},
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
    docs = {k: load_documents(str(data_dir / f"{f}.jsonl"), loaded.tokenizer) for k, f in SCORED}

    def with_adapter(folder, emulated=False):
        def build():
            m = load_model(None).model
            if emulated:
                emulator.install(m, emulator.load(r.emulator_path))
            if folder:
                load_adapters(m, folder)
            return m

        return build

    _score(with_adapter(out), cfg, docs, res, "heldout")  # EMLoC: the corrected merge
    if spec["method"] == "emloc":
        _score(with_adapter(r.emulator_run), cfg, docs, res, "naive_merge")
        _score(with_adapter(r.emulator_run, True), cfg, docs, res, "emulator_lora")
        _score(with_adapter(None, True), cfg, docs, res, "emulator_alone")
    if spec.get("base"):
        _score(with_adapter(None), cfg, docs, res, "base")
    return res


def run_child(kind: str, spec: dict, timeout: int = 3600, lock: bool = False) -> dict:
    """One fresh child process; loss and memory do not depend on load, so no lock unless
    `lock` (--lock-each: each run alone holds TIMING_LOCK, and the watcher's priority, when
    the machine is too loaded for niced runs to finish; each run then holds it a few minutes)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--child-{kind}", json.dumps(spec)]
    cmd = ["flock", TIMING_LOCK, *cmd] if lock else cmd
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
            if args.seed:
                spec.update(seed=args.seed, base=False)
            if _identity(spec) in done and not args.redo:
                continue  # measured already
            r = run_child("train", spec, lock=args.lock_each)
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
    """Run the part's cells not yet in results. smollm2 (timed, unless --memory-only) runs each
    length in a child under `flock TIMING_LOCK` (the command line the machine's priority
    watcher looks for), so every length holds the lock once, its methods interleaved."""
    key, methods, redo = f"memory_{shape}", args.methods, args.redo
    timed = shape == "smollm2" and not args.memory_only
    seqs = args.seqs or [512, 2048]
    plan = [(m, c) for m, c in _plan(shape, args.time_steps) if m in methods and c["seq"] in seqs]
    done = {json.dumps(x["config"], sort_keys=True) for x in results.get(key, [])}
    todo = [(m, c) for m, c in plan if redo or json.dumps(c, sort_keys=True) not in done]
    os.environ["BENCH_LOCK_HELD"] = "1"  # cells.py: no lock of its own (ours, or none)
    if timed and not args.lock_held:
        for seq in sorted({c["seq"] for _, c in todo}):
            print(f"waiting for {TIMING_LOCK} ({seq} tokens) ...", flush=True)
            cmd = ["flock", TIMING_LOCK, sys.executable, str(Path(__file__).resolve())]
            cmd += ["--parts", "smollm2", "--seqs", str(seq), "--lock-held"]
            cmd += ["--time-steps", str(args.time_steps), "--methods", *methods]
            subprocess.run(cmd + (["--redo"] if redo else []), check=True)
        results[key] = json.loads((RESULTS / "methods.json").read_text()).get(key, [])
        return
    for m, c in todo:
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
    key += [row["seed"]] if row.get("seed") else []  # seed 0 rows keep their old identity
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


def _pm(rec: list, minus: list | None = None) -> str:
    m, se = mean_se(rec, minus)
    return f"{m:+.3f} ± {se:.3f}" if minus is not None else f"{m:.3f} ± {se:.3f}"


def _quality_md(q: list[dict]) -> list[str]:
    base = next((r for r in q if r.get("base_records")), {})
    steps = sorted({r["steps"] for r in q})
    split = " / ".join(f"{n} {k}" for k, n in SPLIT.items())
    lines = [
        f"## Quality: SmolLM2-135M Q4_1, sample_chat ({split} records), "
        f"{'/'.join(map(str, steps))} steps of {TRAIN['max_seq_len']} tokens",
        "",
        "Each held-out record is scored alone (exact loss over its completion tokens); a loss "
        "is the token-weighted mean over the split's records, ± its standard error across "
        "records. Differences are paired (same records), so their ± is much smaller than the "
        "losses'. Each method's learning rate is picked on valid (lowest valid loss); its test "
        "loss is the result. EMLoC's row is its corrected merge, the adapter it writes. "
        f"Packed training rows of {TRAIN['max_seq_len']} tokens: {base.get('rows')}.",
        "",
    ]
    bt = base.get("base_records", {}).get("test")
    if bt:
        bv = base["base_records"]["val"]
        lines += [f"Base model: valid {_pm(bv)}, test {_pm(bt)}.", ""]
    best = {}
    for r in q:
        if r.get("seed"):
            continue
        if r["method"] not in best or r["heldout_val"] < best[r["method"]]["heldout_val"]:
            best[r["method"]] = r
    ref = best.get("lora", {}).get("heldout_records", {}).get("test")
    head = ["method", "lr", "valid loss", "test loss", "test − LoRA (paired)"]
    head += ["test − base (paired)", "seed 1 test (same lr)"]
    rows = []
    for m, r in best.items():
        t = r["heldout_records"]["test"]
        again = [x for x in q if x["method"] == m and x["lr"] == r["lr"] and x.get("seed")]
        rows.append(
            [m, f"{r['lr']:g}", _pm(r["heldout_records"]["val"]), _pm(t)]
            + [_pm(t, ref) if ref and m != "lora" else "—", _pm(t, bt) if bt else "—"]
            + [", ".join(_pm(x["heldout_records"]["test"]) for x in again) or "—"]
        )
    lrs = {m: sorted({f"{r['lr']:g}" for r in q if r["method"] == m}) for m in best}
    ran = "; ".join(f"{m}: {', '.join(v)}" for m, v in lrs.items())
    lines += [f"### Best on valid among the learning rates each method ran ({ran})", ""]
    lines += _table(head, rows)
    head = ["method", "lr", "seed", "valid loss", "test loss", "train loss first → last"]
    head += ["training peak GB", "wall s (start loadavg)"]
    rows = [
        [r["method"], f"{r['lr']:g}", r.get("seed", 0), _pm(r["heldout_records"]["val"])]
        + [_pm(r["heldout_records"]["test"])]
        + ["{:.2f} → {:.2f}".format(*r["train_loss_first_last"]), _f(r.get("peak_gb"))]
        + [f"{r.get('wall_s')} ({r['loadavg_at_start'][0]:.0f})"]
        for r in sorted(q, key=lambda r: (r["method"], r["lr"], r.get("seed", 0)))
    ]
    lines += ["### Every run", "", *_table(head, rows)]
    em = [r for r in q if r["method"] == "emloc"]
    rows = [
        [f"{r['lr']:g}", r.get("seed", 0), label, _pm(r[f"{k}_records"]["val"])]
        + [_pm(r[f"{k}_records"]["test"])]
        + [_pm(r[f"{k}_records"]["test"], bt) if bt else "—"]
        for r in em
        for k, label in EMLOC_STAGES
    ]
    if rows:
        head = ["lr", "seed", "stage", "valid loss", "test loss", "test − base (paired)"]
        lines += [f"### EMLoC stages (ratio {RATIO})", "", *_table(head, rows)]
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
        f"{r['peak_gb']:.4f}",
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
    q = [r for r in res.get("quality", []) if r["status"] == "ok" and "heldout_records" in r]
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
    p.add_argument("--lock-held", action="store_true", help=argparse.SUPPRESS)  # our own child
    p.add_argument("--seqs", type=int, nargs="+", help="smollm2: only these lengths (512 2048)")
    p.add_argument("--methods", nargs="+", default=METHODS, help="methods to run")
    p.add_argument("--lock-each", action="store_true", help="quality: each run holds the lock")
    p.add_argument("--seed", type=int, default=0, help="quality: training seed (0: default)")
    p.add_argument("--skip-base", action="store_true", help="do not score the base model")
    p.add_argument("--redo", action="store_true", help="measure runs already in the json")
    p.add_argument("--report", action="store_true", help="only rewrite methods.md from the json")
    args = p.parse_args()
    path = RESULTS / "methods.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        if not args.lock_held:  # the child's command is its parent's
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
