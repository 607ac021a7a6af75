"""The training loop end to end on tiny models: loss falls, output is safe, resume is exact."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_edgelora import checkpoint
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.errors import UserError
from mlx_edgelora.loading import load_model
from mlx_edgelora.report import Reporter
from mlx_edgelora.trainer import train

TEXT = (
    "The bees at the north hive were calm this morning. I lifted the lid, checked the brood, "
    "and counted nine frames of capped honey. Mara says the clover is early this year. "
)


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(6):
        (folder / f"day{i}.txt").write_text(f"Day {i}. " + TEXT * 3)
    return folder


def _cfg(model_dir, notes, out, **kw):
    base = dict(
        model=str(model_dir),
        data=str(notes),
        out=str(out),
        steps=6,
        max_seq_len=64,
        batch_size=2,
        lr=5e-3,
        warmup=1,
        rank=4,
        eval_every=3,
        eval_batches=2,
        save_every=2,
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _adapter(out):
    return mx.load(str(out / "adapters.safetensors"))


@pytest.mark.parametrize("engine", ["graph", "segments"])
def test_training_lowers_loss_and_writes_an_mlx_lm_adapter(tmp_path, tiny_model_dir, notes, engine):
    out = tmp_path / "out"
    result = train(_cfg(tiny_model_dir, notes, out, steps=12, engine=engine, eval_every=0))
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["lora_parameters"]["rank"] == 4 and acfg["fine_tune_type"] == "lora"
    assert result.val_loss is not None and result.peak_gb > 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 12


def test_non_empty_out_is_never_overwritten_without_flag(tmp_path, tiny_model_dir, notes):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        train(_cfg(tiny_model_dir, notes, out, steps=1))
    with pytest.raises(UserError, match="no checkpoint"):
        train(_cfg(tiny_model_dir, notes, out, steps=1, resume=True))
    train(_cfg(tiny_model_dir, notes, out, steps=1, overwrite=True))
    assert (out / "mine.txt").read_text() == "precious"  # --overwrite only replaces our files


class _StopAt(Reporter):
    """A reporter that 'presses Ctrl-C' right after optimizer step `stop_at`."""

    def __init__(self, stop_at: int, total: int):
        super().__init__(total)
        self.stop_at = stop_at

    def step(self, step, *a, **k):
        rec = super().step(step, *a, **k)
        if step == self.stop_at:
            raise KeyboardInterrupt
        return rec


def test_interrupted_run_resumes_exactly_where_it_stopped(tmp_path, tiny_model_dir, notes):
    full = tmp_path / "full"
    train(_cfg(tiny_model_dir, notes, full, grad_accum=2))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, notes, cut, grad_accum=2), reporter=_StopAt(3, 6))
    assert checkpoint.latest(cut).name == "step-000003"  # saved on the way out
    loaded = load_model(str(tiny_model_dir))
    result = train(_cfg(tiny_model_dir, notes, cut, grad_accum=2, resume=True), loaded=loaded)
    assert [r["step"] for r in result.history if "loss" in r] == [4, 5, 6]
    a, b = _adapter(full), _adapter(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6), k


def test_resume_rejects_a_changed_rank(tmp_path, tiny_model_dir, notes):
    out = tmp_path / "out"
    train(_cfg(tiny_model_dir, notes, out, steps=2))
    with pytest.raises(UserError, match="--rank"):
        train(_cfg(tiny_model_dir, notes, out, steps=4, rank=8, resume=True))


@pytest.mark.parametrize("stream", [False, True])
def test_trainable_parameters_are_only_lora(tmp_path, tiny_model_dir, notes, stream):
    """Frozen weights never change; streamed ones (blocks, embedding/head) are all back after
    the run. Also trains with the predicted-fill subset loss."""
    loaded = load_model(str(tiny_model_dir))
    base = {k: v for k, v in tree_flatten(loaded.model.parameters())}
    cfg = _cfg(tiny_model_dir, notes, tmp_path / "o", steps=2, stream_weights=stream)
    if stream:
        cfg = TrainConfig(**{**cfg.to_dict(), "loss": "subset", "subset_k": 50})
    train(cfg, loaded=loaded)
    after = dict(tree_flatten(loaded.model.parameters()))
    checked = 0
    for k, v in base.items():
        head, _, leaf = k.rpartition(".")
        key = k if k in after else f"{head}.linear.{leaf}"  # inside a LoRA layer now
        assert after[key].shape == v.shape, f"{k} not restored"
        assert mx.array_equal(after[key], v), f"frozen weight {k} changed"
        checked += 1
    assert checked == len(base)


def test_without_keep_model_streamed_weights_stay_off_and_leave_no_files(
    tmp_path, tiny_model_dir, notes
):
    """The CLI's path: no reload after training (it exits), the weight folder is gone, and the
    reported peak is the training peak (a reload would add every weight on top of Adam)."""
    loaded = load_model(str(tiny_model_dir))
    cfg = _cfg(tiny_model_dir, notes, tmp_path / "o", steps=2)
    assert cfg.validate().stream_weights  # the default
    result = train(cfg, loaded=loaded, keep_model=False)
    layer = loaded.model.model.layers[0]
    assert layer.mlp.down_proj.linear.weight.size == 0  # still a placeholder
    assert not list(tmp_path.glob("edgelora-weights-*"))
    assert 0 < result.peak_gb


def test_cli_run_killed_with_sigkill_resumes_from_its_last_checkpoint(
    tmp_path, tiny_model_dir, notes
):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "mlx_edgelora.train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(notes),
        "--out",
        str(out),
        "--steps",
        "400",
        "--max-seq-len",
        "32",
        "--rank",
        "4",
        "--save-every",
        "3",
        "--eval-every",
        "0",
        "--activations",
        "disk",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while checkpoint.latest(out) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: only what is on disk survives
    proc.wait()
    saved = checkpoint.find(out)[1]["step"]  # (the kill may land before latest.json is written)
    assert saved >= 3 and saved < 400
    args[args.index("400")] = str(saved + 3)
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {saved}" in done.stdout
    assert f"step {saved + 3}/{saved + 3}" in done.stdout
    assert not list(tmp_path.glob("edgelora-*")), "the killed run's spill folder was not swept"


def test_cached_subset_steps_log_an_approximate_loss(tmp_path, tiny_model_dir, notes):
    """--subset-refresh 2: steps 1 and 3 score the head (exact loss), step 2 reuses the
    cache; the log says which, and validation stays exact."""
    out = tmp_path / "out"
    cfg = _cfg(tiny_model_dir, notes, out, steps=3, eval_every=3, save_every=0)
    cfg.loss, cfg.subset_k, cfg.subset_refresh = "subset", 40, 2
    result = train(cfg)
    steps = [r for r in result.history if "loss" in r]
    assert [r["loss_exact"] for r in steps] == [True, False, True]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_exact"] for r in logged if "loss" in r] == [True, False, True]
    assert any("val_loss" in r for r in logged)
