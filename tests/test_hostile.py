"""Hostile input and faults (issue 15): each case a reproduction of a probe that once lost a
user's data, crashed, or saved garbage with exit code 0. The next probe starts from here.

Input-parsing cases owned elsewhere (GGUF headers, data files, model folders) are in
test_hostile_input.py.
"""

import errno
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)
import mlx.core as mx

# isort: on
import pytest
from conftest import build_tiny_model, write_tiny_model_dir
from mlx.utils import tree_flatten, tree_unflatten

from mlx_edgelora import checkpoint, files, fuse, lora
from mlx_edgelora.config import TrainConfig, parse_config
from mlx_edgelora.errors import UserError
from mlx_edgelora.loading import load_model
from mlx_edgelora.report import Reporter
from mlx_edgelora.trainer import train

TEXT = "The bees at the north hive were calm. I counted nine frames of capped honey. " * 4


@pytest.fixture
def model_dir(tmp_path):
    return write_tiny_model_dir(tmp_path / "model", "llama")


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(6):
        (folder / f"day{i}.txt").write_text(f"Day {i}. " + TEXT)
    return folder


def _cfg(model_dir, notes, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(notes), out=str(out), steps=4, max_seq_len=32)
    base.update(rank=4, lr=5e-3, warmup=1, eval_every=0, save_every=2, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != files.LOCK_FILE
    }


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


# --- data loss 1: fuse into the base's own folder -----------------------------------------


def _adapter(model_dir: Path, folder: Path) -> Path:
    loaded = load_model(str(model_dir))
    acfg = lora.apply_lora(loaded.model, TrainConfig(model=str(model_dir), rank=4))
    b = [(k, 0.05 * mx.ones(v.shape)) for k, v in tree_flatten(loaded.model.trainable_parameters())]
    loaded.model.update(tree_unflatten([(k, v) for k, v in b if k.endswith("lora_b")]))
    lora.save_adapters(loaded.model, folder, acfg)
    return folder


@pytest.mark.parametrize("where", ["same", "inside", "recorded"])
def test_fuse_never_writes_into_the_model_folder(tmp_path, model_dir, where):
    adapter = _adapter(model_dir, tmp_path / "adapter")
    before = _digests(model_dir)
    out = model_dir / "fused" if where == "inside" else model_dir
    model = None if where == "recorded" else str(model_dir)  # the base adapter_config names
    with pytest.raises(UserError, match="inside the model folder") as e:
        fuse.fuse(model, str(adapter), str(out), overwrite=True)
    _one_line(e)
    assert _digests(model_dir) == before


def test_failed_fuse_leaves_the_old_output_and_no_temp_folder(tmp_path, model_dir, monkeypatch):
    adapter = _adapter(model_dir, tmp_path / "adapter")
    out = fuse.fuse(str(model_dir), str(adapter), str(tmp_path / "fused"))
    (out / "notes.txt").write_text("mine")
    before = _digests(out)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fuse, "write_safetensors", disk_full)  # fuse writes tensor by tensor
    with pytest.raises(UserError, match="No space left") as e:
        fuse.fuse(str(model_dir), str(adapter), str(out), overwrite=True)
    _one_line(e)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "fused", "model"]
    monkeypatch.undo()
    dead = _dead_pid()
    (tmp_path / f".fused.fuse-{dead}-tmp").mkdir()  # what a SIGKILLed fuse leaves
    fuse.fuse(str(model_dir), str(adapter), str(out), overwrite=True)  # replaces ours only
    assert not (tmp_path / f".fused.fuse-{dead}-tmp").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()


# --- data loss 2: --overwrite clears the old run only once everything is checked ------------


@pytest.mark.parametrize("bad", ["data", "model", "disk", "lora_keys"])
def test_overwrite_with_a_bad_input_keeps_the_old_run(tmp_path, model_dir, notes, bad, monkeypatch):
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out))
    before = _digests(out)
    kw = {"overwrite": True}
    if bad == "data":
        kw["data"] = str(tmp_path / "typo")
    elif bad == "model":
        kw["model"] = str(tmp_path / "typo")
    elif bad == "lora_keys":
        kw["lora_keys"] = ["self_attn.q_prj"]
    else:
        usage = files.shutil.disk_usage(out)
        monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(UserError) as e:
        train(_cfg(model_dir, notes, out, **kw))
    msg = _one_line(e)
    if bad == "disk":
        assert "needs ~" in msg and "MB free" in msg and "0.0 GB" not in msg
    assert _digests(out) == before


# --- data loss 3 and "validate once": every value typed against the dataclass ---------------


