"""--epochs, --keep-best, --early-stop and --report-to, including across --resume."""

import io
import json
import sys
import types

import mlx.core as mx
import numpy as np
import pytest
from conftest import write_tiny_model_dir
from test_trainer import _adapter, _cfg, _StopAt

from mlx_edgelora import checkpoint
from mlx_edgelora.errors import UserError
from mlx_edgelora.report import Reporter
from mlx_edgelora.selection import Selection, epoch_steps
from mlx_edgelora.trainer import train

# A high learning rate makes the tiny model's validation loss fall, then rise: the best
# adapter is then not the last one (checked in the test, not assumed).
NOISY = dict(
    lr=0.2, min_lr_ratio=1.0, warmup=0, steps=8, eval_every=1, save_every=2, eval_batches=-1
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", "llama")


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(6):
        (folder / f"day{i}.txt").write_text(f"Day {i}. " + "The bees were calm. " * (8 + i))
    return folder


def val_losses(out) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r}


def test_selection_tracks_the_best_and_counts_evaluations_since():
    sel = Selection()
    assert sel.update(0, 3.0) and sel.update(1, 2.0)
    assert not sel.update(2, 2.0) and not sel.should_stop(2)  # equal is no improvement
    assert not sel.update(3, float("nan")) and sel.should_stop(2) and not sel.should_stop(0)
    again = Selection.from_state(json.loads(json.dumps(sel.state_dict())))
    assert again == sel and (again.best_step, again.since_best) == (1, 2)


def test_epoch_steps_round_up():
    assert epoch_steps(1, 10, 2, 1) == 5 and epoch_steps(2, 10, 4, 1) == 5
    assert epoch_steps(0.5, 10, 2, 2) == 2 and epoch_steps(0.01, 3, 1, 1) == 1


def test_epochs_set_the_steps_and_are_shown(
    tmp_path,
    model_dir,
    notes,
):
    cfg = _cfg(model_dir, notes, tmp_path / "o", epochs=1.5, eval_every=0, batch_size=4)
    printed = io.StringIO()
    steps = [
        r["step"] for r in train(cfg, reporter=Reporter(0, stream=printed)).history if "loss" in r
    ]
    line = next(x for x in printed.getvalue().splitlines() if x.startswith("--epochs 1.5:"))
    rows = int(line.split()[2])  # "--epochs 1.5: R rows / (4 x 1 rows per step) -> S steps"
    assert steps == list(range(1, epoch_steps(1.5, rows, 4, 1) + 1))
    assert line.endswith(f"-> {len(steps)} steps")


def test_epochs_survive_resume(tmp_path, model_dir, notes):
    cfg = dict(epochs=1.5, eval_every=0, batch_size=4, save_every=0)
    full = train(_cfg(model_dir, notes, tmp_path / "full", **cfg))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model_dir, notes, cut, **cfg), reporter=_StopAt(2, 0))
    resumed = train(_cfg(model_dir, notes, cut, resume=True, **cfg))
    last = max(r["step"] for r in full.history)
    assert [r["step"] for r in resumed.history if "loss" in r] == list(range(3, last + 1))
    a, b = _adapter(tmp_path / "full"), _adapter(cut)
    assert all(mx.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_keep_best_saves_the_lowest_validation_loss_adapter(tmp_path, model_dir, notes):
    out = tmp_path / "best"
    noisy = dict(NOISY, steps=3)  # lr 0.2: falls at step 1, then rises (at steps 2-3 by >0.15)
    result = train(_cfg(model_dir, notes, out, keep_best=True, **noisy))
    losses = val_losses(out)
    best = min(losses, key=losses.get)
    assert 0 < best < max(losses.keys()), "loss did not fall then rise: the test proves nothing"
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["best_step"] == best == result.best_step
    assert acfg["best_val_loss"] == pytest.approx(losses[best])
    # the last checkpoint holds the last step's weights, which differ from the kept ones
    last = mx.load(str(checkpoint.latest(out) / "adapters.safetensors"))
    kept = _adapter(out)
    assert any(not mx.array_equal(kept[k], last[k]) for k in kept)
    # and it is the adapter of step `best` of the same run (interrupted there, it checkpoints)
    again = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model_dir, notes, again, **noisy), reporter=_StopAt(best, noisy["steps"]))
    ref = mx.load(str(checkpoint.latest(again) / "adapters.safetensors"))
    for k in kept:
        np.testing.assert_allclose(np.array(kept[k]), np.array(ref[k]), atol=1e-6)


