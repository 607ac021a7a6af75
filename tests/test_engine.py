"""engine.py: the segment-wise step equals the full-graph reference; no spill file outlives it."""

import functools
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_VOCAB, build_tiny_model
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_edgelora import attn_half, blocks, engine, fused_lora, loss, quant
from mlx_edgelora.batching import Batch
from mlx_edgelora.config import DEFAULT_LORA_KEYS, TrainConfig
from mlx_edgelora.errors import UserError

L = 30  # not a multiple of the chunk (8): the last attention/MLP chunk is partial


def make_model(arch: str, bits: int | None, num_layers: int = 4) -> nn.Module:
    """Tiny model, LoRA r=4 on all 7 projections, lora_b non-zero so every gradient is too."""
    model, _ = build_tiny_model(arch, quantize_bits=bits)
    model.freeze()
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": DEFAULT_LORA_KEYS}
    linear_to_lora_layers(model, num_layers, lora)
    mx.random.seed(1)

    def init(path: str, v: mx.array) -> mx.array:
        return 0.05 * mx.random.normal(v.shape) if path.endswith("lora_b") else v

    model.update(tree_map_with_path(init, model.trainable_parameters()))
    quant.prepare_for_training(model)
    mx.eval(model.parameters())
    return model


def reference_head(model: nn.Module):
    """Final norm, full logits, masked CE sum (loss.py's heads are tested on their own)."""

    def head(h: mx.array, batch: Batch) -> mx.array:
        x = blocks.final_norm(model)(h)
        m = blocks.head_module(model)
        logits = m.as_linear(x) if blocks.head_is_tied(model) else m(x)
        ce = nn.losses.cross_entropy(logits, mx.array(batch.targets))
        return (ce * mx.array(batch.mask)).sum()

    return head


def make_batch(B: int = 2, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY_VOCAB, (B, L + 1)).astype(np.int32)
    return Batch(tokens[:, :-1], tokens[:, 1:], rng.random((B, L)) > 0.3)


@functools.cache
def reference(arch: str, bits: int | None):
    """(model, batch, graph-engine result), shared by the equivalence tests."""
    model, batch = make_model(arch, bits), make_batch()
    return (
        model,
        batch,
        engine.make_step(model, TrainConfig(engine="graph"), reference_head(model))(batch),
    )


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def assert_same_step(got, ref, rel: float = 1e-5) -> None:
    assert got[1] == ref[1]
    assert abs(got[0] - ref[0]) <= 1e-5 * abs(ref[0])
    g, r = dict(tree_flatten(got[2])), dict(tree_flatten(ref[2]))
    assert g.keys() == r.keys() and len(r) == 4 * 7 * 2
    worst = max(r, key=lambda k: _rel(g[k], r[k]))
    assert _rel(g[worst], r[worst]) < rel, worst


FIELDS = [
    "checkpoint_every",
    "activations",
    "attn_chunk",
    "mlp_chunk",
    "cache_policy",
    "stream_weights",
    "split_blocks",
]
CASES = [  # each option value appears with several others
    (1, "ram", 0, 0, "none", False, False),
    (1, "ram", 0, 0, "none", False, True),  # every half-block a segment
    (2, "disk", 8, 8, "none", False, True),  # two halves: whole blocks again
    (1, "disk", 8, 0, "last", False, True),
    (3, "ram", 0, 8, "last", False, False),  # 3 does not divide 4 blocks: [0, 1, 2], [3]
    (3, "ram", 0, 8, "none", False, True),  # 3 halves straddle blocks: [0a 0m 1a] [1m 2a 2m]..
    (1, "disk", 8, 8, "none", True, True),  # streamed halves
    (1, "disk", 8, 8, "none", True, False),
    (4, "ram", 0, 0, "last", True, False),  # one segment: the whole model runs once, with the head
    (1, "ram", 7, 5, "none", False, True),  # token chunks that divide neither L (30) nor B*L
]


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_segments_match_graph(arch, bits, case, tmp_path):
    model, batch, ref = reference(arch, bits)
    cfg = TrainConfig(spill_dir=str(tmp_path), out=str(tmp_path), **dict(zip(FIELDS, case)))
    step = engine.make_step(model, cfg, reference_head(model))
    try:
        got = step(batch)
        assert step.forward_loss(reference_head(model), batch) == pytest.approx(ref[:2], rel=1e-5)
    finally:
        step.close()
    assert_same_step(got, ref)
    assert list(tmp_path.iterdir()) == []  # boundaries and streamed weights are gone


