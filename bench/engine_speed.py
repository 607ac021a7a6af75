"""Step time of each engine configuration on SmolLM2-135M at 512 and 2048 tokens.

Why: the planner (mlx_edgelora/planner.py) picks the fastest configuration that fits a memory
budget; its speed model is calibrated from these ratios. Each configuration is the default
(all techniques on) with one technique toggled, plus the graph engine (the reference, no
technique). Every step is a real optimizer step (forward, backward, AdamW update; with
--stream-state the update runs unit by unit as in the trainer) on the embedded SmolLM2 Q4_1
GGUF, batch 1, random tokens.

One invocation holds `flock /work/wt/_brief/timing.lock` (the shared timing lock) and times
ONE group of configurations in ONE process, interleaved: a warm-up round of every
configuration, then rounds of one step each until `--rounds` or the time limit (the lock is
held at most ~12 min). Every group contains the two anchors, "all on" and "graph": speeds are
reported relative to "all on" in the same run, so load on the shared machine hits both alike.
The load average is recorded with each step. Results are appended to
results/engine_speed.jsonl; `--report` writes results/engine_speed.{json,md}.

    python bench/engine_speed.py --seq 512 --group 0     # under the lock (re-execs itself)
    python bench/engine_speed.py --all                   # every group, one lock hold each
    python bench/engine_speed.py --seq 2048 --layers 6 --configs '["no split blocks", ...]'
    python bench/engine_speed.py --report
"""

# isort: off
import mlx_edgelora  # noqa: F401  (preloads OpenBLAS before mlx)

# isort: on

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlx_edgelora import blocks, engine, lora, loss, quant, trainer
from mlx_edgelora.batching import Batch
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.loading import load_model
from mlx_edgelora.state import SegmentOptimizer

RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "engine_speed.jsonl"
LOCK = "/work/wt/_brief/timing.lock"
LIMIT_S = 11 * 60  # the lock is held at most ~12 min per invocation

# name -> the flags that differ from the defaults (TrainConfig field names)
CONFIGS = {
    "all on": {},
    "graph": {"engine": "graph", "activations": "ram", "stream_weights": False},
    "activations ram": {"activations": "ram"},
    "no stream weights": {"stream_weights": False},
    "no stream state": {"stream_state": False},
    "no split blocks": {"split_blocks": False},
    "checkpoint-every 2": {"checkpoint_every": 2},
    "checkpoint-every 4": {"checkpoint_every": 4},
    "cache last": {"cache_policy": "last"},
    "no keep attention": {"keep_attention": False},
    "attn/mlp chunk 1024": {"attn_chunk": 1024, "mlp_chunk": 1024},
    "vocab chunk 32768": {"vocab_chunk": 32768},
}
ANCHORS = ["all on", "graph"]
OTHERS = [n for n in CONFIGS if n not in ANCHORS]
# non-anchor configurations per invocation, and blocks of SmolLM2's 30 (None: all), so that one
# invocation fits the lock's ~12 min on the shared CPU (a full-depth step at 2048 tokens takes
# ~150 s here even when the machine is idle: bench/results/peak_memory.md)
GROUP_SIZE = {512: 2, 2048: 1}
LAYERS = {512: None, 2048: 6}


def groups(seq: int) -> list[list[str]]:
    k = GROUP_SIZE[seq]
    return [ANCHORS + OTHERS[i : i + k] for i in range(0, len(OTHERS), k)]


