"""The memory plan against measured peaks: every bench row we have, planned vs measured.

Why: the planner (mlx_edgelora/planner.py) trusts plan.estimate to keep a run under its budget,
so the estimate must never be under a measured peak and should be within 15% of it.

Two kinds of rows:
- "fresh": measured here (`--measure`, niced; memory does not depend on load): real
  optimizer steps (bench/engine_speed.Runner: forward, backward, AdamW update, as the trainer
  runs them) on SmolLM2-135M (embedded GGUF; `smollm2:6` = its first 6 blocks) and
  random-weight INT4 mlx-lm folders (bench/make_random_model.py, bf16 scales:
  `qwen0.5b:4` = the Qwen2.5-0.5B shape at 4 blocks, `llama3b:2` = Llama-3.2-3B at 2), one
  configuration per process; the peak is `mx.get_peak_memory()` of step 2 (AdamW's moments
  exist from the first update on; steps 2 and 3 always measured the same), reset after setup.
  Each row records the fingerprint of the step-memory code it ran (CODE_FILES); cached in
  results/plan_accuracy_rows.jsonl.
- "recorded": the rows in results/trainer_rows.jsonl (the trainer's reported peak) and the
  bench/cells.py cells in table1_cells.jsonl, peak_memory.json and methods.json (ONE
  forward+backward, no optimizer update: planned with the LoRA weights and their gradient
  only, not AdamW's moments). Rows the planner does not plan (full fine-tuning, LARS, EMLoC,
  mlx-lm's own trainer) are left out, with a count.

Only rows measured with the current step-memory code (same fingerprint; a recorded row
carrying a "commit" is checked at that commit) count toward the target; the others are
listed in their own table, labelled "older code", not hidden.

    nice -n 10 python bench/plan_accuracy.py --measure [--only smollm2,qwen0.5b]
    python bench/plan_accuracy.py --report          # results/plan_accuracy.{json,md}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# isort: off
import mlx_edgelora  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx

# isort: on

RESULTS = Path(__file__).parent / "results"
FRESH = RESULTS / "plan_accuracy_rows.jsonl"
GB = 1024**3
VARIANTS = {
    "defaults": {},
    "activations ram": {"activations": "ram"},
    "no stream weights": {"stream_weights": False},
    "no stream state": {"stream_state": False},
    "no split blocks": {"split_blocks": False},
    "checkpoint-every 2": {"checkpoint_every": 2},
    "cache last": {"cache_policy": "last"},
    "graph": {"engine": "graph", "activations": "ram", "stream_weights": False},
}
# The phases that decide the plan's peak: the loss head (defaults at 512), one segment's
# recompute (whole blocks, two blocks, 2048 tokens), the cached last segment, boundaries in RAM,
# resident weights. (model, context, variants); SmolLM2 at 6 of its 30 blocks: the phases are
# per segment or the loss head, the depth only adds boundaries and LoRA state, which the plan
# counts exactly; a row takes ~1-2 min when idle, a Llama-3B 2-block row at 2048 tokens ~6.
ALL = [
    "defaults",
    "no split blocks",
    "cache last",
    "activations ram",
    "checkpoint-every 2",
    "no stream weights",
]
FRESH_ROWS = [  # the most telling first (a run on a shared CPU may not get to the end)
    ("smollm2:6", 512, ALL[:1]),
    ("qwen0.5b:4", 512, ALL[:2]),
    ("smollm2:6", 2048, ALL[:2]),
    ("smollm2:6", 512, ALL[1:3]),
    ("qwen0.5b:4", 512, ALL[2:3]),
    ("smollm2:6", 2048, ALL[2:]),
    ("smollm2:6", 512, ALL[3:]),
    ("llama3b:2", 2048, ["defaults", "no split blocks"]),
    ("qwen3b:2", 2048, ["defaults"]),
    # long contexts: the attention half's per-token terms (one block: the phases are per unit)
    ("llama3b:1", 8192, ["defaults"]),
    ("llama3b:1", 16384, ["defaults"]),
]
# The modules whose code decides a step's memory: a row measured with other versions of them
# is "older code" (plan.py and planner.py only estimate, so they are not here).
CODE_FILES = [
    "engine.py", "fused_lora.py", "tokenwise.py", "attention.py", "loss.py", "spill.py",
    "stream.py", "state.py", "quant.py", "lora.py", "blocks.py", "precision.py",
]  # fmt: skip
ROOT = Path(__file__).parent.parent


def code_fingerprint(commit: str | None = None) -> str:
    """A short hash of CODE_FILES' git blobs, in the work tree or at `commit`."""
    paths = [f"mlx_edgelora/{f}" for f in CODE_FILES]
    if commit:
        cmd = ["git", "rev-parse", *(f"{commit}:{p}" for p in paths)]
    else:
        cmd = ["git", "hash-object", *paths]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return hashlib.sha256(out.encode()).hexdigest()[:12]


