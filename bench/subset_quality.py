"""Subset softmax (paper technique 3) vs the exact loss: gradient fidelity, quality, memory.

Issue 4's benchmark, not a test. Fine-tunes the embedded SmolLM2-135M (Q4_1) on the bundled
prompt/completion set (assets/sample_chat.jsonl, deterministic by-document split) for a fixed
number of steps with --loss full, chunked and subset (k = 256, 1000, 4000): same seed, same
data order, a freshly loaded model per run, through the public API. For each loss it reports
  - grad_cos: cosine similarity of dL/dh (h = the last block's output, the loss head's input)
    with the exact (full) one, on the held-out batches at the initial model and after training;
  - val_exact: the held-out *exact* loss after training (the trainer validates with the exact
    chunked loss whatever --loss trains with);
  - head_peak_mb: peak memory of the loss head alone (loss + dL/dh over --head-rows rows of
    real targets), above its inputs.
Subsets are filled two ways: `predicted` (our default: the targets plus the tokens the model
itself expects most this step) at every k, and the paper's semantic-neighbour fill at
--neighbour-ks. The neighbour fill needs SmolLM2's neighbour table (one-time, ~4 min exact on
this CPU): it is built (or read from the cache) once, before the runs, and its cost reported.

    flock /tmp/edgelora-bench.lock python bench/subset_quality.py --steps 20
(~20 min on the shared 2-core CPU: ~4 min neighbour table, then five fine-tunes)
Writes bench/results/subset_quality.json and .md, after every run (partial results survive).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# isort: off
import mlx_edgelora  # noqa: F401  (first: it preloads OpenBLAS before mlx loads)
import mlx.core as mx

# isort: on
import numpy as np

from mlx_edgelora import (
    TrainConfig,
    blocks,
    checkpoint,
    engine,
    load_dataset,
    load_model,
    loss,
    neighbours,
    quant,
    train,
)
from mlx_edgelora.batching import iter_eval_batches

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "assets" / "sample_chat.jsonl"
RESULTS = ROOT / "bench" / "results"
MB = 1024**2


Spec = tuple[str, str, int, str]  # (name, --loss, subset_k, --subset-fill)


def run_specs(losses: list[str], ks: list[int], neighbour_ks: list[int]) -> list[Spec]:
    """One spec per run: chunked (the exact reference) first, full last.

    Subsets use --subset-fill predicted at every k in `ks` ("subset-k") and the paper's
    semantic-neighbour fill at `neighbour_ks` ("subset-k-neighbours"). full and chunked train
    identically (equal to 1e-5, tests/test_loss.py), so full goes last: if time runs out, the
    comparison that matters is already written.
    """
    runs = [("chunked", "chunked", 0, "")] if "chunked" in losses else []
    if "subset" in losses:
        runs += [(f"subset-{k}", "subset", k, "predicted") for k in ks]
        runs += [(f"subset-{k}-neighbours", "subset", k, "neighbours") for k in neighbour_ks]
    return runs + ([("full", "full", 0, "")] if "full" in losses else [])


def fresh_model():
    """The embedded SmolLM2, prepared as the trainer prepares it (no LoRA: B = 0 at init)."""
    loaded = load_model(None)
    quant.prepare_for_training(loaded.model)
    return loaded


def last_hidden(model, batch) -> mx.array:
    """The last block's output [B, L, D] (the loss head's input), evaluated block by block."""
    h = blocks.embed(model, mx.array(batch.inputs))
    for i in range(len(blocks.layers(model))):
        h = blocks.block_forward(model, i, h, 512, 256)
        mx.eval(h)
    return h


def hidden_grads(model, head, hs, batches) -> list[np.ndarray]:
    """dL/dh of `head` for each (h, batch), as flat float64 vectors."""
    out = []
    for h, batch in zip(hs, batches):
        g = mx.grad(lambda h, b=batch: head(h, b))(h)
        mx.eval(g)
        out.append(np.array(g, dtype=np.float64).ravel())
    return out


def head_cfg(cfg, k: int, fill: str) -> SimpleNamespace:
    return SimpleNamespace(
        vocab_chunk=cfg.vocab_chunk,
        subset_k=k,
        subset_fill=fill or "predicted",
        subset_tail=cfg.subset_tail,
    )


def make_head(model, kind: str, k: int, fill: str, cfg, table: np.ndarray | None = None):
    """The trainer's loss head; a neighbour-fill head uses `table` if given (else the cache)."""
    if kind == "subset":
        return loss.LossHead(model, kind, loss.subset_loss(model, head_cfg(cfg, k, fill), table))
    return loss.make_loss_head(model, kind, head_cfg(cfg, k, fill))