@pytest.mark.parametrize("case", [(1, "disk", True), (3, "ram", True), (2, "ram", False)], ids=str)
def test_kept_attention_outputs_give_the_same_bits_and_skip_the_attention_forward(
    case, tmp_path, monkeypatch
):
    """--keep-attention: the recompute reuses the forward's o and lse (attn_half.reuse), so the
    step is the one without it to the bit, and the VJP no longer calls attend_rows."""
    every, where, split = case
    model, batch = make_model("llama", 4), make_batch()
    calls = []
    monkeypatch.setattr(attn_half, "attend_rows", _counted(attn_half.attend_rows, calls))

    def run(keep: bool):
        cfg = TrainConfig(
            spill_dir=str(tmp_path), out=str(tmp_path), checkpoint_every=every, activations=where,
            split_blocks=split, attn_chunk=8, mlp_chunk=8, keep_attention=keep,
        )  # fmt: skip
        calls.clear()
        got = engine.make_step(model, cfg, reference_head(model))(batch)
        return got, len(calls)

    (kept, n_kept), (plain, n_plain) = run(True), run(False)
    assert kept[:2] == plain[:2]
    g, r = dict(tree_flatten(kept[2])), dict(tree_flatten(plain[2]))
    assert all(mx.array_equal(g[k], r[k]).item() for k in r)
    # 4 blocks x 4 query chunks (L = 30, chunk 8): the forward, the recompute's custom
    # function building its (never evaluated) forward again, and without keep the VJP's own
    forward = 4 * 4
    assert (n_kept, n_plain) == (2 * forward, 3 * forward)
    assert list(tmp_path.iterdir()) == []  # the kept outputs' spill files are gone too


def _counted(fn, calls: list):
    def wrapped(*a, **k):
        calls.append(1)
        return fn(*a, **k)

    return wrapped


@pytest.mark.parametrize("stream", [False, True])
def test_predicted_subset_head_gives_the_same_step_in_both_engines(tmp_path, stream):
    """The predicted fill evaluates the head's input mid-step (inside the loss segment's VJP,
    with a streamed head resident): same subset, same loss and gradients as the graph."""
    model, batch = make_model("llama", 4), make_batch()
    head_cfg = TrainConfig(loss="subset", subset_k=40, vocab_chunk=64)
    head = loss.make_loss_head(model, "subset", head_cfg)
    ref = engine.make_step(model, TrainConfig(engine="graph"), head)(batch)
    cfg = TrainConfig(spill_dir=str(tmp_path), out=str(tmp_path), stream_weights=stream)
    step = engine.make_step(model, cfg, head)
    try:
        got = step(batch)
    finally:
        step.close()
    assert_same_step(got, ref)