def _model_path(model: str) -> str | None:
    if model.split(":")[0] == "smollm2":
        return None
    from make_random_model import build

    shape, layers = model.split(":")
    return str(build(shape, int(layers)))


def _layers(model: str) -> int | None:
    """SmolLM2's first N blocks (`smollm2:N`); the random folders are built at their depth."""
    name, _, n = model.partition(":")
    return int(n) if name == "smollm2" and n else None


class PhaseTracker:
    """The peak of each phase of a step: `mark(name)` closes the running phase (its peak is
    mx.get_peak_memory() since the last mark) and starts `name` with the peak reset. Resetting
    the peak counter allocates nothing, so the step's peak is the largest phase's.

    `install()` marks at the entry of the segment engine's phases (engine.SegmentStep: the
    forward, the loss head with what runs inside its VJP, each segment's recompute under VJP,
    the hand-over of its gradients to the optimizer) and of the optimizer update (the bench's
    Runner); the graph engine's step is one phase."""

    def __init__(self):
        self.phases: list[dict] = []
        self.name: str | None = None
        self._backward = False

    def mark(self, name: str | None) -> None:
        if self.name is not None:  # (a reset peak stays 0 until the next allocation)
            peak = max(mx.get_peak_memory(), mx.get_active_memory()) / GB
            self.phases[-1]["peak_gb"] = round(max(peak, self.phases[-1]["start_gb"]), 4)
        self.name = name
        if name is not None:
            self.phases.append({"phase": name, "start_gb": round(mx.get_active_memory() / GB, 4)})
        mx.reset_peak_memory()

    def install(self, runner) -> None:
        from mlx_edgelora import engine

        step = runner.step_fn
        if not isinstance(step, engine.SegmentStep):
            self._wrap(step, "__call__", lambda *a: "graph step")
            return
        kind = {("attn",): "attn", ("mlp",): "mlp"}

        def unit_names(us) -> str:
            return "+".join(f"{i}{kind.get(tuple(h), 'block')}" for i, h in us)

        self._wrap(step, "_forward", lambda *a: "forward")
        self._wrap(step, "_loss_and_vjp", lambda *a: "loss head")
        self._wrap(step, "_backward", lambda *a: None, backward=True)
        # one segment's recompute: _segment_vjp (the MLP half by rows, or _vjp), or _vjp
        vjp = "_segment_vjp" if hasattr(step, "_segment_vjp") else "_vjp"
        self._wrap(step, vjp, lambda us, *a: f"recompute {unit_names(us)}", in_backward=True)
        self._wrap(step, "_hand_over", lambda j, us, *a: "hand over")

    def _wrap(self, obj, attr: str, name, backward=False, in_backward=False) -> None:
        fn = getattr(obj, attr)

        def wrapped(*a, **k):
            if backward:
                self._backward = True
                try:
                    return fn(*a, **k)
                finally:
                    self._backward = False
            if not in_backward or self._backward:
                self.mark(name(*a))
            return fn(*a, **k)

        setattr(obj, attr, wrapped)