class Runner:
    """One configuration's model, optimizer and step, built once; `step()` times one step."""

    def __init__(
        self, flags: dict, seq: int, out: str, layers: int | None = None, model: str | None = None
    ):
        self.cfg = TrainConfig(max_seq_len=seq, out=out, **flags).validate()
        cfg = self.cfg
        self.model = load_model(model, lazy=bool(cfg.stream_weights)).model
        if layers:  # the first `layers` blocks only (a step at 2048 tokens must fit the lock)
            self.model.model.layers = self.model.model.layers[:layers]
        lora.apply_adapter(self.model, cfg)
        quant.prepare_for_training(self.model)
        self.opt = trainer.make_optimizer(cfg)
        head = loss.make_loss_head(self.model, cfg.loss, cfg)
        self.state = None
        if cfg.stream_state and cfg.engine == "segments":
            self.state = SegmentOptimizer(self.model, self.opt, cfg.grad_clip, None, cfg.out)
        self.step_fn = engine.make_step(self.model, cfg, head, self.state)
        vocab = blocks.shape(self.model).V
        toks = np.random.default_rng(0).integers(0, vocab, (1, seq + 1)).astype(np.int32)
        self.batch = Batch(toks[:, :-1], toks[:, 1:], np.ones((1, seq), bool))

    def step(self) -> float:
        t0 = time.perf_counter()
        if self.state is not None:
            self.state.begin_step()
        _, n, grads = self.step_fn(self.batch)
        if self.state is not None:
            self.state.apply(n)
        else:
            trainer._update(self.model, self.opt, self.cfg, grads, n)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.step_fn.close()
        if self.state is not None:
            self.state.close()


def interleaved_steps(
    runners: dict[str, Runner], rounds: int, t_start: float
) -> tuple[dict[str, list], list, int]:
    """(step seconds per runner, load averages, rounds done): a warm-up round, then rounds of
    one step of each runner in turn, so that load hits them alike, up to `rounds` or until
    another round would pass LIMIT_S since `t_start`. Closes the runners."""
    for r in runners.values():  # warm-up round
        r.step()
    times: dict[str, list] = {n: [] for n in runners}
    loads: list = []
    done = 0
    while done < rounds:
        for n, r in runners.items():
            times[n].append(round(r.step(), 3))
            loads.append(os.getloadavg()[0])
        done += 1
        per_round = (time.time() - t_start) / (done + 1.5)
        if time.time() - t_start + per_round > LIMIT_S:  # >= 2 rounds when load allows
            break
    for r in runners.values():
        r.close()
    return times, loads, done


