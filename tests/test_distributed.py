"""Data parallelism on 2 local ranks (ring backend on 127.0.0.1), tiny model.

The ranks are started either by `mlx.launch` (what a user runs) or directly with the two
variables mlx.launch sets (MLX_RANK, MLX_HOSTFILE), which lets a test give each rank its own
arguments and stop or kill one of them. Each launch costs a few seconds: keep them few.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)
import mlx.core as mx

# isort: on
import numpy as np
import pytest
from conftest import build_tiny_model, write_tiny_model_dir
from mlx.utils import tree_flatten, tree_map

from mlx_edgelora import distributed, plan
from mlx_edgelora.batching import BatchIterator
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.errors import UserError
from mlx_edgelora.trainer import train

REPO = Path(__file__).resolve().parents[1]
TEXT = "The bees at the north hive were calm this morning; the clover is early this year. "
LAUNCH = Path(sys.executable).with_name("mlx.launch")
# Options shared by every run here (2 steps of a tiny model; engine defaults: segments,
# spilled boundaries, streamed weights). Validation on all rows: the same set at any batch.
ARGS = dict(
    steps=2, max_seq_len=32, batch_size=1, rank=4, lr=5e-3, warmup=1, seed=3,
    eval_every=1, eval_batches=-1, save_every=1,
)  # fmt: skip


def _argv(**kw) -> list[str]:
    out = []
    for k, v in {**ARGS, **kw}.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _start_ranks(tmp: Path, argvs: list[list[str]]) -> list[subprocess.Popen]:
    """One `python -m mlx_edgelora.train` per argv, joined by the ring as mlx.launch would."""
    port = _free_port_pair()
    hostfile = tmp / f"hosts-{port}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(len(argvs))]))
    procs = []
    for r, argv in enumerate(argvs):
        env = dict(_env(), MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
        log = tmp / f"rank{r}-{port}.log"
        cmd = [sys.executable, "-m", "mlx_edgelora.train", *argv]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
        procs[-1].log = log
    return procs


def _log(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def _wait_all(procs, timeout=300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _mlx_launch(argv: list[str]) -> subprocess.CompletedProcess:
    if not LAUNCH.exists():
        pytest.skip(f"{LAUNCH} not installed with mlx")
    cmd = [str(LAUNCH), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2"]
    cmd += ["-p", str(_free_port_pair()), "--python", sys.executable, "--"]
    cmd += ["-m", "mlx_edgelora.train", *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _adapter(out: Path) -> dict:
    return mx.load(str(out / "adapters.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


def _losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in recs]


def _single(model, notes, out, **kw):
    return train(TrainConfig(model=str(model), data=str(notes), out=str(out), **{**ARGS, **kw}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, notes, and one 2-rank run (batch 1 each) started directly; rank 1 is
    given its own --out, which must stay absent: only rank 0 writes."""
    tmp = tmp_path_factory.mktemp("dist")
    model = write_tiny_model_dir(tmp / "tiny", "llama")
    notes = tmp / "notes"
    notes.mkdir()
    for i in range(5):
        (notes / f"day{i}.txt").write_text(f"Day {i}. " + TEXT * 4)
    common = ["--model", str(model), "--data", str(notes)]
    argvs = [
        common + ["--out", str(tmp / f"out-r{r}"), "--spill-dir", str(tmp / f"spill-r{r}")]
        for r in range(2)
    ]
    procs = _start_ranks(tmp, [a + _argv() for a in argvs])
    codes = _wait_all(procs)
    logs = [_log(p) for p in procs]
    assert codes == [0, 0], "\n".join(logs)
    return {"tmp": tmp, "model": model, "notes": notes, "out": tmp / "out-r0", "logs": logs}


def test_rows_of_global_batch_are_disjoint_and_cover_it():
    rows = [(np.full(9, i, np.int32), np.ones(9, bool)) for i in range(10)]
    glob = next(BatchIterator(rows, batch_size=4, seed=0))
    shards = [distributed.rows_of(glob, r, 2) for r in range(2)]
    ids = [set(s.inputs[:, 0].tolist()) for s in shards]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(glob.inputs[:, 0].tolist())
    assert [len(s.inputs) for s in shards] == [2, 2]