def measure_child(model: str, seq: int, variant: str) -> dict:
    from engine_speed import Runner

    code = code_fingerprint()  # the code this process imported, before it can change on disk
    tracker = PhaseTracker()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:  # bench/tmp*: ignored
        r = Runner(VARIANTS[variant], seq, f"{tmp}/out", _layers(model), _model_path(model))
        r.step()  # AdamW's moments exist from here on
        tracker.install(r)
        _wrap_update(r, tracker)
        mx.reset_peak_memory()
        tracker.mark("step start")
        r.step()
        tracker.mark(None)
        peak = max(p["peak_gb"] for p in tracker.phases)
        r.close()
    return {
        "source": "fresh",
        "model": model,
        "seq": seq,
        "variant": variant,
        "measured_gb": round(peak, 4),
        "code": code,
        "phases": tracker.phases,
    }


def _wrap_update(runner, tracker: PhaseTracker) -> None:
    """Mark the optimizer update of the Runner's step (SegmentOptimizer.apply, or the
    in-memory trainer's update)."""
    from mlx_edgelora import trainer

    if runner.state is not None:
        tracker._wrap(runner.state, "apply", lambda *a: "optimizer update")
    else:
        update = trainer._update

        def wrapped(*a, **k):
            tracker.mark("optimizer update")
            return update(*a, **k)

        trainer._update = wrapped


def measure(only: list[str] | None = None, again: bool = False) -> None:
    """Measure the FRESH_ROWS not yet measured with this code (`only`: these models, e.g.
    ["smollm2", "qwen0.5b"], by name before the colon; `again`: those too, as a repeat: the
    report keeps each row's largest peak and lists every repeat's)."""
    code, done = code_fingerprint(), set()
    if FRESH.exists() and not again:
        rows = [r for r in map(json.loads, FRESH.open()) if r.get("code") == code]
        done = {(r["model"], r["seq"], r["variant"]) for r in rows}
    for model, seq, variants in FRESH_ROWS:
        if only and model.split(":")[0] not in only:
            continue
        for v in variants:
            if (model, seq, v) in done:
                continue
            cmd = [sys.executable, __file__, "--child", json.dumps([model, seq, v])]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{model} {seq} {v}: failed\n{p.stderr[-1500:]}")
                continue
            line = p.stdout.strip().splitlines()[-1]
            with FRESH.open("a") as f:
                f.write(line + "\n")
            print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--measure", action="store_true")
    p.add_argument("--child")
    p.add_argument("--only", help="with --measure: comma-separated model names (smollm2,...)")
    p.add_argument("--report", action="store_true")
    p.add_argument("--phases", action="store_true", help="print each phase against its term")
    p.add_argument(
        "--again", action="store_true", help="with --measure: measure rows done with this code"
    )
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure_child(*json.loads(a.child))))
    elif a.measure:
        measure(a.only.split(",") if a.only else None, a.again)
    if a.report:
        write_report()
    if a.phases:
        print_phases()


# ------------------------------------------------------------------------------ report


_SIZES: dict = {}


def plan_fresh(model: str, seq: int, variant: str):
    """plan.estimate for a fresh row (the model's sizes, loaded lazily, once per model)."""
    from mlx_edgelora import lora, plan, quant
    from mlx_edgelora.config import TrainConfig
    from mlx_edgelora.loading import load_model

    cfg = TrainConfig(max_seq_len=seq, out="/tmp/x", **VARIANTS[variant])
    cfg.validate()
    if model not in _SIZES:
        m = load_model(_model_path(model), lazy=True).model
        if _layers(model):
            m.model.layers = m.model.layers[: _layers(model)]
        lora.apply_adapter(m, cfg)
        quant.prepare_for_training(m)
        _SIZES[model] = plan.sizes(m)
    return plan.estimate(_SIZES[model], cfg)


def fresh_measured() -> list[dict]:
    """The fresh rows measured with the current code: one per (model, seq, variant), the
    largest of its repeats (`runs`: every repeat's peak), then the rows of older code."""
    code = code_fingerprint()
    rows = list(map(json.loads, FRESH.open())) if FRESH.exists() else []
    current: dict = {}
    for r in rows:
        if r.get("code") != code:
            continue
        key = (r["model"], r["seq"], r["variant"])
        best = current.get(key)
        runs = (best["runs"] if best else []) + [r["measured_gb"]]
        if best is None or r["measured_gb"] >= best["measured_gb"]:  # the newest of ties
            best = r
        current[key] = {**best, "runs": runs}
    return list(current.values()) + [r for r in rows if r.get("code") != code]