def child(seq: int, names: list[str], rounds: int, layers: int | None) -> None:
    t_start = time.time()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:  # bench/tmp*: ignored
        runners = {n: Runner(CONFIGS[n], seq, f"{tmp}/{i}", layers) for i, n in enumerate(names)}
        times, loads, done = interleaved_steps(runners, rounds, t_start)
    rec = {
        "seq": seq,
        "layers": layers or 30,
        "configs": names,
        "step_s": times,
        "rounds": done,
        "loadavg": [round(x, 2) for x in loads],
        "wall_s": round(time.time() - t_start, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with CACHE.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


def run_group(seq: int, g: int, rounds: int) -> None:
    run_names(seq, groups(seq)[g], rounds, LAYERS[seq])


def run_names(seq: int, names: list[str], rounds: int, layers: int | None) -> None:
    """One lock hold: `names` (the anchors are added) interleaved in one process."""
    names = ANCHORS + [n for n in names if n not in ANCHORS]
    cmd = [sys.executable, __file__, "--child", "--seq", str(seq), "--rounds", str(rounds)]
    cmd += ["--layers", str(layers or 0), "--configs", json.dumps(names)]
    subprocess.run(["flock", LOCK, *cmd], check=True)


def report() -> dict:
    """Per context: each configuration's median step time relative to "all on" of the same
    run (the median over the runs that contain it), and the absolute medians."""
    recs = [json.loads(x) for x in CACHE.read_text().splitlines() if x.strip()]
    out: dict = {}
    for seq in sorted({r["seq"] for r in recs}):
        rel: dict[str, list] = {}
        abs_: dict[str, list] = {}
        for r in (r for r in recs if r["seq"] == seq):
            base = statistics.median(r["step_s"]["all on"])
            for n, ts in r["step_s"].items():
                rel.setdefault(n, []).append(statistics.median(ts) / base)
                abs_.setdefault(n, []).extend(ts)
        loads = [x for r in recs if r["seq"] == seq for x in r["loadavg"]]
        out[str(seq)] = {
            "relative_to_all_on": {n: round(statistics.median(v), 3) for n, v in rel.items()},
            "median_step_s": {n: round(statistics.median(v), 2) for n, v in abs_.items()},
            "loadavg_range": [min(loads), max(loads)],
            "runs": sum(r["seq"] == seq for r in recs),
            "layers": sorted({r.get("layers", 30) for r in recs if r["seq"] == seq}),
        }
        g = out[str(seq)]["relative_to_all_on"]
        out[str(seq)]["all_on_vs_graph"] = round(1 / g["graph"], 3) if "graph" in g else None
    return out


# configuration -> the (option, value) pairs it toggles, as planner.SPEED keys them
OPTIONS = {
    "activations ram": [("activations", "ram")],
    "no stream weights": [("stream_weights", False)],
    "no stream state": [("stream_state", False)],
    "no split blocks": [("split_blocks", False)],
    "checkpoint-every 2": [("checkpoint_every", 2)],
    "checkpoint-every 4": [("checkpoint_every", 4)],
    "cache last": [("cache_policy", "last")],
    "no keep attention": [("keep_attention", False)],
    "attn/mlp chunk 1024": [("attn_chunk", 1024), ("mlp_chunk", 1024)],
    "vocab chunk 32768": [("vocab_chunk", 32768)],
}


def speed_table(rep: dict) -> dict:
    """planner.SPEED from the report: per context, each option value's factor (a joint toggle
    of k options gives each the k-th root; no stream weights also turns state streaming off,
    so its factor is divided by no stream state's where that was measured)."""
    table: dict = {}
    for seq, d in rep.items():
        rel = d["relative_to_all_on"]
        t: dict = {}
        for name, pairs in OPTIONS.items():
            if name not in rel:
                continue
            f = rel[name] ** (1 / len(pairs))
            if name == "no stream weights" and "no stream state" in rel:
                f /= rel["no stream state"]
            for k, v in pairs:
                t.setdefault(k, {})[v] = round(f, 3)
        table[int(seq)] = t
    return table


def markdown(rep: dict) -> str:
    lines = [
        "# Step time per engine configuration, SmolLM2-135M (Q4_1), batch 1",
        "",
        "Measured UNDER LOAD on a shared 2-core CPU machine (MLX CPU backend), under the timing",
        "lock, configurations interleaved in one process per run; relative = median step time /",
        "median step time of 'all on' in the same run. `python bench/engine_speed.py --all`;",
        "the latest runs, one per length: `python bench/engine_speed.py --seq 2048 --layers 6",
        '--configs \'["no split blocks", "checkpoint-every 2", "activations ram",',
        '"no stream weights", "cache last", "no stream state"]\'` and `--seq 512 --configs`',
        "with every configuration (the lock's ~12 min fit one round after the warm-up each).",
        "",
    ]
    for seq, d in rep.items():
        lines += [
            f"## {seq} tokens, {'/'.join(map(str, d['layers']))} of SmolLM2's 30 blocks "
            f"({d['runs']} runs, "
            f"load average {d['loadavg_range'][0]:.1f}-{d['loadavg_range'][1]:.1f})",
            "",
            f"all on vs graph: **{d['all_on_vs_graph']}x** (target <= 1.4x at 2048)",
            "",
            "| configuration | relative step time | median step s (under load) |",
            "|---|---|---|",
        ]
        for n, v in d["relative_to_all_on"].items():
            lines.append(f"| {n} | {v:.3f} | {d['median_step_s'][n]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--group", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--all", action="store_true")
    p.add_argument("--child", action="store_true")
    p.add_argument("--configs", help="JSON list of CONFIGS names: all in one run (one lock hold)")
    p.add_argument("--layers", type=int, default=0, help="first N blocks only (0: all)")
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    if a.child:
        child(a.seq, json.loads(a.configs), a.rounds, a.layers or None)
    elif a.report:
        rep = report()
        (RESULTS / "engine_speed.json").write_text(json.dumps(rep, indent=2))
        (RESULTS / "engine_speed.md").write_text(markdown(rep))
        print(markdown(rep))
        print("planner.SPEED =", speed_table(rep))
    elif a.configs:
        run_names(a.seq, json.loads(a.configs), a.rounds, a.layers or None)
    elif a.all:
        for seq in (512, 2048):
            for g in range(len(groups(seq))):
                run_group(seq, g, a.rounds)
    else:
        run_group(a.seq, a.group, a.rounds)


if __name__ == "__main__":
    main()
