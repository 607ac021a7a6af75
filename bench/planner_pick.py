"""Is the planner's pick under a memory budget the fastest configuration that fits?

Why: issue 17's target is "the planner's pick under a budget is within 10% of the fastest
configuration that fits". The planner (mlx_edgelora/planner.py) rates every candidate with a
speed model (planner.SPEED, one factor per option value from bench/engine_speed.py); this
bench measures, for a few budgets on SmolLM2-135M at 2048 tokens (its first LAYERS blocks, so
that one run fits the timing lock's ~12 min), the step time of the pick and of the fitting
candidates that differ from it in one option (its neighbours: if the speed model were wrong
about an option, the neighbour that flips it is faster), all interleaved in ONE process
under the shared timing lock, and reports pick / fastest measured.

    python bench/planner_pick.py            # under the lock (re-execs itself)
    python bench/planner_pick.py --report   # results/planner_pick.{json,md}
"""

# isort: off
import mlx_edgelora  # noqa: F401  (preloads OpenBLAS before mlx)

# isort: on

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_speed import LOCK, Runner, interleaved_steps  # noqa: E402

from mlx_edgelora import lora, plan, planner, quant  # noqa: E402
from mlx_edgelora.config import TrainConfig  # noqa: E402
from mlx_edgelora.loading import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEQ, LAYERS = 2048, 3  # 3 of 30 blocks: 2 rounds of ~6 configurations fit the lock
NEIGHBOURS = (
    1  # per budget, besides the pick: the next-fastest speed level (the lock fits ~6 configs)
)


def _sizes(cfg: TrainConfig) -> plan.ModelSizes:
    model = load_model(None, lazy=True).model
    model.model.layers = model.model.layers[:LAYERS]
    lora.apply_adapter(model, cfg)
    quant.prepare_for_training(model)
    return plan.sizes(model)


DEFAULTS = TrainConfig(max_seq_len=SEQ, out="/tmp/planner_pick").validate()


def _key(c: TrainConfig) -> str:
    return planner.flags(c, DEFAULTS)


def _distance(a: TrainConfig, b: TrainConfig) -> int:
    return sum(getattr(a, k) != getattr(b, k) for k in planner.SPACE)


def budgets_and_configs() -> tuple[list[dict], dict[str, TrainConfig]]:
    """Up to 3 budgets where the pick changes (the tightest, a middle one, the roomiest): for
    each, the pick and the fitting candidates of the next NEIGHBOURS distinct model speeds
    (each the one nearest the pick in options, then the smallest plan)."""
    m = _sizes(DEFAULTS)
    rated = [
        (c, plan.estimate(m, c).total_gb, planner.relative_speed(c))
        for c in planner.candidates(DEFAULTS)
    ]

    def fitting(budget):
        return sorted((r for r in rated if r[1] <= budget), key=lambda r: (r[2], r[1]))

    transitions, last = [], None
    for budget in sorted({p for _, p, _ in rated}):
        pick = _key(fitting(budget)[0][0])
        if pick != last:
            transitions.append(budget)
            last = pick
    chosen = sorted({transitions[0], transitions[len(transitions) // 2], transitions[-1]})
    out, configs = [], {}
    for budget in chosen:
        fit = fitting(budget)
        pick = fit[0]
        rows, speeds = [pick], {pick[2]}
        for speed in sorted({r[2] for r in fit} - speeds)[:NEIGHBOURS]:
            level = [r for r in fit if r[2] == speed]
            rows.append(min(level, key=lambda r: (_distance(r[0], pick[0]), r[1])))
        for c, _, _ in rows:
            configs[_key(c)] = c
        out.append(
            {
                "budget_gb": round(budget, 4),
                "fitting": len(fit),
                "pick": _key(pick[0]),
                "measured": [
                    {"config": _key(c), "planned_gb": round(p, 4), "model_speed": round(v, 3)}
                    for c, p, v in rows
                ],
            }
        )
    return out, configs


def child() -> None:
    t0 = time.time()
    budgets, configs = budgets_and_configs()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:  # bench/tmp*: ignored
        runners = {}
        for i, (k, c) in enumerate(configs.items()):
            flags = {f: getattr(c, f) for f in planner.SPACE}
            runners[k] = Runner(flags, SEQ, f"{tmp}/{i}", LAYERS)
        times, loads, rounds = interleaved_steps(runners, 3, t0)
    rec = {
        "seq": SEQ,
        "layers": LAYERS,
        "budgets": budgets,
        "step_s": times,
        "rounds": rounds,
        "loadavg": [round(x, 2) for x in loads],
        "wall_s": round(time.time() - t0, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (RESULTS / "planner_pick.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec))


def _load_words(loads: list[float]) -> str:
    """How busy the 2-core machine was: at a load of 2.5 or less the bench was alone on it."""
    span = f"load average {min(loads):.1f}-{max(loads):.1f}"
    if max(loads) <= 2.5:
        return f"Measured with nothing else running ({span}: the bench's own process) on 2 cores."
    return f"Measured UNDER LOAD ({span}) on the shared 2-core CPU."


def report() -> str:
    rec = json.loads((RESULTS / "planner_pick.json").read_text())
    med = {k: statistics.median(v) for k, v in rec["step_s"].items()}
    lines = [
        "# The planner's pick vs the fastest fitting configuration measured",
        "",
        f"SmolLM2-135M (Q4_1 GGUF), first {rec['layers']} of 30 blocks, {rec['seq']} tokens,",
        "batch 1;",
        f"`python bench/planner_pick.py` ({rec['rounds']} rounds + a warm-up, interleaved, one",
        "process under the timing lock), then `--report`. " + _load_words(rec["loadavg"]),
        "Target: the pick within 10% of the fastest measured configuration that fits. max/min:",
        "the spread of one configuration's own steps (the noise a ratio has to beat).",
        "",
    ]
    for b in rec["budgets"]:
        fastest = min(b["measured"], key=lambda r: med[r["config"]])
        ratio = med[b["pick"]] / med[fastest["config"]]
        b["pick_over_fastest"] = round(ratio, 3)
        lines += [
            f"## budget {b['budget_gb']:.3f} GB ({b['fitting']} candidates fit): "
            f"pick / fastest = **{ratio:.2f}** ({'met' if ratio <= 1.10 else 'NOT met'})",
            "",
            "| configuration | planned GB | model's speed | median step s | step s | max/min |",
            "|---|---|---|---|---|---|",
        ]
        for r in b["measured"]:
            tag = " (pick)" if r["config"] == b["pick"] else ""
            lines.append(
                f"| {r['config']}{tag} | {r['planned_gb']:.3f} | {r['model_speed']:.3f} | "
                f"{med[r['config']]:.2f} | {', '.join(map(str, rec['step_s'][r['config']]))} | "
                f"{max(rec['step_s'][r['config']]) / min(rec['step_s'][r['config']]):.2f} |"
            )
        lines.append("")
    (RESULTS / "planner_pick.json").write_text(json.dumps(rec, indent=1))
    (RESULTS / "planner_pick.md").write_text("\n".join(lines))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--dry", action="store_true", help="print the budgets and configs only")
    a = p.parse_args()
    if a.child:
        child()
    elif a.report:
        print(report())
    elif a.dry:
        print(json.dumps(budgets_and_configs()[0], indent=1))
    else:
        subprocess.run(["flock", LOCK, sys.executable, __file__, "--child"], check=True)
        print(report())


if __name__ == "__main__":
    main()