@pytest.mark.parametrize(
    "yaml_text,flag",
    [
        ('overwrite: "false"', "--overwrite"),
        ("resume: yes please", "--resume"),
        ('steps: "abc"', "--steps"),
        ("rank: 4.5", "--rank"),
        ("seed: 12345678901234567890123", "--seed"),
        ("lora_keys: self_attn.q_proj", "--lora-keys"),
        ("lora_keys: [1, 2]", "--lora-keys"),
        ("lr: .nan", "--lr"),
        ("lora_scale: .inf", "--lora-scale"),
        ("loss: bogus", "--loss"),
        ("subset_fill: random", "--subset-fill"),
        ("cache_policy: everything", "--cache-policy"),
        ("engine: fast", "--engine"),
        ("activations: cloud", "--activations"),
        ("quantize: 3", "--quantize"),
        ("model: 123", "--model"),
        ("lora_keys: []", "--lora-keys"),
        ('out: ""', "--out"),
    ],
)
def test_yaml_values_are_type_checked(tmp_path, yaml_text, flag):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(UserError, match=flag) as e:
        parse_config(["--config", str(path)])
    _one_line(e)


def test_yaml_numbers_in_any_spelling_are_read_as_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nsteps: 10.0\nlora_scale: 2\nresume: false\n")  # 1e-4: a str
    cfg = parse_config(["--config", str(path)])
    assert cfg.lr == 1e-4 and cfg.steps == 10 and isinstance(cfg.steps, int)
    assert cfg.lora_scale == 2.0 and isinstance(cfg.lora_scale, float) and cfg.resume is False


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lora-scale", "nan"], "--lora-scale"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--lora-dropout", "1.0"], "--lora-dropout"),
        (["--lora-dropout", "-0.1"], "--lora-dropout"),
        (["--num-layers", "0"], "--num-layers"),
        (["--num-layers", "-2"], "--num-layers"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--eval-batches", "0"], "--eval-batches"),
    ],
)
def test_cli_values_out_of_range_are_one_line_errors(argv, flag):
    with pytest.raises(UserError, match=flag) as e:
        parse_config(argv)
    _one_line(e)


def test_api_config_is_checked_like_the_cli():
    with pytest.raises(UserError, match="--overwrite"):
        TrainConfig(overwrite="false").validate()
    with pytest.raises(UserError, match="--lora-keys"):
        TrainConfig(lora_keys="self_attn.q_proj").validate()


def test_lora_keys_must_name_a_linear_module():
    model, _ = build_tiny_model("llama")
    for key in ["self_attn.rope", "self_attn", "input_layernorm"]:
        with pytest.raises(UserError, match="not a linear projection") as e:
            lora.apply_lora(model, TrainConfig(lora_keys=[key]))
        offered = _one_line(e).split("choose from ")[1].split(", ")
        assert "self_attn.q_proj" in offered and "mlp.down_proj" in offered
        assert not any("rope" in k or "norm" in k or k == "self_attn" for k in offered)


# --- 4: one run per --out -------------------------------------------------------------------