def grad_cosines(model, cfg, batches, kinds: dict, table=None) -> dict[str, dict]:
    """Per head: cosine and norm ratio of its dL/dh with the full loss's (over all batches),
    and for subsets the exact softmax mass outside S (mean over rows): what S leaves out."""
    hs = [last_hidden(model, b) for b in batches]
    ref = np.concatenate(hidden_grads(model, make_head(model, "full", 0, "", cfg), hs, batches))
    out = {}
    for name, (kind, k, fill) in kinds.items():
        head = make_head(model, kind, k, fill, cfg, table)
        g = np.concatenate(hidden_grads(model, head, hs, batches))
        out[name] = {
            "cos": float(g @ ref / (np.linalg.norm(g) * np.linalg.norm(ref))),
            "norm_ratio": float(np.linalg.norm(g) / np.linalg.norm(ref)),
        }
        if kind == "subset":
            out[name]["mass_outside_s"] = mass_outside(model, cfg, hs, batches, k, fill, table)
    return out


def mass_outside(model, cfg, hs, batches, k: int, fill: str, table) -> float:
    """Mean over trainable rows of the exact softmax probability of tokens outside S."""
    V, _ = loss.head_shape(model)
    w = loss.head_weight_rows(model)
    if fill == "neighbours" and table is None:
        table = neighbours.neighbour_table(model)
    masses = []
    for h, batch in zip(hs, batches):
        idx = np.flatnonzero(np.asarray(batch.mask).ravel())
        targets = np.asarray(batch.targets).ravel()[idx]
        x = blocks.final_norm(model)(h.reshape(-1, h.shape[-1])[mx.array(idx)])
        x = x.astype(mx.float32)
        if fill == "neighbours":
            s = loss.subset_for(targets, table, k, V)
        else:
            s = loss.subset_predicted(x, targets, model, k, cfg.vocab_chunk)
        p = mx.softmax(x @ w.T, axis=-1)  # [N, V]: a few hundred rows
        masses.append(np.array(1 - p[:, mx.array(s)].sum(-1)))
    return float(np.concatenate(masses).mean())


def partial_table(model, batches, n: int = neighbours.DEFAULT_NEIGHBOURS) -> np.ndarray:
    """[V, n] table whose rows are exact only for the batches' targets (the rows subset_for
    reads): --quick measures the subset gradient without the one-time 4-minute table."""
    V, _ = loss.head_shape(model)
    ids = np.unique(np.concatenate([np.asarray(b.targets)[np.asarray(b.mask)] for b in batches]))
    w = loss.head_weight_rows(model)
    w = w / mx.linalg.norm(w, axis=-1, keepdims=True)
    sims = w[mx.array(ids)] @ w.T  # [T, V] exact cosines of the needed rows only
    sims[mx.arange(len(ids)), mx.array(ids)] = -mx.inf  # self excluded, as in the table
    table = np.zeros((V, n), np.int32)
    table[ids] = np.array(mx.argsort(-sims, axis=-1)[:, :n])
    return table