@pytest.mark.parametrize("rows", [0, 7])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("gemma3_text", True)])
def test_tiled_chunked_head_gives_the_graph_step(arch, tied, stream, rows, tmp_path, monkeypatch):
    """The exact chunked head runs tile by tile outside autodiff when it is alone in the loss
    segment (streamed: its tiles and the embedding rows read from disk): same loss, same
    gradients and the same evaluation loss as the graph engine's lazy chunked head; also when
    the rows go through the head in blocks (`rows` 7: ~42 trainable rows in 7 blocks)."""
    if rows:
        monkeypatch.setattr(loss, "head_rows", lambda D: rows)
    model, _ = build_tiny_model(arch, quantize_bits=4, tie_word_embeddings=tied)
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    for layer in blocks.layers(model):
        layer.self_attn.q_proj.lora_b = 0.05 * mx.random.normal(layer.self_attn.q_proj.lora_b.shape)
    quant.prepare_for_training(model)
    mx.eval(model.parameters())
    batch = make_batch()
    head = loss.make_loss_head(model, "chunked", TrainConfig(vocab_chunk=64))  # 5 tiles of V
    assert head.tiled
    ref = engine.make_step(model, TrainConfig(engine="graph"), head)(batch)
    ref_eval = engine.make_step(model, TrainConfig(engine="graph"), head).forward_loss(head, batch)
    cfg = TrainConfig(spill_dir=str(tmp_path), out=str(tmp_path), stream_weights=stream)
    step = engine.make_step(model, cfg, head)
    try:
        got = step(batch)
        assert step.forward_loss(head, batch) == pytest.approx(ref_eval, rel=1e-5)
    finally:
        step.close()
    assert_same_step(got, ref)


def test_a_streamed_head_is_never_whole_in_memory_during_a_step(tmp_path):
    """With weights streamed, the embedding and the chunked loss read their rows from disk:
    a step's peak stays below the LM head's own (quantized) bytes, on a model whose head is
    most of its weights. (Before, the whole head was loaded for the embedding and the loss.)"""
    model, _ = build_tiny_model("llama", quantize_bits=4, vocab_size=65536, hidden_size=128)
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    quant.prepare_for_training(model)
    mx.eval(model.parameters())
    head_bytes = sum(v.nbytes for _, v in tree_flatten(blocks.head_module(model).parameters()))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65536, (1, 65)).astype(np.int32)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones((1, 64), bool))
    cfg = TrainConfig(
        spill_dir=str(tmp_path), out=str(tmp_path), vocab_chunk=512, stream_weights=True
    )
    step = engine.make_step(model, cfg, loss.make_loss_head(model, "chunked", cfg))
    try:
        step(batch)  # a first step: one-time allocations
        mx.eval([])
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        step(batch)
        peak = mx.get_peak_memory() - base
        value, _ = step.forward_loss(step.loss_head, batch)
        assert np.isfinite(value)
        eval_peak = mx.get_peak_memory() - base
    finally:
        step.close()
    assert peak < 0.5 * head_bytes, (peak, head_bytes)
    assert eval_peak < 0.5 * head_bytes, (eval_peak, head_bytes)


@pytest.mark.parametrize("chunks", [(8, 8), (7, 64), (30, 30)], ids=str)
def test_thin_recompute_matches_mlx_lms_own_lora_call(arch, chunks, tmp_path, monkeypatch):
    """The segment step with fused LoRA VJPs and token-chunked half-blocks gives the graph
    step of mlx-lm's own LoRALinear call (plain autodiff): the thin recompute changes
    nothing but memory. (30, 30): chunks as long as the sequence, the unchunked path."""
    model, batch = make_model(arch, 4), make_batch()
    assert type(blocks.layers(model)[0].self_attn.q_proj) is fused_lora.FusedLoRALinear
    with monkeypatch.context() as m:
        m.setattr(fused_lora.FusedLoRALinear, "__call__", LoRALinear.__call__)
        ref = engine.make_step(model, TrainConfig(engine="graph"), reference_head(model))(batch)
    attn_chunk, mlp_chunk = chunks
    cfg = TrainConfig(
        spill_dir=str(tmp_path), out=str(tmp_path), attn_chunk=attn_chunk, mlp_chunk=mlp_chunk
    )
    assert_same_step(engine.make_step(model, cfg, reference_head(model))(batch), ref)