def fresh_rows() -> list[dict]:
    """The fresh rows, planned with the current code."""
    out, code = [], code_fingerprint()
    for r in fresh_measured():
        planned = plan_fresh(r["model"], r["seq"], r["variant"])
        key = f"{r['model']} {r['seq']} {r['variant']}"
        current = r.get("code") == code
        row = _row("fresh (optimizer steps)", key, planned, r["measured_gb"], current)
        if len(r.get("runs", [])) > 1:
            row["runs"] = r["runs"]
        out.append(row)
    return out


# the measured phases (PhaseTracker names) -> the plan's phase (MemoryPlan.phases) that
# covers them; phases without a term (the forward, the hand-over, the update) are below the
# plan's peak phase by construction and are listed with "-"
def _plan_phase(measured: str, plan_phases: dict) -> str | None:
    if measured.startswith("recompute"):
        for unit, name in (("attn", "attention-half recompute"), ("mlp", "MLP-half recompute")):
            if measured.endswith(unit) and "+" not in measured and name in plan_phases:
                return name
        return "segment recompute"
    return measured if measured in plan_phases else None


def phase_rows() -> list[dict]:
    """Per fresh row of the current code with phases: each kind of phase's measured peak
    (the largest over its occurrences, e.g. every block's attention half) next to the plan's
    total for it (what the plan holds through the step plus that phase's term)."""
    out = []
    for r in fresh_measured():
        if r.get("code") != code_fingerprint() or not r.get("phases"):
            continue
        planned = plan_fresh(r["model"], r["seq"], r["variant"])
        held = sum(v for k, v in planned.parts.items() if not k.endswith("(peak phase)"))
        kinds: dict = {}
        for p in r["phases"]:
            kind = p["phase"]
            if kind.startswith("recompute"):
                units = kind.split(" ", 1)[1].split("+")
                kind = "recompute " + "+".join(u.lstrip("0123456789") for u in units)
            kinds[kind] = max(kinds.get(kind, 0), p["peak_gb"])
        for kind, peak in kinds.items():
            name = _plan_phase(kind, planned.phases)
            term = planned.phases.get(name) if name else None
            out.append({
                "row": f"{r['model']} {r['seq']} {r['variant']}",
                "phase": kind,
                "measured_gb": peak,
                "plan_phase": name,
                "planned_gb": None if term is None else round(held + term, 4),
                "ratio": None if term is None else round((held + term) / peak, 3),
                "held_gb": round(held, 4),
            })  # fmt: skip
    return out


def print_phases() -> None:
    print("| row | phase | measured GB | plan's phase | planned GB (held + term) | ratio |")
    print("|---|---|---|---|---|---|")
    for p in phase_rows():
        planned = "-" if p["planned_gb"] is None else f"{p['planned_gb']:.4f}"
        ratio = "-" if p["ratio"] is None else f"{p['ratio']:.2f}"
        print(
            f"| {p['row']} | {p['phase']} | {p['measured_gb']:.4f} | {p['plan_phase'] or '-'} | "
            f"{planned} (held {p['held_gb']:.4f}) | {ratio} |"
        )


class _NoEval:
    """cells.py builds evaluated models; for their sizes alone, mx.eval does nothing here, so a
    3B shape costs no memory (an array's nbytes is known before it is evaluated)."""

    def __enter__(self):
        self.saved, mx.eval = mx.eval, lambda *a, **k: None

    def __exit__(self, *exc):
        mx.eval = self.saved


