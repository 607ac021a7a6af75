"""models/: each family through our seam equals mlx-lm's own model, in every engine path.

Llama and Qwen2 run through every option in test_engine.py / test_trainer.py; here every
other family gets the checks that could differ per family: forward logits against mlx-lm's
`model(inputs)` (chunked attention with the sliding window, halves, norms, embedding scale,
tied head), segment gradients against the graph engine's (half-blocks, streaming), the loss
heads, and one train -> resume -> fuse -> generate round trip.
Tolerances: float32 throughout, the chunked paths only reorder sums (errors ~1e-6).
"""

import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import FAMILY_OVERRIDES, build_tiny_model, write_tiny_model_dir
from test_engine import assert_same_step, make_batch, make_model, reference, reference_head
from test_trainer import _adapter, _cfg, _StopAt, notes  # noqa: F401  (notes: a fixture)

from mlx_edgelora import blocks, engine, loss, models
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.errors import UserError
from mlx_edgelora.fuse import fuse
from mlx_edgelora.generate import generate, load_for_generation
from mlx_edgelora.loading import load_model
from mlx_edgelora.lora import load_adapters
from mlx_edgelora.trainer import train

ALL = list(FAMILY_OVERRIDES)
NEW = [a for a in ALL if a not in ("llama", "qwen2")]  # the others: test_engine, test_trainer
L = 20  # > the fixtures' sliding window (6): tiles outside it are skipped


def test_every_fixture_family_is_registered_and_unknown_types_are_named():
    assert set(ALL) <= set(models.SUPPORTED_TYPES)
    listed = re.escape(", ".join(models.SUPPORTED_TYPES))
    with pytest.raises(UserError, match=rf"cfg.json: model type 'gpt2' .* supported: {listed}$"):
        models.lookup("gpt2", "cfg.json")


def _ours(model, inputs, attn_chunk: int, mlp_chunk: int, split: bool) -> mx.array:
    h = blocks.embed(model, inputs)
    for i in range(len(blocks.layers(model))):
        for halves in [("attn",), ("mlp",)] if split else [blocks.HALVES]:
            h = blocks.block_forward(model, i, h, attn_chunk, mlp_chunk, halves)
    return blocks.head_logits(model, blocks.final_norm(model)(h))


@pytest.mark.parametrize("bits", [None, 4], ids=["fp32", "int4"])
@pytest.mark.parametrize("arch", ALL)
def test_forward_logits_equal_mlx_lms_model(arch, bits):
    model, _ = build_tiny_model(arch, quantize_bits=bits)
    inputs = mx.array(np.random.default_rng(0).integers(0, 300, (2, L)).astype(np.int32))
    want = model(inputs)
    tol = 1e-4 * mx.abs(want).max().item()
    for attn_chunk, mlp_chunk, split in [(0, 0, False), (4, 8, True), (7, 0, False)]:
        got = _ours(model, inputs, attn_chunk, mlp_chunk, split)
        assert mx.abs(got - want).max().item() < tol, (attn_chunk, mlp_chunk, split)
    h = blocks.embed(model, inputs)  # the graph engine's path: mlx-lm's block calls
    for i in range(len(blocks.layers(model))):
        h = blocks.block_call(model, i, h)
    assert mx.abs(blocks.head_logits(model, blocks.final_norm(model)(h)) - want).max() < tol


@pytest.mark.parametrize("arch", [a for a in ALL if "sliding_window" in FAMILY_OVERRIDES[a]])
def test_the_fixtures_sliding_window_changes_the_logits(arch):
    """Otherwise the window tests above could pass with the window ignored."""
    inputs = mx.array([list(range(1, L + 1))])
    narrow, _ = build_tiny_model(arch)
    wide, _ = build_tiny_model(arch, sliding_window=L)
    assert mx.abs(narrow(inputs) - wide(inputs)).max().item() > 1e-2


CASES = [  # (checkpoint_every, activations, attn_chunk, mlp_chunk, cache_policy, stream, split)
    (1, "ram", 0, 0, "none", False, False),
    (1, "disk", 8, 8, "none", True, True),  # streamed half-blocks, chunked
    (3, "ram", 8, 0, "last", False, True),  # segments straddle blocks
]
FIELDS = [
    "checkpoint_every",
    "activations",
    "attn_chunk",
    "mlp_chunk",
    "cache_policy",
    "stream_weights",
    "split_blocks",
]