def head_peak_mb(head, D: int, targets: np.ndarray) -> float:
    """Peak MB of loss + dL/dh over len(targets) rows, above what was allocated before."""
    rng = np.random.default_rng(0)
    n = len(targets)
    h = mx.array(rng.normal(size=(1, n, D)).astype(np.float32))
    batch = SimpleNamespace(targets=targets[None, :], mask=np.ones((1, n), bool))
    mx.eval(h)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    value, grad = mx.value_and_grad(lambda h: head(h, batch))(h)
    mx.eval(value, grad)
    peak = (mx.get_peak_memory() - base) / MB
    del value, grad
    return peak


def head_peaks(cfg, specs, targets: np.ndarray) -> dict[str, float]:
    model = fresh_model().model
    D = loss.head_shape(model)[1]
    out = {}
    for name, kind, k, fill in specs:
        head = make_head(model, kind, k, fill, cfg)
        out[name] = round(head_peak_mb(head, D, targets), 1)
        print(f"loss head peak {name}: {out[name]} MB", file=sys.stderr)
    return out


def neighbour_table_once() -> dict:
    """Build (or read) SmolLM2's neighbour table once, timed, so no run pays it silently."""
    model = fresh_model().model
    V, _ = loss.head_shape(model)
    path = neighbours.cache_root() / f"{neighbours.head_fingerprint(model)}"
    cached = any(path.parent.glob(f"{path.name}-*-n{neighbours.DEFAULT_NEIGHBOURS}.npy"))
    print(
        f"neighbour table: {'reading cache' if cached else 'building once (~4 min)'} "
        f"under {neighbours.cache_root()}",
        file=sys.stderr,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    neighbours.neighbour_table(model)
    return {
        "cached_before": cached,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "cache_dir": str(neighbours.cache_root()),
        "method": "exact"
        if V * V * loss.head_shape(model)[1] <= neighbours.EXACT_MAX_MACS
        else "approx",
    }


def real_targets(data, n: int) -> np.ndarray:
    """n trainable target tokens from the training rows (repeated if needed): real frequencies."""
    t = np.concatenate([tok[1:][m[1:]] for tok, m in data.train_rows]).astype(np.int32)
    return np.resize(t, n)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ks", type=int, nargs="+", default=[256, 1000, 4000])
    p.add_argument(
        "--neighbour-ks",
        type=int,
        nargs="*",
        default=[1000],
        help="subset sizes also run with the paper's semantic-neighbour fill",
    )
    p.add_argument(
        "--train-losses",
        nargs="+",
        default=["chunked", "subset", "full"],
        help="losses to fine-tune with; gradient cosines and head peaks are measured for all",
    )
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--head-rows", type=int, default=2048)
    p.add_argument(
        "--quick",
        type=int,
        default=0,
        help="only dL/dh cosines at the initial model on the first N held-out rows, with "
        "neighbour rows computed for their targets only (~1 min; no table, no training)",
    )
    p.add_argument(
        "--peaks-only",
        action="store_true",
        help="only re-measure the loss-head peaks, into the existing results at --out",
    )
    p.add_argument(
        "--no-tail",
        action="store_true",
        help="predicted-fill subsets renormalize over S (the paper's loss) instead of counting "
        "the rest of the vocabulary as one pseudo-token (--subset-tail, our default)",
    )
    p.add_argument(
        "--corpus",
        help="held-out mode: bundled | licenses (Debian's /usr/share/common-licenses, a document "
        "folder) | pydoc (Python's own help topics as prompt/completion) | a folder or file; "
        "trains --variants per --seeds, reports exact validation and test loss",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval-rows", type=int, default=0, help="held-out mode: cap val/test rows")
    p.add_argument(
        "--val-rows", type=int, help="held-out mode: cap validation rows (default --eval-rows)"
    )
    p.add_argument(
        "--engine",
        default="graph",
        help="held-out mode: --engine for training (graph, with --no-stream-weights: the "
        "fastest on this CPU; the loss is engine-invariant, tests/test_engine.py)",
    )
    p.add_argument(
        "--merge",
        nargs="*",
        default=[],
        help="with --report: also take the rows of these .json results (same settings; e.g. "
        "other seeds run in parallel with another --out)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="held-out mode: only rewrite the .md summary from the cached .json rows",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["chunked", "subset-1000", "subset-1000-r8"],
        help="held-out mode: chunked | subset-K | subset-K-rN (--subset-refresh N) | "
        "sampled-K-rN (--subset-fill sampled)",
    )
    p.add_argument(
        "--run-dir",
        default=str(ROOT / "bench" / "tmp_subset_runs"),
        help="held-out mode: each run's --out, checkpointed every --save-every steps, so a "
        "killed invocation resumes a run mid-way (removed once its row is written)",
    )
    p.add_argument("--save-every", type=int, default=10, help="held-out mode: checkpoint cadence")
    p.add_argument("--out", default=str(RESULTS / "subset_quality"))
    args = p.parse_args(argv)
    if args.corpus:
        return heldout(args)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    specs = run_specs(["full", "chunked", "subset"], args.ks, args.neighbour_ks)
    train_specs = run_specs(args.train_losses, args.ks, args.neighbour_ks)
    base = dict(
        data=str(DATA),
        steps=args.steps,
        max_seq_len=args.max_seq_len,
        lr=args.lr,
        warmup=max(1, args.steps // 10),
        val_fraction=args.val_fraction,
        seed=0,
        eval_every=0,
        eval_batches=-1,
        save_every=0,
        activations="ram",
        overwrite=True,
        subset_tail=not args.no_tail,
    )
    cfg0 = TrainConfig(**base)
    data = load_dataset(str(DATA), load_model(None).tokenizer, cfg0)  # one split, one order
    val_batches = list(iter_eval_batches(data.val_rows, 1, None))
    if args.quick:
        return quick(args, cfg0, val_batches[: args.quick], specs, load_start, t_start)
    if args.peaks_only:
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
        peaks = head_peaks(cfg0, specs, real_targets(data, args.head_rows))
        for name, mb in peaks.items():
            result["runs"].setdefault(name, {})["head_peak_mb"] = mb
        result["head_peaks_measured"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        write(result, Path(args.out))
        return result
    table = neighbour_table_once() if args.neighbour_ks else {"method": "not needed"}
    peaks = head_peaks(cfg0, specs, real_targets(data, args.head_rows))

    model = fresh_model().model
    cos0 = grad_cosines(model, cfg0, val_batches, {n: (kd, k, f) for n, kd, k, f in specs})
    del model
    runs = {
        n: {
            "loss": kind,
            "subset_k": k or None,
            "subset_fill": fill or None,
            "head_peak_mb": peaks[n],
            "init": cos0[n],
        }
        for n, kind, k, fill in specs
    }
    result = {
        "runs": runs,
        "neighbour_table": table,
        "settings": vars(args)
        | {
            "data": str(DATA.relative_to(ROOT)),
            "train_rows": len(data.train_rows),
            "val_rows": len(data.val_rows),
            "train_tokens": data.trainable_tokens("train"),
            "val_tokens": data.trainable_tokens("val"),
            "vocab_chunk": cfg0.vocab_chunk,
        },
        "loadavg_start": load_start,
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, k, fill in train_specs:
            cfg = TrainConfig(
                **base,
                loss=kind,
                subset_k=k or 1000,
                subset_fill=fill or "predicted",
                out=f"{tmp}/{name}",
            )
            loaded = fresh_model()  # train() applies LoRA to this model in place
            t0 = time.perf_counter()
            res = train(cfg, loaded=loaded, data=data)
            wall = time.perf_counter() - t0
            runs[name] |= {
                "val_exact": res.val_loss,
                "train_loss_last": [r for r in res.history if "loss" in r][-1]["loss"],
                "trained": grad_cosines(loaded.model, cfg0, val_batches, {name: (kind, k, fill)})[
                    name
                ],
                "train_wall_s": round(wall, 1),
                "step_s": round(wall / args.steps, 2),
            }
            print(f"{name}: {runs[name]}", file=sys.stderr)
            del loaded
            gc.collect()
            exact = [runs[n]["val_exact"] for n in ("chunked", "full") if "val_exact" in runs[n]]
            for r in runs.values():
                if "val_exact" in r and exact:
                    r["val_exact_rel"] = r["val_exact"] / exact[0] - 1
            result |= {
                "loadavg_end": os.getloadavg(),
                "wall_s": round(time.perf_counter() - t_start, 1),
            }
            write(result, Path(args.out))  # after every run: partial results survive
    return result


# --- held-out mode (issue 21): other corpora, seeds, train / validation / test ---------------


def corpus_path(name: str, tmp: str) -> str:
    """A corpus a user could have, materialized under `tmp` in a format --data reads."""
    if name == "bundled":
        return str(DATA)
    if name == "licenses":  # real documents shipped by Debian; symlinks (GPL -> GPL-3) once
        folder = Path(tmp) / "licenses"
        folder.mkdir()
        seen = set()
        for f in sorted(Path("/usr/share/common-licenses").iterdir()):
            if f.resolve() not in seen and f.resolve().is_file():
                seen.add(f.resolve())
                (folder / f"{f.name}.txt").write_text(f.resolve().read_text(errors="replace"))
        return str(folder)
    if name == "pydoc":  # Python's own help topics (pydoc_data): prompt = topic, completion = text
        from pydoc_data.topics import topics

        path = Path(tmp) / "pydoc.jsonl"
        with open(path, "w") as f:
            for topic, text in sorted(topics.items()):
                prompt = f"Explain the Python language topic '{topic}'."
                f.write(json.dumps({"prompt": prompt, "completion": text.strip()}) + "\n")
        return str(path)
    return name


def variant_cfg(variant: str) -> dict:
    """'chunked' | 'subset-K' | 'subset-K-rN' -> TrainConfig loss options."""
    if variant == "chunked":
        return {"loss": "chunked"}
    parts = variant.split("-")
    opts = {"loss": "subset", "subset_k": int(parts[1])}
    if parts[0] == "sampled":
        opts["subset_fill"] = "sampled"
    if len(parts) > 2:
        opts["subset_refresh"] = int(parts[2].lstrip("r"))
    return opts


def split_val_test(data, cap: int = 0, val_cap: int | None = None):
    """The trainer's held-out rows (split by document) cut in two contiguous halves: the
    first is validation (what any tuning may look at), the second the test set reported;
    `cap` > 0 keeps the first `cap` rows of the test half, `val_cap` (default `cap`) of the
    validation half (evaluation time on a loaded CPU)."""
    half = len(data.val_rows) // 2
    val, test = data.val_rows[:half], data.val_rows[half:]
    val_cap = cap if val_cap is None else val_cap
    if cap:
        test = test[:cap]
    if val_cap:
        val = val[:val_cap]
    return dataclasses.replace(data, val_rows=val), test


def exact_loss(model, cfg, rows) -> float:
    """Mean exact (chunked) CE over every trainable token of `rows`."""
    head = loss.exact_loss_head(model, cfg)
    total = count = 0
    for batch in iter_eval_batches(rows, 1, None):
        s, n = engine.forward_loss(model, cfg, head, batch)
        total, count = total + s, count + n
    return total / max(count, 1)


def heldout(args) -> dict:
    """Train each variant per seed on --corpus; exact validation and test loss of each,
    relative to exact-CE training with the same seed; mean and spread over seeds."""
    t_start, load_start = time.perf_counter(), os.getloadavg()
    out = Path(args.out)
    result = {"settings": vars(args), "loadavg_start": load_start, "mlx": mx.__version__}
    cached = cached_runs(out, result["settings"])
    if args.report:
        result = json.loads(out.with_suffix(".json").read_text())
        for other in args.merge:  # rows of parallel invocations (other seeds), same settings
            for variant, seeds in cached_runs(Path(other), result["settings"]).items():
                result["runs"].setdefault(variant, {}).update(seeds)
        seeds = {int(s) for r in result["runs"].values() for s in r}
        result["settings"]["seeds"] = sorted(seeds)
        result["merged"] = args.merge
        summarize_heldout(result)
        write_heldout(result, out)
        return result
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(
            data=corpus_path(args.corpus, tmp), steps=args.steps, max_seq_len=args.max_seq_len,
            lr=args.lr, warmup=max(1, args.steps // 10), val_fraction=args.val_fraction,
            eval_every=0, eval_batches=-1, activations="ram",
            engine=args.engine, stream_weights=args.engine == "segments",
        )  # fmt: skip
        cfg0 = TrainConfig(**base, save_every=0)
        pooled = load_dataset(base["data"], load_model(None).tokenizer, cfg0)
        data, test_rows = split_val_test(pooled, args.eval_rows, args.val_rows)
        result["split"] = {
            "documents": data.n_documents, "train_rows": len(data.train_rows),
            "val_rows": len(data.val_rows), "test_rows": len(test_rows),
            "val_tokens": data.trainable_tokens("val"),
            "test_tokens": int(sum(np.asarray(m[1:]).sum() for _, m in test_rows)),
        }  # fmt: skip
        runs = result["runs"] = cached
        for seed in args.seeds:
            for variant in args.variants:
                if str(seed) in runs.get(variant, {}):
                    continue  # cached by an earlier, interrupted invocation
                run_out = Path(args.run_dir) / (
                    f"{Path(args.corpus).name}-{args.steps}x{args.max_seq_len}-{variant}-s{seed}"
                )
                start = resume_step(run_out, args.steps)
                cfg = TrainConfig(
                    **base, **variant_cfg(variant), seed=seed, out=str(run_out),
                    save_every=args.save_every, resume=start > 0, overwrite=start == 0,
                )  # fmt: skip
                loaded = fresh_model()
                t0 = time.perf_counter()
                res = train(cfg, loaded=loaded, data=data)
                steps = logged_steps(run_out)  # all steps, also those before a resume
                runs.setdefault(variant, {})[str(seed)] = {
                    "val_exact": res.val_loss,
                    "test_exact": exact_loss(loaded.model, cfg, test_rows),
                    "train_loss_last": steps[-1]["loss"],
                    "approx_steps": sum(not r.get("loss_exact", True) for r in steps),
                    "resumed_at_step": start,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "loadavg": os.getloadavg(),
                }
                print(f"{args.corpus} seed {seed} {variant}: {runs[variant][str(seed)]}")
                del loaded
                gc.collect()
                summarize_heldout(result)
                result["settings"]["seeds"] = sorted({int(s) for r in runs.values() for s in r})
                result["wall_s"] = round(time.perf_counter() - t_start, 1)
                result["loadavg_end"] = os.getloadavg()
                write_heldout(result, out)
                shutil.rmtree(run_out)  # its row is written: the checkpoints are not needed
    return result


def resume_step(run_out: Path, steps: int) -> int:
    """The step a killed run of `run_out` resumes from (0: start afresh). A run that finished
    training but was killed before its row was written is trained again (its adapter alone
    is not kept apart from the checkpoints; rare, and correct)."""
    if not run_out.is_dir():
        return 0
    folder, saved, _ = checkpoint.find(run_out)
    if folder is None or saved["step"] >= steps:
        shutil.rmtree(run_out)
        return 0
    print(f"{run_out}: resuming at step {saved['step']}", file=sys.stderr)
    return int(saved["step"])


def logged_steps(run_out: Path) -> list[dict]:
    """Every training step's record of the run's metrics.jsonl (--resume keeps earlier ones)."""
    lines = (run_out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# settings that must match for cached rows to be reused (the rest: what to run, where)
SAME = ("corpus", "steps", "max_seq_len", "lr", "val_fraction", "eval_rows", "val_rows")


def cached_runs(out: Path, settings: dict) -> dict:
    """Rows of an earlier invocation with the same settings (a killed bench resumes); the
    settings are those the rows depend on, so the engine may differ (engine-invariant)."""
    path = out.with_suffix(".json") if out.suffix != ".json" else out
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if any(old["settings"].get(k) != settings.get(k) for k in SAME):
        print(f"{path}: other settings, its rows are not reused", file=sys.stderr)
        return {}
    return old.get("runs", {})


def summarize_heldout(result: dict) -> None:
    """Per variant: relative test / validation loss vs chunked per seed, mean and spread."""
    ref = result["runs"].get("chunked", {})
    for seeds in result["runs"].values():
        for seed, r in seeds.items():
            if seed in ref:
                r["test_rel"] = r["test_exact"] / ref[seed]["test_exact"] - 1
                r["val_rel"] = r["val_exact"] / ref[seed]["val_exact"] - 1


def write_heldout(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    s, sp = result["settings"], result["split"]
    lines = [
        f"# Subset softmax on held-out data: corpus `{s['corpus']}` (bench/subset_quality.py)",
        "",
        f"SmolLM2-135M Q4_1, {s['steps']} steps, seq {s['max_seq_len']}, lr {s['lr']}, seeds "
        f"{s['seeds']}; {sp['documents']} documents -> {sp['train_rows']} train / "
        f"{sp['val_rows']} validation / {sp['test_rows']} test rows ({sp['val_tokens']} / "
        f"{sp['test_tokens']} trainable tokens). Exact (chunked) loss; rel = vs exact-CE "
        f"training with the same seed. Load average {result['loadavg_start'][0]:.1f} at start; "
        f"{result.get('wall_s', '')} s so far.",
        "",
        "Command (niced, no lock: losses do not depend on load; one invocation per seed, the "
        "rows of earlier ones are read back from the .json):",
        "",
        f"    nice -n 10 python bench/subset_quality.py --corpus {s['corpus']} --steps "
        f"{s['steps']} --max-seq-len {s['max_seq_len']} --lr {s['lr']} --val-fraction "
        f"{s['val_fraction']} --eval-rows {s['eval_rows']} --val-rows {s['val_rows']} --engine "
        f"{s['engine']} --seeds S --variants {' '.join(s['variants'])} --out {s['out']}",
        "",
        "| variant | seed | validation exact | rel | test exact | rel | approx. steps | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, seeds in result["runs"].items():
        for seed, r in seeds.items():
            rel = {k: f"{100 * r[k]:+.2f}%" if k in r else "" for k in ("val_rel", "test_rel")}
            lines.append(
                f"| {variant} | {seed} | {r['val_exact']:.4f} | {rel['val_rel']} "
                f"| {r['test_exact']:.4f} | {rel['test_rel']} | {r['approx_steps']} "
                f"| {r['wall_s']} |"
            )
    lines += ["", *summary_lines(result)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


TARGET = 0.005  # issue 21: held-out exact loss within 0.5% of exact-CE training


def summary_lines(result: dict) -> list[str]:
    """Per variant over the seeds that have an exact-CE reference: mean and sample sd of the
    relative test (and validation) loss, and the verdict: within 0.5% outside the seed spread
    means mean + sd <= +0.5% (the whole one-sd band under the target)."""
    lines = [
        "Summary over seeds (rel = test exact loss / exact-CE training's, same seed, - 1; "
        "sd = sample standard deviation over seeds; 'within 0.5%' = mean + sd <= +0.50%):",
        "",
        "| variant | seeds | test exact mean ± sd | test rel mean ± sd | validation rel mean "
        "± sd | within 0.5% outside the spread |",
        "|---|---|---|---|---|---|",
    ]
    for variant, seeds in result["runs"].items():
        done = [r for r in seeds.values() if "test_rel" in r]
        if not done:
            continue
        test = [r["test_exact"] for r in done]
        rel, vrel = [r["test_rel"] for r in done], [r["val_rel"] for r in done]

        def ms(v, pct=True):
            sd = np.std(v, ddof=1) if len(v) > 1 else float("nan")
            return f"{100 * np.mean(v):+.2f}% ± {100 * sd:.2f}" if pct else (
                f"{np.mean(v):.4f} ± {sd:.4f}")  # fmt: skip

        if variant == "chunked":
            verdict = "(reference)"
        elif len(rel) < 2:
            verdict = "not established (one seed)"
        else:
            top = np.mean(rel) + np.std(rel, ddof=1)
            verdict = f"{'yes' if top <= TARGET else 'no'} (mean + sd = {100 * top:+.2f}%)"
        lines.append(
            f"| {variant} | {len(done)} | {ms(test, False)} | {ms(rel)} | {ms(vrel)} | {verdict} |"
        )
    return lines


def quick(args, cfg, batches, specs, load_start, t_start) -> dict:
    """--quick: initial-model gradient cosines only (see the flag's help)."""
    model = fresh_model().model
    t0 = time.perf_counter()
    table = partial_table(model, batches)
    cos = grad_cosines(model, cfg, batches, {n: (kd, k, f) for n, kd, k, f in specs}, table)
    rows = sum(int(np.asarray(b.mask).sum()) for b in batches)
    result = {
        "runs": {
            n: {"loss": kd, "subset_k": k or None, "subset_fill": f or None, "init": cos[n]}
            for n, kd, k, f in specs
        },
        "neighbour_table": {
            "method": f"--quick: exact rows for the targets of {rows} held-out tokens only",
            "wall_s": round(time.perf_counter() - t0, 1),
        },
        "settings": vars(args) | {"val_tokens": rows},
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "mlx": mx.__version__,
    }
    write(result, Path(args.out))
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    s, t = result["settings"], result["neighbour_table"]
    lines = [
        "# Subset softmax vs exact loss (SmolLM2-135M Q4_1, bench/subset_quality.py)",
        "",
        "Predicted-fill subsets: "
        + (
            "softmax renormalized over S (`--no-tail`, the paper's loss)."
            if s.get("no_tail")
            else "S plus one pseudo-token for the rest of the vocabulary (`--subset-tail`, "
            "our default: exact loss value)."
        ),
        "",
        (
            f"--quick: no training, initial model; seq {s['max_seq_len']}, "
            if s.get("quick")
            else f"{s['steps']} steps, seq {s['max_seq_len']}, lr {s['lr']}, "
        )
        + f"{s.get('train_rows', '-')} train / {s.get('val_rows', '-')} held-out rows "
        f"({s['val_tokens']} held-out trainable tokens); "
        + ("" if s.get("quick") else f"loss-head peak over {s['head_rows']} rows of real targets; ")
        + "load average start/end "
        f"{result['loadavg_start'][0]:.2f}/{result['loadavg_end'][0]:.2f}; "
        f"{result['wall_s']} s so far.",
        f"Neighbour table ({t['method']}): "
        + (
            f"{'read from cache' if t['cached_before'] else 'built'} once before the runs in "
            f"{t['wall_s']} s wall ({t['cpu_s']} CPU-s), then cached."
            if "cached_before" in t
            else f"{t['wall_s']} s for everything after loading."
            if "wall_s" in t
            else ""
        ),
        "",
        "| loss | dL/dh cos (init) | norm ratio | p mass outside S | cos (trained) | "
        "held-out exact loss | vs exact run | loss-head peak MB | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        init, trained = r["init"], r.get("trained", {})
        outside = init.get("mass_outside_s")
        cells = [
            name,
            f"{init['cos']:.4f}",
            f"{init['norm_ratio']:.3f}",
            "" if outside is None else f"{outside:.3f}",
            f"{trained['cos']:.4f}" if trained else "not trained",
            f"{r['val_exact']:.4f}" if "val_exact" in r else "",
            f"{100 * r['val_exact_rel']:+.2f}%" if "val_exact_rel" in r else "",
            str(r.get("head_peak_mb", "")),
            str(r.get("step_s", "")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