_HOLDER = """
import sys, time
from pathlib import Path
from mlx_edgelora.files import OutLock
lock = OutLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_out_names_the_first(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"another run \\(pid {holder.pid}\\)") as e:
            train(_cfg(model_dir, notes, out))
        _one_line(e)
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    files.OutLock(out).release()  # free again, without any cleanup by the killed holder


# --- 5: checkpoint faults -------------------------------------------------------------------


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out))  # checkpoints step-2 and step-4
    root = checkpoint.checkpoints_dir(out)
    opt_file = root / "step-000004" / "optimizer.safetensors"
    opt_file.write_bytes(opt_file.read_bytes()[:-100])  # truncated, as by a full disk
    (root / "latest.json").write_text('{"step": 4, "dir": "../..')  # corrupt pointer
    (root / ".tmp-step-000006-99999").mkdir()  # a failed save's leftover
    said = io.StringIO()
    reporter = Reporter(6, log_path=out / "metrics.jsonl", stream=said)
    result = train(_cfg(model_dir, notes, out, steps=6, resume=True), reporter=reporter)
    said = said.getvalue()
    assert "step-000004 is damaged" in said and "optimizer.safetensors" in said
    assert "latest.json is unreadable" in said and "resumed from step 2" in said
    assert [r["step"] for r in result.history if "loss" in r] == [3, 4, 5, 6]
    assert not list(root.glob(".tmp-*"))


def test_latest_json_is_never_followed_outside_out(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out, steps=2))
    root = checkpoint.checkpoints_dir(out)
    (root / "latest.json").write_text(json.dumps({"step": 2, "dir": "../.."}))
    folder, state, notes_ = checkpoint.find(out)
    assert folder == root / "step-000002" and state["step"] == 2
    assert any("points outside" in n for n in notes_)


def test_checkpoint_without_intact_files_is_refused_in_one_line(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out, steps=2))
    (checkpoint.checkpoints_dir(out) / "step-000002" / "state.json").write_text("{")
    with pytest.raises(UserError, match="no intact checkpoint") as e:
        train(_cfg(model_dir, notes, out, steps=4, resume=True))
    _one_line(e)


@pytest.mark.parametrize("stream_state", [False, True])
def test_full_disk_during_save_leaves_no_partial_folder(
    tmp_path, model_dir, notes, monkeypatch, stream_state
):
    out = tmp_path / "out"
    # in-memory state is saved by mx.save_safetensors, streamed state by our own writer
    owner, name = (checkpoint, "write_safetensors") if stream_state else (mx, "save_safetensors")
    save = getattr(owner, name)
    calls = []

    def fills_up(path, arrays, *a):
        calls.append("checkpoints" in str(path))
        if sum(calls) > 2:  # step 2's checkpoint (2 files) fits, step 4's does not
            Path(path).write_bytes(b"partial")
            raise RuntimeError("[save_safetensors] No space left on device")
        save(path, arrays, *a)

    monkeypatch.setattr(owner, name, fills_up)
    with pytest.raises(UserError, match="cannot save checkpoint step 4") as e:
        train(_cfg(model_dir, notes, out, stream_state=stream_state))
    assert "earlier checkpoints are intact" in _one_line(e)
    root = checkpoint.checkpoints_dir(out)
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["step-000002"]
    checkpoint.verify(root / "step-000002")


@pytest.mark.parametrize("what", ["weights", "LoRA state"])
def test_full_disk_while_offloading_is_one_line(tmp_path, model_dir, notes, monkeypatch, what):
    save, calls = mx.save_safetensors, []
    prefix = "edgelora-weights-" if what == "weights" else "edgelora-state-"

    def fills_up(path, arrays, *a):
        calls.append(path)
        if prefix in path and len(calls) > 3:
            raise RuntimeError("[save_safetensors] No space left on device")
        save(path, arrays, *a)

    monkeypatch.setattr(mx, "save_safetensors", fills_up)
    with pytest.raises(UserError, match=f"cannot write streamed {what}") as e:
        train(_cfg(model_dir, notes, tmp_path / "out", stream_state=True))
    flag = "--no-stream-weights" if what == "weights" else "--no-stream-state"
    assert flag in _one_line(e)
    assert not list(tmp_path.glob("edgelora-*"))


def test_free_space_is_checked_before_a_save(tmp_path, monkeypatch):
    model, _ = build_tiny_model("llama")
    lora.apply_lora(model, TrainConfig(rank=4))
    import mlx.optimizers as optim

    usage = files.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    with pytest.raises(UserError, match="MB free") as e:
        checkpoint.save(tmp_path, 1, model, optim.AdamW(learning_rate=1e-3), {})
    _one_line(e)
    assert not list(checkpoint.checkpoints_dir(tmp_path).iterdir())


# --- 6: signals -----------------------------------------------------------------------------


def _cli(model_dir, notes, out, steps):
    return [sys.executable, "-m", "mlx_edgelora.train", "--model", str(model_dir)] + [
        "--data", str(notes), "--out", str(out), "--steps", str(steps), "--max-seq-len", "32",
        "--rank", "4", "--save-every", "3", "--eval-every", "0", "--activations", "disk",
    ]  # fmt: skip


def _wait_for_checkpoint(proc, out, timeout=120):
    deadline = time.time() + timeout
    while checkpoint.latest(out) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal could be sent"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_like_ctrl_c(tmp_path, model_dir, notes, sig):
    out = tmp_path / "out"
    # A shell without job control starts background jobs (CI launched with `&`) with SIGINT
    # ignored, and the trainer rightly keeps an inherited ignore: give the run a default one.
    proc = subprocess.Popen(
        _cli(model_dir, notes, out, 2000), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    _wait_for_checkpoint(proc, out)
    time.sleep(0.3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr  # 143 / 130
    assert "interrupted: checkpoint at step" in stdout and "stopped" in stderr
    step = int(stdout.split("interrupted: checkpoint at step ")[1].split(";")[0])
    assert checkpoint.latest(out).name == f"step-{step:06d}"
    checkpoint.verify(checkpoint.latest(out))
    assert not list(tmp_path.glob("edgelora-*")), "spill / weight folders left behind"


def test_an_inherited_sigint_ignore_is_honoured(tmp_path, model_dir, notes):
    """Launched with SIGINT ignored (nohup-style), a Ctrl-C must not remove the run's temp
    folders and then crash it: the run goes on and finishes."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli(model_dir, notes, out, 60), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    _wait_for_checkpoint(proc, out)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "step 60/60" in stdout and "interrupted" not in stdout


