"""The planner: fastest fitting configuration, options the user set kept, a default budget from
RAM, one-line refusals (nothing fits, disk too small), and the trainer running its choice."""

import io
import json
from collections import namedtuple

import pytest
from conftest import build_tiny_model

from mlx_edgelora import lora, plan, planner, quant
from mlx_edgelora.config import TrainConfig, parse_config
from mlx_edgelora.errors import UserError
from mlx_edgelora.report import Reporter
from mlx_edgelora.trainer import train

SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=3,
    intermediate_size=768,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=8192,
    tie_word_embeddings=True,
)
# A made-up speed model (the calibrated one changes with measurements): RAM boundaries and
# resident weights are faster, larger segments faster still.
SPEED = {
    "activations": {"ram": 0.9},
    "stream_weights": {False: 0.8},
    "checkpoint_every": {2: 0.95, 4: 0.9},
}
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(autouse=True)
def speed(monkeypatch):
    monkeypatch.setattr(planner, "SPEED", {512: SPEED, 2048: SPEED})


@pytest.fixture(scope="module")
def sizes():
    model, _ = build_tiny_model("llama", quantize_bits=4, **SHAPE)
    lora.apply_lora(model, TrainConfig())
    quant.prepare_for_training(model)
    return plan.sizes(model)


def _cfg(tmp_path, *argv):
    return parse_config(["--max-seq-len", "2048", "--out", str(tmp_path / "out"), *argv])


def _peak(sizes, cfg):
    return plan.estimate(sizes, cfg).total_gb


def test_picks_the_fastest_configuration_that_fits(tmp_path, sizes):
    roomy = _cfg(tmp_path, "--memory-budget-gb", "100")
    cfg, memory_plan, why = planner.choose(sizes, roomy)
    assert (cfg.activations, cfg.stream_weights, cfg.checkpoint_every) == ("ram", False, 4)
    assert "chosen:" in why and memory_plan.total_gb == _peak(sizes, cfg)
    # A budget between the smallest plan and that one: the fastest of what fits, by brute force.
    budget = (_peak(sizes, cfg) + min(_peak(sizes, c) for c in planner.candidates(roomy))) / 2
    tight = _cfg(tmp_path, "--memory-budget-gb", str(budget))
    chosen, _, _ = planner.choose(sizes, tight)
    fitting = [c for c in planner.candidates(tight) if _peak(sizes, c) <= budget]
    assert _peak(sizes, chosen) <= budget
    assert planner.relative_speed(chosen) == min(planner.relative_speed(c) for c in fitting)
    assert planner.relative_speed(chosen) > planner.relative_speed(cfg)  # it had to give way


def test_options_the_user_set_are_kept(tmp_path, sizes):
    cfg, _, why = planner.choose(
        sizes, _cfg(tmp_path, "--memory-budget-gb", "100", "--activations", "disk")
    )
    assert cfg.activations == "disk" and cfg.stream_weights is False
    assert "kept as set: --activations" in why
    yaml = tmp_path / "c.yaml"
    yaml.write_text("checkpoint_every: 1\nstream_weights: true\n")
    cfg, _, _ = planner.choose(
        sizes, _cfg(tmp_path, "--config", str(yaml), "--memory-budget-gb", "100")
    )
    assert (cfg.checkpoint_every, cfg.stream_weights, cfg.activations) == (1, True, "ram")
    built = TrainConfig(out=str(tmp_path / "o"), split_blocks=False, memory_budget_gb=100.0)
    assert planner.choose(sizes, built.validate())[0].split_blocks is False  # Python: non-default