def test_two_ranks_of_batch_1_equal_one_process_with_grad_accum_2(setup, tmp_path):
    ref = _single(setup["model"], setup["notes"], tmp_path / "ref", grad_accum=2)
    # Same rows, same sums in the same order: observed bit-identical; 1e-6 leaves room.
    assert _max_diff(_adapter(setup["out"]), _adapter(ref.out)) < 1e-6
    np.testing.assert_allclose(_losses(setup["out"]), _losses(ref.out), rtol=1e-5)
    # Against --batch-size 2 (batched matmuls add in another order, Adam amplifies that
    # where a gradient is near zero): same losses, adapters close.
    ref2 = _single(setup["model"], setup["notes"], tmp_path / "ref2", batch_size=2)
    np.testing.assert_allclose(_losses(setup["out"]), _losses(ref2.out), rtol=1e-4)
    assert _max_diff(_adapter(setup["out"]), _adapter(ref2.out)) < 1e-4


def test_only_rank_0_writes_and_spill_folders_are_removed(setup):
    tmp = setup["tmp"]
    assert not (tmp / "out-r1").exists()
    assert (setup["out"] / "adapters.safetensors").is_file()
    assert (setup["out"] / "checkpoints" / "latest.json").is_file()
    for r in range(2):
        assert list((tmp / f"spill-r{r}").iterdir()) == []
    assert "per rank, 2 ranks; global batch 2 sequences" in "".join(setup["logs"])


def test_resume_of_a_two_rank_run(setup, tmp_path):
    """mlx.launch, as a user runs it; rank 0 reads the checkpoint, rank 1 gets it sent."""
    out = tmp_path / "run"
    shutil.copytree(setup["out"], out)
    common = ["--model", str(setup["model"]), "--data", str(setup["notes"]), "--out", str(out)]
    done = _mlx_launch(common + _argv(steps=4, resume=True))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from step 2" in done.stdout
    ref = tmp_path / "ref"
    _single(setup["model"], setup["notes"], ref, grad_accum=2)
    _single(setup["model"], setup["notes"], ref, grad_accum=2, steps=4, resume=True)
    assert _max_diff(_adapter(out), _adapter(ref)) < 1e-6
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["world_size"] == 2


def test_streamed_state_on_two_ranks_equals_it_in_memory(setup, tmp_path):
    """--stream-state with 2 ranks (mlx.launch): each segment's gradients are summed over the
    ranks before they reach the sums on disk, so the global-norm clip (active: 0.05 is below
    the norms of this run) and AdamW's update are those of the in-memory optimizer, with
    gradient accumulation. (test_resume_of_a_two_rank_run resumes a streamed 2-rank run.)"""
    common = ["--model", str(setup["model"]), "--data", str(setup["notes"])]
    kw = dict(grad_accum=2, grad_clip=0.05, eval_every=0, save_every=0, steps=3)
    runs = {}
    for flag in ["--stream-state", "--no-stream-state"]:
        out = tmp_path / flag.strip("-")
        done = _mlx_launch(common + ["--out", str(out), flag, *_argv(**kw)])
        assert done.returncode == 0, done.stdout + done.stderr
        runs[flag] = (_adapter(out), done.stdout)
    streamed, in_memory = runs["--stream-state"], runs["--no-stream-state"]
    assert _max_diff(streamed[0], in_memory[0]) < 1e-6

    assert "--stream-state: LoRA weights, gradient sums and AdamW moments" in streamed[1]
    assert "--stream-state" not in in_memory[1]
    # the clip acts in this run: without it the first step's update differs
    one = dict(steps=1, eval_every=0, save_every=0, stream_state=False)
    for clip in (0.05, 0.0):
        _single(setup["model"], setup["notes"], tmp_path / f"clip{clip}", grad_clip=clip, **one)
    assert _max_diff(_adapter(tmp_path / "clip0.05"), _adapter(tmp_path / "clip0.0")) > 1e-4