# --- 8: non-finite training stops; metrics stay JSON ----------------------------------------


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"step \d+: the (loss|gradient norm) became non-fin") as e:
        train(_cfg(model_dir, notes, out, steps=20, lr=1e30, save_every=1, grad_clip=0.0))
    msg = _one_line(e)
    assert "last good checkpoint" in msg or "nothing was saved" in msg
    for path in [out / "adapters.safetensors", *out.glob("checkpoints/step-*/*.safetensors")]:
        assert all(mx.all(mx.isfinite(v)).item() for v in mx.load(str(path)).values()), path
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_metrics_log_never_holds_a_bare_nan(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rep = Reporter(2, log_path=log)
    rep.step(1, float("nan"), 10, 1e-3)
    rep.eval(1, float("inf"), 10)
    for line in log.read_text().splitlines():
        rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
        assert None in rec.values()


# --- semantics ------------------------------------------------------------------------------


def test_resume_on_another_base_is_refused(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out, steps=2))
    other = write_tiny_model_dir(tmp_path / "other", "qwen2")
    with pytest.raises(UserError, match="--model") as e:
        train(_cfg(other, notes, out, steps=4, resume=True))
    _one_line(e)
    with pytest.raises(UserError, match="--quantize") as e:
        train(_cfg(model_dir, notes, out, steps=4, resume=True, quantize=4))
    _one_line(e)


def test_resume_with_fewer_steps_says_there_is_nothing_to_do(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out, steps=4))
    for steps in (2, 4):
        with pytest.raises(UserError, match="nothing to do.*at step 4") as e:
            train(_cfg(model_dir, notes, out, steps=steps, resume=True))
        _one_line(e)


def test_with_epochs_the_steps_left_are_judged_once_the_data_is_known():
    from mlx_edgelora.trainer import _check_resume

    saved = {"step": 50, "config": {}}  # beyond the default --steps 40
    _check_resume(TrainConfig(epochs=3.0).validate(), saved)  # steps come from the data later
    with pytest.raises(UserError, match="nothing to do"):
        _check_resume(TrainConfig(steps=50).validate(), saved)


def test_resume_truncates_the_killed_runs_extra_metrics(tmp_path, model_dir, notes):
    out = tmp_path / "out"
    train(_cfg(model_dir, notes, out, steps=4))
    with open(out / "metrics.jsonl", "a") as f:  # what a run killed at step 6 leaves behind
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n{"step": 7, "lo')
    train(_cfg(model_dir, notes, out, steps=6, resume=True))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 6]  # each run's final eval


# --- 10: one-line errors instead of tracebacks ----------------------------------------------


def test_out_on_a_read_only_disk_is_one_line(tmp_path, model_dir, notes, monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.Path, "mkdir", read_only)
    with pytest.raises(UserError, match="Read-only file system") as e:
        train(_cfg(model_dir, notes, tmp_path / "ro" / "out"))
    assert "--out" in _one_line(e)


@pytest.mark.parametrize("damage", ["truncated", "config_json", "config_keys", "rank"])
def test_a_damaged_adapter_is_a_one_line_error(tmp_path, model_dir, damage):
    adapter = _adapter(model_dir, tmp_path / "adapter")
    weights, acfg_path = adapter / lora.ADAPTER_FILE, adapter / lora.CONFIG_FILE
    acfg = json.loads(acfg_path.read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-50])
        expect = "truncated or corrupt"
    elif damage == "config_json":
        acfg_path.write_text(acfg_path.read_text()[:40])
        expect = "not valid JSON"
    elif damage == "config_keys":
        del acfg["lora_parameters"]["rank"]
        acfg_path.write_text(json.dumps(acfg))
        expect = "lora_parameters.rank"
    else:
        acfg["lora_parameters"]["rank"] = 8
        acfg_path.write_text(json.dumps(acfg))
        expect = r"does not fit this model: .*lora_[ab]: adapter shape .* \(and \d+ more\)"
    for module, extra in [("generate", ["--prompt", "hi"]), ("fuse", ["--out", "f"])]:
        args = ["--model", str(model_dir), "--adapter", str(adapter)] + extra
        proc = subprocess.run(
            [sys.executable, "-m", f"mlx_edgelora.{module}", *args],
            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        # fuse first says where the base loads from (issue 15, item 13); then one error line
        lines = [ln for ln in lines if not ln.startswith(f"{module}: base model: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert re.search(expect, lines[0]), lines[0]


def test_small_sizes_are_shown_in_mb():
    assert files.format_bytes(12_000_000) == "12.0 MB" and files.format_bytes(3e9) == "3.0 GB"
