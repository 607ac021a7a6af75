"""Where a step's time goes: wall seconds per phase of the segment engine vs the graph engine.

Why: the target "all on <= 1.4x graph" needs to know which of the segment engine's extras
(recompute, boundary I/O, weight and state streaming, chunked attention/MLP) cost what. Each
configuration (engine_speed.CONFIGS names) runs a warm-up step and `--rounds` timed steps,
interleaved, in one process; during the timed steps the engine's seams are wrapped with
timers (exclusive time: a phase nested in another is not counted twice), and with `--cprofile`
the last round runs under cProfile too (top functions by own time).

    flock /work/wt/_brief/timing.lock python bench/step_profile.py --seq 2048 --layers 6 \
        --configs '["all on", "graph", "activations ram"]'

Times are wall seconds on the shared CPU: label them "under load" with the recorded load.
"""

# isort: off
import mlx_edgelora  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx

# isort: on

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

from mlx_edgelora import engine, spill, state, stream

sys.path.insert(0, str(Path(__file__).parent))
from engine_speed import CONFIGS, Runner  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class Timers:
    """Exclusive wall time per phase name: entering a phase pauses the enclosing one."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.stack: list[list] = []  # [name, start of its current exclusive slice]

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self.stack:
            top = self.stack[-1]
            self.total[top[0]] = self.total.get(top[0], 0.0) + now - top[1]
        self.stack.append([name, now])

    def leave(self) -> None:
        now = time.perf_counter()
        name, t0 = self.stack.pop()
        self.total[name] = self.total.get(name, 0.0) + now - t0
        if self.stack:
            self.stack[-1][1] = now

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            self.enter(name)
            try:
                return fn(*a, **k)
            finally:
                self.leave()

        setattr(owner, attr, timed)

    def wrap_cm(self, owner, attr: str, name: str) -> None:
        """A context-manager method: time its enter and its exit, not the body."""
        fn = getattr(owner, attr)

        @contextlib.contextmanager
        def timed(*a, **k):
            self.enter(name)
            cm = fn(*a, **k)
            try:
                v = cm.__enter__()
            finally:
                self.leave()
            try:
                yield v
            except BaseException:
                self.enter(name)
                try:
                    if not cm.__exit__(*sys.exc_info()):
                        raise
                finally:
                    self.leave()
            else:
                self.enter(name)
                try:
                    cm.__exit__(None, None, None)
                finally:
                    self.leave()

        setattr(owner, attr, timed)


def instrument(t: Timers) -> None:
    """Time the engine's seams (classes patched: every runner shares them)."""
    t.wrap(engine.SegmentStep, "_forward", "forward compute")
    t.wrap(engine.SegmentStep, "_loss_and_vjp", "loss head (+ last segment)")
    t.wrap(engine.SegmentStep, "_backward", "backward recompute+VJP")
    t.wrap(engine.SegmentStep, "_hand_over", "state: add_gradients")
    t.wrap(engine, "_embed", "embed")
    t.wrap(spill.BoundaryStore, "put", "boundary put")
    t.wrap(spill.BoundaryStore, "get", "boundary get")
    t.wrap(spill.BoundaryStore, "__init__", "boundary store open/close")
    t.wrap(spill.BoundaryStore, "close", "boundary store open/close")
    t.wrap(stream.WeightStream, "_load", "weights: load unit")
    t.wrap_cm(state.SegmentOptimizer, "resident", "state: load LoRA weights")
    t.wrap(state.SegmentOptimizer, "apply", "state: apply (AdamW)")
    t.wrap(state.SegmentOptimizer, "begin_step", "state: apply (AdamW)")
    t.wrap(engine.GraphStep, "__call__", "graph value_and_grad")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--configs", default='["all on", "graph"]')
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "step_profile.json"))
    a = p.parse_args()
    names = json.loads(a.configs)
    t = Timers()
    rec: dict = {"seq": a.seq, "layers": a.layers, "configs": {}}
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        runners = {
            n: Runner(CONFIGS[n], a.seq, f"{tmp}/{i}", a.layers) for i, n in enumerate(names)
        }
        for r in runners.values():  # warm-up, untimed
            r.step()
        instrument(t)
        per: dict = {n: {"step_s": [], "phases": {}} for n in names}
        for k in range(a.rounds):
            for n, r in runners.items():
                t.total = {}
                prof = cProfile.Profile() if a.cprofile and k == a.rounds - 1 else None
                if prof:
                    prof.enable()
                s = r.step()
                if prof:
                    prof.disable()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
                    per[n]["cprofile"] = buf.getvalue()
                per[n]["step_s"].append(round(s, 3))
                for ph, v in t.total.items():
                    per[n]["phases"].setdefault(ph, []).append(round(v, 3))
                per[n].setdefault("loadavg", []).append(os.getloadavg()[0])
                print(n, round(s, 2), {k2: round(v, 2) for k2, v in t.total.items()}, flush=True)
        for r in runners.values():
            r.close()
    rec["configs"] = per
    rec["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rec["mx_peak_gb"] = mx.get_peak_memory() / 2**30
    Path(a.out).write_text(json.dumps(rec, indent=1))
    for n, d in per.items():
        print(f"== {n}: steps {d['step_s']} (load {d['loadavg']})")
        for ph, v in sorted(d["phases"].items(), key=lambda kv: -sum(kv[1])):
            print(f"   {ph:32s} {v}")
        if "cprofile" in d:
            print(d["cprofile"])


if __name__ == "__main__":
    main()