def cell_rows() -> tuple[list[dict], int]:
    """Every recorded bench/cells.py cell the trainer could run, planned as the cell ran:
    one forward+backward, no optimizer update (LoRA weights and gradients: 2 of the plan's
    OPT_COPIES), LoRA state in memory (cells pass no SegmentOptimizer)."""
    import cells

    from mlx_edgelora import plan

    recorded = [json.loads(x) for x in (RESULTS / "table1_cells.jsonl").open()]
    recorded += [dict(c, source="peak_memory.json") for c in _peak_memory_cells()]
    recorded += [dict(c, source="methods.json") for c in _methods_cells()]
    out, skipped, sizes = [], 0, {}
    for rec in recorded:
        c = {**cells.DEFAULTS, **rec["config"]}
        if rec.get("status") != "ok" or c["full_ft"] or c["adapter"] != "lora" or c["emulator"]:
            skipped += 1
            continue
        key = (c["shape"], c["layers"], c["bits"], c["rank"])
        with _NoEval(), tempfile.TemporaryDirectory() as tmp:
            if key not in sizes:
                model = cells._build(c)
                cells._trainable(c, model, tmp)
                sizes[key] = plan.sizes(model)
            tc = cells.train_config(c, tmp, max_seq_len=c["seq"], stream_state=False)
        planned = plan.estimate(sizes[key], tc, c["trainable"])
        lora_part = planned.parts["LoRA + optimizer"]
        planned.parts["LoRA + optimizer"] = lora_part * 2 / plan.OPT_COPIES
        name = (
            f"{c['shape']} L{c['layers'] or 'full'} {c['seq']} {c['engine']} "
            f"{rec.get('row') or rec.get('label') or rec.get('method') or ''}".strip()
        )
        source = rec.get("source", "table1_cells.jsonl")
        current = _measured_with_current_code(rec)
        out.append(_row(f"{source} (1 fwd+bwd cell)", name, planned, rec["peak_gb"], current))
    return out, skipped


def _peak_memory_cells() -> list[dict]:
    return json.loads((RESULTS / "peak_memory.json").read_text())["cells"]


def _methods_cells() -> list[dict]:
    d = json.loads((RESULTS / "methods.json").read_text())
    return [c for k in ("memory_smollm2", "memory_llama3b") for c in d.get(k, [])]


def trainer_rows() -> list[dict]:
    """results/trainer_rows.jsonl: the trainer's own reported peak (token store included)."""
    from dataclasses import replace

    from mlx_edgelora import lora, plan, precision, quant
    from mlx_edgelora.config import parse_config
    from mlx_edgelora.loading import load_model

    out = []
    for r in map(json.loads, (RESULTS / "trainer_rows.jsonl").open()):
        if r.get("load_only") or "context" not in r:  # load-only and path rows: no step
            continue
        cfg = parse_config(["--max-seq-len", str(r["context"]), "--out", "/tmp/x", *r["flags"]])
        folder = _model_path(f"{r['shape']}:2")  # 2 blocks: the plan's other sizes per block
        loaded = load_model(folder, lazy=True)
        model = loaded.model
        lora.apply_adapter(model, cfg)
        quant.prepare_for_training(model)
        m = plan.sizes(model)
        per_block = m.block_frozen[0]
        n = r["layers"]
        shape = type(m.shape)(**{**m.shape.__dict__, "n_layers": n})
        full = replace(
            m, shape=shape, frozen=m.frozen + (n - 2) * per_block, block_frozen=(per_block,) * n
        )
        # as the trainer plans it: --dtype auto on a CPU (bf16 storage, float32 compute)
        # the model's own dtype as the trainer takes it (load_model gives float32 weights)
        prec = precision.resolve(cfg.dtype, loaded.dtype or m.native, gpu=False)
        full = full.stored_as(prec.storage)
        planned = plan.estimate(full, cfg, 1.0, TOKEN_STORE_BYTES, precision=prec)
        key = f"{r['shape']} {r['context']} {r['steps']} steps {' '.join(r['flags'])}".strip()
        out.append(
            _row(
                "trainer_rows.jsonl (trainer's reported peak)",
                key,
                planned,
                r["step_peaks_gb"] and max(r["step_peaks_gb"]) or r["reported_peak_gb"],
                _measured_with_current_code({"commit": r.get("code")}),  # its commit
            )
        )
    return out