def test_keep_best_survives_resume(tmp_path, model_dir, notes):
    full = tmp_path / "full"
    train(_cfg(model_dir, notes, full, keep_best=True, **NOISY))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model_dir, notes, cut, keep_best=True, **NOISY), reporter=_StopAt(5, 8))
    train(_cfg(model_dir, notes, cut, keep_best=True, resume=True, **NOISY))
    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (full, cut))
    assert a["best_step"] == b["best_step"]
    ka, kb = _adapter(full), _adapter(cut)
    for k in ka:
        assert mx.allclose(ka[k], kb[k], atol=1e-6), k


def test_early_stop_stops_after_k_evaluations_without_improvement(tmp_path, model_dir, notes):
    out = tmp_path / "es"
    result = train(_cfg(model_dir, notes, out, early_stop=2, **NOISY))
    losses = val_losses(out)
    steps = [r["step"] for r in result.history if "loss" in r]
    best, since, want = float("inf"), 0, None
    for step in sorted(losses):  # the rule, replayed on the logged losses
        best, since = (losses[step], 0) if losses[step] < best else (best, since + 1)
        if since == 2:
            want = step
            break
    assert want is not None and want < NOISY["steps"], "never stopped: the test proves nothing"
    assert steps[-1] == want and checkpoint.latest(out).name == f"step-{want:06d}"


def test_early_stop_survives_resume(tmp_path, model_dir, notes):
    full = tmp_path / "full"
    stop = [r["step"] for r in train(_cfg(model_dir, notes, full, early_stop=2, **NOISY)).history]
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model_dir, notes, cut, early_stop=2, **NOISY), reporter=_StopAt(2, 8))
    resumed = train(_cfg(model_dir, notes, cut, early_stop=2, resume=True, **NOISY))
    assert max(r["step"] for r in resumed.history) == max(stop)
    # resuming a run that already stopped trains no further step
    again = train(_cfg(model_dir, notes, cut, early_stop=2, resume=True, **NOISY))
    assert not [r for r in again.history if "loss" in r]


def test_keep_best_and_early_stop_need_validation(tmp_path, model_dir, notes):
    with pytest.raises(UserError, match="--val-fraction"):
        train(_cfg(model_dir, notes, tmp_path / "o", keep_best=True, val_fraction=0.0))
    with pytest.raises(UserError, match="--eval-every"):
        train(_cfg(model_dir, notes, tmp_path / "o", early_stop=2, eval_every=0))


# --- --report-to ---------------------------------------------------------------------------


def test_report_to_tensorboard_sends_every_record(tmp_path, model_dir, notes, monkeypatch):
    calls = []

    class SummaryWriter:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close", None))

    monkeypatch.setitem(
        sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    out = tmp_path / "tb"
    train(_cfg(model_dir, notes, out, steps=2, eval_every=1, report_to="tensorboard"))
    assert calls[0] == ("init", str(out / "tensorboard"))
    assert {("train/loss", 1), ("train/loss", 2), ("val/val_loss", 0), ("val/val_loss", 2)} <= set(
        calls
    )
    assert calls[-1] == ("close", None)  # the writer thread is drained at the end
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5  # still the full record


def test_report_to_wandb_goes_through_mlx_lms_callback(tmp_path, model_dir, notes, monkeypatch):
    from mlx_lm.tuner import callbacks

    logged, inits = [], []
    stub = types.SimpleNamespace(
        init=lambda **kw: inits.append(kw),
        log=lambda rec, step: logged.append((step, rec)),
        finish=lambda: logged.append(("finish", {})),
    )
    monkeypatch.setattr(callbacks, "wandb", stub)
    out = tmp_path / "wb"
    train(_cfg(model_dir, notes, out, steps=2, eval_every=1, report_to="wandb"))
    assert inits[0]["dir"] == str(out) and inits[0]["config"]["report_to"] == "wandb"
    assert [s for s, r in logged if "loss" in r] == [1, 2]
    assert [s for s, r in logged if "val_loss" in r] == [0, 1, 2]
    assert logged[-1][0] == "finish"


@pytest.mark.parametrize("kind, pip", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_missing_tracker_package_is_a_one_line_error(
    tmp_path, model_dir, notes, monkeypatch, kind, pip
):
    from mlx_lm.tuner import callbacks

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    monkeypatch.setattr(callbacks, "wandb", None)
    with pytest.raises(UserError, match=f"run `pip install {pip}`") as e:
        train(_cfg(model_dir, notes, tmp_path / kind, steps=1, report_to=kind))
    assert "\n" not in str(e.value)
