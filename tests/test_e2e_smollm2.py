"""End to end on the real embedded SmolLM2 (slow): training lowers the exact validation loss."""

import pytest
from conftest import requires_smollm2

from mlx_edgelora.config import TrainConfig
from mlx_edgelora.dataset import SAMPLE_DATA
from mlx_edgelora.trainer import train

pytestmark = [pytest.mark.slow, requires_smollm2]


def test_short_run_on_the_sample_notes_lowers_validation_loss(tmp_path):
    cfg = TrainConfig(
        data=str(SAMPLE_DATA),
        out=str(tmp_path / "run"),
        steps=6,
        max_seq_len=128,
        lr=1e-3,
        warmup=1,
        eval_every=6,
        eval_batches=2,
        save_every=0,
        val_fraction=0.2,
    )
    result = train(cfg)
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert result.history[0]["step"] == 0  # untrained baseline comes first
    assert len(vals) >= 2 and vals[-1] < vals[0], vals
    assert (tmp_path / "run" / "adapters.safetensors").is_file()
    assert 0 < result.peak_gb < 2.0