# Gemma 3's float32 graph step is itself 1.4e-5 (relative) away from a float64 run of the
# same fixture; the chunked segment step is 0.7e-5 away (its (1 + w) norms, w = 1 at init,
# double activations four times a block). Graph vs chunked then differ by up to 1.35e-5 with
# or without the sliding window, and by 0 unchunked; 1e-5 would test float32 rounding.
REL = {"gemma3_text": 3e-5, "gemma3": 3e-5}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("arch", NEW)
def test_segments_match_graph(arch, case, tmp_path):
    model, batch, ref = reference(arch, 4)
    cfg = TrainConfig(spill_dir=str(tmp_path), out=str(tmp_path), **dict(zip(FIELDS, case)))
    step = engine.make_step(model, cfg, reference_head(model))
    try:
        got = step(batch)
    finally:
        step.close()
    assert_same_step(got, ref, REL.get(arch, 1e-5))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", NEW)
def test_loss_heads_equal_the_full_logits_loss(arch):
    model, batch = make_model(arch, 4), make_batch()
    h = blocks.embed(model, mx.array(batch.inputs))
    for i in range(len(blocks.layers(model))):
        h = blocks.block_forward(model, i, h, 8, 8)
    want = reference_head(model)(h, batch).item()
    cfg = TrainConfig(vocab_chunk=64, subset_k=10_000)  # k >= V: the subset is exact
    for kind in ("full", "chunked", "subset"):
        got = loss.make_loss_head(model, kind, cfg)(h, batch).item()
        assert got == pytest.approx(want, rel=1e-5), kind


@pytest.mark.parametrize("arch", ALL)
def test_int4_mlx_folder_and_hugging_face_id_load_every_family(tmp_path, monkeypatch, arch):
    """An mlx-community style 4-bit folder, by path and by repo id (from a local Hugging Face
    cache, offline), gives mlx-lm's logits of the same model."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0" * 40
    repo = tmp_path / f"models--tiny--{arch}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = write_tiny_model_dir(repo / "snapshots" / commit, arch, quantize_bits=4)
    want = build_tiny_model(arch, quantize_bits=4)[0](mx.array([[1, 2, 3, 4, 5]]))
    for source in (str(folder), f"tiny/{arch}"):
        loaded = load_model(source)
        assert loaded.kind == ("mlx" if source == str(folder) else "hf")
        assert mx.allclose(loaded.model(mx.array([[1, 2, 3, 4, 5]])), want, atol=1e-5)


@pytest.mark.parametrize("arch", NEW)
def test_train_resume_fuse_generate(tmp_path, notes, arch):  # noqa: F811
    """An INT4 base with the defaults (segments, streamed half-blocks): loss falls; a cut run
    resumes to the same adapter; the fused folder equals base + adapter in mlx-lm; generation
    agrees."""
    base = write_tiny_model_dir(tmp_path / "base", arch, quantize_bits=4)
    full = train(_cfg(base, notes, tmp_path / "full", steps=4, eval_every=0))
    losses = [r["loss"] for r in full.history if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(base, notes, cut, steps=4, eval_every=0), reporter=_StopAt(2, 4))
    train(_cfg(base, notes, cut, steps=4, eval_every=0, resume=True))
    a, b = _adapter(tmp_path / "full"), _adapter(cut)
    assert a.keys() == b.keys() and all(mx.allclose(a[k], b[k], atol=1e-6) for k in a)

    fused = fuse(str(base), str(cut), str(tmp_path / "fused"), dequantize=True)
    prompt = mx.array([[1, 72, 101, 108, 108, 111, 44, 32, 98, 101, 101]])
    adapted = load_model(str(base))
    load_adapters(adapted.model, cut)
    from mlx_lm import load

    mlx_lm_model, _ = load(str(fused))
    want = adapted.model(prompt)
    assert mx.allclose(mlx_lm_model(prompt), want, atol=1e-4, rtol=1e-4)
    assert mx.abs(load_model(str(base)).model(prompt) - want).max().item() > 1e-3  # trained
    text = generate(load_for_generation(str(base), str(cut)), "bees", max_tokens=8)
    assert text == generate(load_for_generation(str(fused)), "bees", max_tokens=8)