def test_resume_with_another_global_batch_is_refused_in_one_line(setup, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(setup["out"], out)
    with pytest.raises(UserError, match="global batch was 2 rank") as e:
        _single(setup["model"], setup["notes"], out, steps=4, resume=True)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("edgelora-*"))  # the refused run's weight stream is gone
    # one process with --batch-size 2 trains the same rows per step: it may continue
    _single(setup["model"], setup["notes"], out, steps=3, batch_size=2, resume=True)


def _spill_left(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.exists() else []


@pytest.mark.parametrize("how", ["hang", "kill"])
def test_a_stopped_or_killed_rank_ends_the_other_with_one_line(setup, tmp_path, how):
    """SIGSTOP: rank 0 blocks in a collective until its watchdog ends it; SIGKILL: the ring
    reports the lost peer at once. Either way one error line and no spill folder left."""
    common = ["--model", str(setup["model"]), "--data", str(setup["notes"])]
    argvs = [
        common + ["--out", str(tmp_path / f"o{r}"), "--spill-dir", str(tmp_path / f"s{r}")]
        + _argv(steps=100_000, eval_every=0, save_every=0, dist_timeout=5)
        for r in range(2)
    ]  # fmt: skip
    procs = _start_ranks(tmp_path, argvs)
    try:
        metrics = tmp_path / "o0" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert procs[0].poll() is None and time.monotonic() < deadline, _log(procs[0])
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGSTOP if how == "hang" else signal.SIGKILL)
        code = procs[0].wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log0 = _log(procs[0])
    errors = [line for line in log0.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, log0
    expected = "no progress for 5 s" if how == "hang" else "lost the connection to another rank"
    assert expected in errors[0] and "--resume" in errors[0]
    assert _spill_left(tmp_path / "s0") == []


def test_plan_reports_per_rank_memory_and_the_global_batch():
    model, _ = build_tiny_model("llama")
    cfg = TrainConfig(batch_size=2, grad_accum=3, max_seq_len=64).validate()
    text = plan.estimate(model, cfg, ranks=4).describe()
    assert "per rank, 4 ranks" in text
    assert "global batch 24 sequences of 64 tokens = 4 rank(s) x --batch-size 2" in text
    assert plan.estimate(model, cfg, ranks=4).total_gb == plan.estimate(model, cfg).total_gb


@pytest.mark.parametrize(
    "opts",
    [dict(engine="graph"), dict(checkpoint_every=3), dict(split_blocks=False, cache_policy="last")],
)
def test_grad_hook_sees_every_segment_once_and_its_result_is_kept(opts):
    """The seam the all-reduce (and a per-segment optimizer) plugs into: each segment's
    gradients pass through the hook once, in backward order, and what it returns is used."""
    from test_engine import make_batch, make_model, reference_head

    from mlx_edgelora import engine

    model, batch = make_model("llama", None), make_batch()
    cfg = TrainConfig(activations="ram", stream_weights=False, **opts).validate()
    step = engine.make_step(model, cfg, reference_head(model))
    _, _, plain = step(batch)
    seen = []

    def hook(j, grads):
        seen.append(j)
        return tree_map(lambda g: 3 * g, grads)

    step.grad_hook = hook
    _, _, hooked = step(batch)
    n_seg = 1 if cfg.engine == "graph" else len(step.segments)
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == n_seg
    for (k, a), (_, b) in zip(tree_flatten(hooked), tree_flatten(plain), strict=True):
        assert mx.allclose(a, 3 * b, rtol=1e-5, atol=1e-7), k


def test_ints_from_main_are_exact_beyond_float32():
    """Rank 0's ints reach the others exactly, e.g. a float64's bits as two int32s (the best
    validation loss of --keep-best); through a float32 buffer they were rounded."""
    world = distributed.World(mx.distributed.init(strict=False), timeout=5.0)
    ints = [2**31 - 1, -(2**31), 123_456_789, -1, 0]
    assert world.ints_from_main(ints) == ints