def test_grads_have_the_trainable_tree_shape_with_lora_on_some_blocks():
    model = make_model("qwen2", 4, num_layers=2)
    head, batch = reference_head(model), make_batch(B=1)
    step = engine.make_step(model, TrainConfig(activations="ram", checkpoint_every=3), head)
    _, _, grads = step(batch)
    _, _, ref = engine.make_step(model, TrainConfig(engine="graph"), head)(batch)
    shape = functools.partial(tree_map, lambda _: 0)
    assert shape(grads) == shape(model.trainable_parameters()) == shape(ref)
    assert engine.forward_loss(model, TrainConfig(), head, batch)[1] == int(batch.mask.sum())


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("policy", ["none", "last"])
def test_exception_in_the_step_leaves_no_spill_files_and_an_intact_model(tmp_path, policy):
    model = make_model("llama", 4)
    before = tree_flatten(model.trainable_parameters())
    head, batch = reference_head(model), make_batch(B=1)

    def failing_head(h, batch):
        raise RuntimeError("boom")

    cfg = TrainConfig(
        spill_dir=str(tmp_path), out=str(tmp_path), cache_policy=policy, stream_weights=False
    )
    step = engine.make_step(model, cfg.validate(), failing_head)
    with pytest.raises(RuntimeError, match="boom"):
        step(batch)
    assert _leftovers(tmp_path) == []
    after = tree_flatten(model.trainable_parameters())
    assert all(k == j and v is w for (k, v), (j, w) in zip(before, after))  # tracers undone
    cfg.stream_weights = True
    step = engine.make_step(model, cfg, failing_head)
    with pytest.raises(RuntimeError, match="boom"):
        step(batch)
    assert [p.name.startswith("edgelora-weights-") for p in tmp_path.iterdir()] == [True]
    step.close()
    assert _leftovers(tmp_path) == []
    assert engine.forward_loss(model, cfg, head, batch)[0] > 0  # weights were restored


SIGINT_SCRIPT = """
import signal, sys, time
from pathlib import Path
# A shell without job control starts background jobs with SIGINT ignored, and we (rightly)
# keep an inherited SIG_IGN; Ctrl-C in a terminal is the default handler, so test with that.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from test_engine import make_batch, make_model, reference_head
from mlx_edgelora import engine
from mlx_edgelora.config import TrainConfig

model = make_model("llama", 4)
head = reference_head(model)

def slow_head(h, batch):
    import faulthandler  # a hang after SIGINT prints every thread's stack, then exits
    faulthandler.dump_traceback_later(100, exit=True)
    Path({marker!r}).write_text("in the loss head")
    time.sleep(120)
    return head(h, batch)

cfg = TrainConfig(spill_dir={spill!r}, out={spill!r}, stream_weights=True)
engine.make_step(model, cfg, slow_head)(make_batch())
"""


def test_sigint_mid_step_removes_spill_files(tmp_path):
    spill, marker = tmp_path / "spill", tmp_path / "marker"
    script = SIGINT_SCRIPT.format(
        tests=str(Path(__file__).parent), marker=str(marker), spill=str(spill)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no marker"
        # mid-step: the forward's boundaries (and the streamed weights) are on disk
        assert any(p.name.startswith("edgelora-spill-") for p in spill.iterdir())
        assert any(p.name.startswith("edgelora-weights-") for p in spill.iterdir())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Timeout (" not in err, err  # faulthandler fired: the exit hung; stacks in err
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert _leftovers(spill) == []


def test_bad_options_are_user_errors():
    model = make_model("llama", None)
    head = reference_head(model)
    with pytest.raises(UserError, match="--stream-weights"):
        engine.make_step(model, TrainConfig(engine="graph", stream_weights=True), head)
    with pytest.raises(UserError, match="--cache-policy"):  # checked once, in the config
        TrainConfig(cache_policy="everything").validate()
    model.train()  # LoRA dropout p=0.5 is now active: recompute would draw another mask
    model.model.layers[0].self_attn.q_proj.dropout = nn.Dropout(0.5)
    step = engine.make_step(model, TrainConfig(activations="ram"), head)
    with pytest.raises(UserError, match="--lora-dropout"):
        step(make_batch(B=1))
