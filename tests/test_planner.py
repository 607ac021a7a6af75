"""The planner: fastest fitting configuration, options the user set kept, a default budget from
RAM, one-line refusals (nothing fits, disk too small), and the trainer running its choice."""

import io
import json
from collections import namedtuple

import mlx_edgelora  # noqa: F401  # isort: skip (preloads OpenBLAS before mlx.core)
import mlx.core as mx
import pytest
from conftest import build_tiny_model

from mlx_edgelora import lora, plan, planner, precision, quant
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


@pytest.fixture(scope="module")
def bf16_sizes():
    """The same model as mlx-community ships it: bfloat16 norms (and scales)."""
    # wider and with a smaller vocabulary than SHAPE: the recompute, not the loss head, is
    # the peak phase of the leanest plans, so that half-precision activations show
    shape = dict(SHAPE, hidden_size=1024, intermediate_size=2816, vocab_size=1024)
    model, _ = build_tiny_model("llama", quantize_bits=4, **shape)
    model.freeze()  # as loaded: cast_weights leaves trainable parameters alone
    precision.cast_weights(model, mx.bfloat16)
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
    # in under the default budget: it runs what fits that disk (the streamed LoRA state alone,
    # a few MB, may stay on it: it is in memory only with its units, so the plan is lower).
    small = Usage(10**12, 10**12, plan.disk_bytes(sizes, defaults) // 2)
    monkeypatch.setattr(planner.shutil, "disk_usage", lambda p: small)
    cfg, _, why = planner.choose(sizes, defaults)
    assert plan.disk_bytes(sizes, cfg) * planner.SPACE_MARGIN <= small.free and "chosen:" in why
    assert not cfg.stream_weights and cfg.activations == "ram"


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
    # (the smallest plan also drops --keep-attention, a free option)
    fix = r"; --split-blocks --checkpoint-every 1 (--no-keep-attention )?fits \("
    with pytest.raises(UserError, match=fix):
        planner.choose(sizes, _cfg(tmp_path, *argv))


def test_a_disk_too_small_is_refused_up_front(tmp_path, sizes, monkeypatch):
    cfg = _cfg(tmp_path, "--memory-budget-gb", "100", "--activations", "disk")
    # the least disk any candidate needs (float32 boundaries; bfloat16 halves them): a quarter
    # of it fits none, whichever the tie-breaks between equally fast candidates pick
    need = min(plan.disk_bytes(sizes, c) for c in planner.candidates(cfg))
    assert need > 0
    monkeypatch.setattr(planner.shutil, "disk_usage", lambda p: Usage(10**12, 10**12, need // 4))
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


def test_keeps_attention_outputs_when_they_fit(tmp_path, sizes, monkeypatch):
    """--keep-attention is faster (its speed factor) and costs memory: kept with room, dropped
    when only that fits."""
    monkeypatch.setattr(planner, "SPEED", {2048: {**SPEED, "keep_attention": {False: 1.2}}})
    argv = ["--activations", "ram", "--no-stream-weights", "--checkpoint-every", "1"]
    assert planner.choose(sizes, _cfg(tmp_path, "--memory-budget-gb", "100", *argv))[
        0
    ].keep_attention
    free = _cfg(tmp_path, *argv)
    peaks = {
        keep: min(_peak(sizes, c) for c in planner.candidates(free) if c.keep_attention == keep)
        for keep in (True, False)
    }
    assert peaks[False] < peaks[True]
    budget = str((peaks[False] + peaks[True]) / 2)
    cfg, _, _ = planner.choose(sizes, _cfg(tmp_path, "--memory-budget-gb", budget, *argv))
    assert not cfg.keep_attention


def _floor(sizes, cfg, dtype):
    """The smallest planned peak with --dtype `dtype` (on a CPU), the other options free."""
    p = precision.resolve(dtype, sizes.native, gpu=False)
    stored = sizes.stored_as(p.storage)
    return min(
        plan.estimate(stored, c, precision=p).total_gb
        for c in planner.candidates(cfg, dtypes=[dtype])
    )


def test_dtype_sizes_the_weights_as_cast(bf16_sizes):
    assert bf16_sizes.native == mx.bfloat16 and bf16_sizes.castable[1] > 0
    wide = bf16_sizes.stored_as(mx.float32)
    assert wide.frozen - bf16_sizes.frozen == 2 * bf16_sizes.castable[1]
    assert sum(wide.block_frozen) > sum(bf16_sizes.block_frozen)
    assert wide.stored_as(mx.bfloat16) == bf16_sizes


def test_a_budget_only_bf16_storage_fits_picks_it(tmp_path, bf16_sizes, monkeypatch):
    monkeypatch.setattr(precision, "on_gpu", lambda: False)
    # float32 made faster than auto, so that only memory makes the planner store bf16
    monkeypatch.setitem(planner.DTYPE_SPEED, "cpu", {"float32": 0.5, "half compute": 1.39})
    roomy, _, why = planner.choose(bf16_sizes, _cfg(tmp_path, "--memory-budget-gb", "100"))
    assert roomy.dtype == "float32" and "the planner chose --dtype float32: 2.00x faster" in why
    free = _cfg(tmp_path)
    wide, narrow = _floor(bf16_sizes, free, "float32"), _floor(bf16_sizes, free, "auto")
    assert narrow < wide
    budget = (narrow + wide) / 2
    cfg, memory_plan, why = planner.choose(
        bf16_sizes, _cfg(tmp_path, "--memory-budget-gb", str(budget))
    )
    assert cfg.dtype == "auto" and memory_plan.total_gb <= budget
    assert "weights and boundaries bfloat16, compute float32" in why
    assert "the planner kept --dtype auto" in why


def test_a_cpu_never_picks_half_compute_when_float32_compute_fits(
    tmp_path, bf16_sizes, monkeypatch
):
    assert not precision.on_gpu()  # MLX's CPU backend: these tests run without a GPU
    free = _cfg(tmp_path)
    half, auto = _floor(bf16_sizes, free, "bfloat16"), _floor(bf16_sizes, free, "auto")
    assert half < auto  # bf16 activations are smaller
    # only half compute fits: chosen, and said why
    cfg, _, why = planner.choose(
        bf16_sizes, _cfg(tmp_path, "--memory-budget-gb", str((half + auto) / 2))
    )
    assert cfg.dtype == "bfloat16" and "compute bfloat16" in why
    assert "no --dtype auto configuration fits" in why
    # whatever its speed factor says (here: twice as fast), as long as float32 compute fits
    monkeypatch.setitem(planner.DTYPE_SPEED, "cpu", {"half compute": 0.5})
    assert planner.relative_speed(_cfg(tmp_path, "--dtype", "bfloat16"), mx.bfloat16, False) < 1
    for i in range(12):
        budget = auto * 4 ** (i / 11)  # from the leanest float32-compute plan to 4x it
        cfg, _, why = planner.choose(bf16_sizes, _cfg(tmp_path, "--memory-budget-gb", str(budget)))
        assert precision.resolve(cfg.dtype, mx.bfloat16, gpu=False).compute == mx.float32, budget


def test_an_explicit_dtype_is_kept(tmp_path, bf16_sizes):
    cfg, _, why = planner.choose(
        bf16_sizes, _cfg(tmp_path, "--memory-budget-gb", "100", "--dtype", "bfloat16")
    )
    assert cfg.dtype == "bfloat16" and "compute bfloat16): kept as set" in why
    assert "kept as set: --dtype" in why
    free = _cfg(tmp_path)
    budget = (_floor(bf16_sizes, free, "auto") + _floor(bf16_sizes, free, "float32")) / 2
    fix = r"no configuration fits.*; (--no-keep-attention )?--dtype (auto|bfloat16)"
    with pytest.raises(UserError, match=fix):
        planner.choose(
            bf16_sizes, _cfg(tmp_path, "--memory-budget-gb", str(budget), "--dtype", "float32")
        )


def test_dtype_choices_follow_the_model_and_the_backend():
    assert list(precision.choices(mx.float32, gpu=False)) == ["auto"]  # never narrowed
    assert list(precision.choices(mx.bfloat16, gpu=False)) == ["auto", "float32", "bfloat16"]
    assert list(precision.choices(mx.bfloat16, gpu=True)) == ["auto", "float32"]  # bf16 = auto
    assert list(precision.choices(mx.float16, gpu=False)) == ["auto", "float32", "float16"]


def test_the_trainer_runs_the_planners_dtype(tmp_path, monkeypatch):
    """On a bf16 INT4 folder: the planner's --dtype is what the trainer casts to and saves
    (float32 when the speed table rates it faster and the budget is roomy)."""
    from test_precision import _bf16_int4_folder

    model = _bf16_int4_folder(tmp_path / "m")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "d.txt").write_text("The bees were calm this morning. " * 40)
    monkeypatch.setattr(precision, "on_gpu", lambda: False)
    monkeypatch.setitem(planner.DTYPE_SPEED, "cpu", {"float32": 0.5, "half compute": 1.39})
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(notes), "--out", str(out), "--steps", "1"]
    argv += ["--max-seq-len", "64", "--eval-every", "0", "--save-every", "0"]
    printed = io.StringIO()
    train(parse_config([*argv, "--memory-budget-gb", "50"]), reporter=Reporter(1, stream=printed))
    printed = printed.getvalue()
    assert "--dtype float32 (weights and boundaries float32, compute float32)" in printed
    assert "compute float32 (--dtype float32, the planner's choice)" in printed
    saved = json.loads((out / "adapter_config.json").read_text())["edgelora"]
    assert saved["dtype"] == "float32"