def _measured_with_current_code(rec: dict) -> bool:
    """A recorded row counts as current only if it names the commit it ran (or the code
    fingerprint) and CODE_FILES are the same there as here; rows without either are older."""
    if rec.get("code"):
        return rec["code"] == code_fingerprint()
    if not rec.get("commit"):
        return False
    try:
        return code_fingerprint(rec["commit"]) == code_fingerprint()
    except subprocess.CalledProcessError:  # a commit this clone does not have
        return False


TOKEN_STORE_BYTES = 0  # the trainer row's token store (the bundled sample): under 1 MB


def _row(source: str, key: str, planned, measured: float, current: bool) -> dict:
    return {
        "source": source,
        "code": "current" if current else "older code",
        "row": key,
        "planned_gb": round(planned.total_gb, 4),
        "measured_gb": round(measured, 4),
        "ratio": round(planned.total_gb / measured, 3),
        "parts": {k: round(v, 4) for k, v in planned.parts.items()},
    }


def summarize(rows: list[dict]) -> dict:
    """Per (code, source): how many rows meet the target (code first: current, then older)."""
    by: dict = {}
    for r in sorted(rows, key=lambda r: r["code"] != "current"):
        by.setdefault(f"{r['code']}: {r['source']}", []).append(r["ratio"])
    return {
        s: {
            "rows": len(v),
            "within_15pct_and_not_under": sum(1 <= x <= 1.15 for x in v),
            "under": sum(x < 1 for x in v),
            "min_ratio": min(v),
            "max_ratio": max(v),
        }
        for s, v in by.items()
    }


def write_report() -> None:
    rows = fresh_rows() + trainer_rows()
    cells_, skipped = cell_rows()
    rows += cells_
    summary = summarize(rows)
    (RESULTS / "plan_accuracy.json").write_text(
        json.dumps(
            {
                "code": code_fingerprint(),
                "summary": summary,
                "skipped_cells": skipped,
                "rows": rows,
            },
            indent=1,
        )
    )
    code = code_fingerprint()
    current = [r for r in rows if r["code"] == "current"]
    ok = sum(1 <= r["ratio"] <= 1.15 for r in current)
    lines = [
        "# Memory plan vs measured peak",
        "",
        "ratio = planned / measured; the goal is 1.00-1.15 (never under, at most 15% over).",
        "`nice -n 10 python bench/plan_accuracy.py --measure` (the fresh rows), then",
        "`python bench/plan_accuracy.py --report`.",
        "",
        f"**Rows measured with the current step-memory code (fingerprint `{code}` of",
        f"{', '.join(CODE_FILES)}): {ok} of {len(current)} within 1.00-1.15.** Only these count",
        "toward the target. Rows measured by older versions of that code (every recorded cell",
        "and trainer row that does not name its commit) are listed below, labelled",
        "\"older code\": a ratio there compares today's plan with yesterday's engine.",
        f"Left out: {skipped} cells the planner does not plan (full fine-tuning, LARS, EMLoC,",
        "or not run).",
        "",
        "| code: source | rows | within 1.00-1.15 | under | ratio min | ratio max |",
        "|---|---|---|---|---|---|",
    ]
    for s, d in summary.items():
        lines.append(
            f"| {s} | {d['rows']} | {d['within_15pct_and_not_under']} | {d['under']} | "
            f"{d['min_ratio']:.2f} | {d['max_ratio']:.2f} |"
        )
    n_head = len(lines)
    for title, part in (("current code", current), ("older code", rows)):
        part = [r for r in part if (r["code"] == "current") == (title == "current code")]
        lines += [
            "",
            f"## {title}",
            "",
            "| source | row | planned GB | measured GB | ratio |",
            "|---|---|---|---|---|",
        ]
        for r in part:
            lines.append(
                f"| {r['source']} | {r['row']} | {r['planned_gb']:.3f} | "
                f"{r['measured_gb']:.3f} | {r['ratio']:.2f} |"
            )
    (RESULTS / "plan_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:n_head]))


if __name__ == "__main__":
    main()