def test_without_a_budget_the_defaults_are_kept_when_they_fit(tmp_path, sizes, monkeypatch):
    monkeypatch.setattr(planner, "physical_memory_gb", lambda: 16.0)
    assert planner.default_budget_gb() == planner.BUDGET_FRACTION * 16.0
    defaults = _cfg(tmp_path)
    cfg, _, why = planner.choose(sizes, defaults)
    assert cfg == defaults and "default: 0.5 x 16.0 GB of RAM" in why
    # The defaults are the leanest in memory; a disk too small for them makes the planner step
    # in under the default budget: it runs what needs no disk.
    small = Usage(10**12, 10**12, plan.disk_bytes(sizes, defaults) // 2)
    monkeypatch.setattr(planner.shutil, "disk_usage", lambda p: small)
    cfg, _, why = planner.choose(sizes, defaults)
    assert plan.disk_bytes(sizes, cfg) == 0 and "chosen:" in why


def test_nothing_fits_names_the_largest_context_that_fits(tmp_path, sizes):
    floor = min(_peak(sizes, c) for c in planner.candidates(_cfg(tmp_path)))
    budget = round(floor * 0.6, 4)
    with pytest.raises(UserError) as e:
        planner.choose(sizes, _cfg(tmp_path, "--memory-budget-gb", str(budget)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--memory-budget-gb {budget:g}: no configuration")
    seq = int(msg.split("the largest --max-seq-len that fits is ")[1])
    planner.choose(
        sizes, _cfg(tmp_path, "--memory-budget-gb", str(budget), "--max-seq-len", str(seq))
    )
    with pytest.raises(UserError):
        too_long = ["--memory-budget-gb", str(budget), "--max-seq-len", str(seq + 1)]
        planner.choose(sizes, _cfg(tmp_path, *too_long))


def test_nothing_fits_names_the_set_option_to_drop(tmp_path, sizes):
    free = _cfg(tmp_path)
    budget = min(_peak(sizes, c) for c in planner.candidates(free)) * 1.01
    argv = ["--memory-budget-gb", str(budget), "--no-split-blocks", "--checkpoint-every", "4"]
    with pytest.raises(UserError, match=r"; --split-blocks --checkpoint-every 1 fits \("):
        planner.choose(sizes, _cfg(tmp_path, *argv))


def test_a_disk_too_small_is_refused_up_front(tmp_path, sizes, monkeypatch):
    cfg = _cfg(tmp_path, "--memory-budget-gb", "100", "--activations", "disk")
    need = plan.disk_bytes(sizes, planner.choose(sizes, cfg)[0])
    assert need > 0
    monkeypatch.setattr(planner.shutil, "disk_usage", lambda p: Usage(10**12, 10**12, need // 2))
    with pytest.raises(UserError, match=rf"^{tmp_path}: needs ~.* free for spilled activations"):
        planner.choose(sizes, cfg)
    # with the options free, it runs what needs no disk
    chosen, _, _ = planner.choose(sizes, _cfg(tmp_path, "--memory-budget-gb", "100"))
    assert plan.disk_bytes(sizes, chosen) == 0


def test_a_spill_dir_not_created_yet_is_measured_on_its_parent(tmp_path, sizes):
    cfg = _cfg(tmp_path, "--spill-dir", str(tmp_path / "not" / "yet"))
    assert planner.choose(sizes, cfg)[0] == cfg


def test_the_trainer_runs_the_planners_choice(tmp_path, tiny_model_dir):
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(4):
        (notes / f"d{i}.txt").write_text(f"Day {i}. The bees were calm this morning. " * 20)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(notes), "--out", str(out)]
    argv += ["--steps", "1", "--max-seq-len", "64", "--eval-every", "0", "--save-every", "0"]
    argv += ["--memory-budget-gb", "50", "--activations", "disk"]
    printed = io.StringIO()
    train(parse_config(argv), reporter=Reporter(1, stream=printed))
    printed = printed.getvalue()
    assert "planner: budget 50.00 GB" in printed and "chosen:" in printed
    saved = json.loads((out / "adapter_config.json").read_text())["edgelora"]
    assert saved["activations"] == "disk" and saved["stream_weights"] is False  # as chosen
