"""TrainConfig: CLI > YAML > default, help for every option, unknown keys named."""

import pytest

from mlx_edgelora.config import TrainConfig, build_parser, options, parse_config
from mlx_edgelora.errors import UserError


def test_defaults_come_from_the_dataclass_once():
    assert parse_config([]) == TrainConfig().validate()


def test_weight_streaming_is_on_by_default_with_segments_only():
    assert parse_config([]).stream_weights is True
    assert parse_config(["--engine", "graph"]).stream_weights is False
    assert parse_config(["--no-stream-weights"]).stream_weights is False
    help_text = " ".join(build_parser().format_help().split())
    assert "(default: on with --engine segments;" in help_text


def test_cli_overrides_yaml_overrides_default(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 7\nlr: 0.001\nlora-keys: [self_attn.q_proj]\n")
    cfg = parse_config(["--config", str(y), "--steps", "9"])
    assert cfg.steps == 9  # CLI wins
    assert cfg.lr == 0.001  # YAML wins over default
    assert cfg.lora_keys == ["self_attn.q_proj"]
    assert cfg.rank == TrainConfig().rank


def test_unknown_yaml_key_names_the_nearest(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stpes: 3\n")
    with pytest.raises(UserError, match="did you mean 'steps'"):
        parse_config(["--config", str(y)])


def test_missing_yaml_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_every_option_has_help():
    text = build_parser().format_help()
    for f in options():
        assert f"--{f.name.replace('_', '-')}" in text
    assert "--given" not in text  # the record of what was set is not an option


def test_the_options_given_are_recorded(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("rank: 8\nactivations: disk\n")
    cfg = parse_config(["--config", str(y), "--steps", "3", "--activations", "ram"])
    assert set(cfg.given) == {"config", "rank", "activations", "steps"}
    assert cfg.is_given("activations") and not cfg.is_given("split_blocks")
    assert "given" not in cfg.to_dict()
    built = TrainConfig(rank=8, activations="disk")  # in Python: what differs from the default
    assert built.given == ("rank",)


def test_booleans_and_choices():
    cfg = parse_config(["--resume", "--activations", "ram", "--loss", "subset"])
    assert cfg.resume and cfg.activations == "ram" and cfg.loss == "subset"
    with pytest.raises(SystemExit):
        parse_config(["--loss", "bogus"])


@pytest.mark.parametrize(
    "flag,value",
    [("--steps", "0"), ("--rank", "0"), ("--lr", "-1"), ("--subset-refresh", "0")],
)
def test_validation_names_the_flag(flag, value):
    with pytest.raises(UserError, match=flag):
        parse_config([flag, value])


def test_subset_refresh_needs_the_predicted_subset_loss():
    cfg = parse_config(["--loss", "subset", "--subset-refresh", "4"])
    assert cfg.subset_refresh == 4 and parse_config([]).subset_refresh == 1
    for args in [[], ["--loss", "subset", "--subset-fill", "neighbours"]]:
        with pytest.raises(UserError, match="--subset-refresh"):
            parse_config(args + ["--subset-refresh", "4"])
    with pytest.raises(UserError, match="--subset-refresh"):
        TrainConfig(loss="subset", subset_refresh=2.5).validate()
