"""One forward+backward training step of one configuration, in its own process ("a cell").

Why a fresh process per cell: MLX's allocator peak and cache are per process, so cells must not
share one. The parent (`run_cell`) starts `python bench/cells.py --child '<json>'` under
`flock /tmp/edgelora-bench.lock` (locked.py: heavy runs on the shared machine never overlap)
with a timeout that starts once the lock is held; the child builds the model, measures, and
prints one JSON line.

Measured, per cell (batch 1): resident bytes after the model, LoRA and the step object are
built (`mx.get_active_memory`); `mx.get_peak_memory()` over ONE step (forward, backward,
gradients evaluated; no optimizer update: the paper's FP32 baseline row, ~weights + grads +
activations, has no room for Adam states either); step wall time; the load average.

Models: "smollm2" is the real embedded SmolLM2-135M GGUF (`load_model(None)`); "llama3b" and
"qwen3b" are random-weight models of the public shapes (paper.md) with `layers` blocks, built
from mlx-lm's own classes, float32, quantized with `nn.quantize(group_size=64, bits=4)` for
INT4 cells (scales float32). Peak memory does not depend on the weight values.

A cell whose up-front estimate exceeds MAX_GB is not run: it is reported as "OOM (estimated
X GB)". `mx.set_memory_limit` and the subprocess timeout are the guards behind the estimate.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from locked import run_locked

MAX_GB = 20.0  # this machine has 24 GB and other people's tests
GB = 1024**3

SHAPES = {
    "llama3b": dict(  # Llama-3.2-3B
        model_type="llama",
        hidden_size=3072,
        num_hidden_layers=28,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
    ),
    "qwen3b": dict(  # Qwen2.5-3B
        model_type="qwen2",
        hidden_size=2048,
        num_hidden_layers=36,
        intermediate_size=11008,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
    ),
}

# One cell's configuration: these keys, with these defaults.
DEFAULTS = dict(
    shape="llama3b",  # llama3b | qwen3b | smollm2 (the real embedded GGUF)
    layers=None,  # blocks to build (None = the full model)
    seq=1024,
    trainable=1.0,  # fraction of trainable (loss-carrying) positions: the LAST ones
    full_ft=False,  # all weights trainable (FP32 baseline); else the adapter
    adapter="lora",  # lora | lars (methods.py)
    emulator=None,  # EMLoC: a cached emulator file, or "random:RATIO" (factors of that shape)
    rank=16,
    bits=None,  # 4: nn.quantize(group_size=64, bits=4) the random model
    engine="graph",
    activations="ram",
    loss="full",
    subset_k=1000,
    subset_fill="predicted",  # neighbours: the paper's fill, on a stand-in table (see below)
    vocab_chunk=8192,
    attn_chunk=0,
    mlp_chunk=0,
    stream_weights=False,
    split_blocks=False,  # True: checkpoint boundaries between block halves too
    cache_policy="none",
    steps=1,  # steps run; the peak covers all, the time reported is the fastest
)


def config(**kw) -> dict:
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown cell keys {sorted(unknown)}")
    return {**DEFAULTS, **kw}


# ------------------------------------------------------------------------- estimate (parent)


def shape_dims(shape: str) -> dict:
    if shape == "smollm2":
        return dict(
            hidden_size=576,
            num_hidden_layers=30,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
        )
    return SHAPES[shape]


def estimate_gb(c: dict) -> float:
    """A deliberately generous up-front peak estimate, to refuse cells that cannot fit."""
    s = shape_dims(c["shape"])
    D, Im, V = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    H = s["num_attention_heads"]
    n = c["layers"] or s["num_hidden_layers"]
    L = c["seq"]
    per_layer = 4 * D * D + 3 * D * Im  # upper bound (full-size K/V)
    bytes_w = (0.5625 if c["bits"] else 4) * (n * per_layer + V * D)
    grads = 4 * (n * per_layer + V * D) if c["full_ft"] else 0
    rows = max(1, int(L * c["trainable"]))
    logits = 3 * 4 * rows * (c["subset_k"] if c["loss"] == "subset" else V)
    if c["loss"] == "chunked":
        logits = 3 * 4 * rows * c["vocab_chunk"]
    chunked = c["engine"] == "segments"  # the chunked attention/MLP VJPs run only there
    cols = min(c["attn_chunk"], L) if chunked and c["attn_chunk"] else L  # score columns
    mlp_rows = min(c["mlp_chunk"], L) if chunked and c["mlp_chunk"] else L
    act_layer = 4 * L * 12 * D + 4 * mlp_rows * 4 * Im + 3 * 4 * H * L * cols
    acts = (n if c["engine"] == "graph" else 1) * act_layer + n * 4 * L * D
    return (bytes_w + grads + logits + acts) / GB


# ----------------------------------------------------------------------------- run (parent)


def run_cell(c: dict, timeout: int = 1800) -> dict:
    """Run one cell in a fresh process; returns its result dict (never raises for OOM/timeout)."""
    est = estimate_gb(c)
    if est > MAX_GB:
        return {
            "config": c,
            "status": "oom",
            "estimate_gb": round(est, 2),
            "note": f"OOM (estimated {est:.1f} GB > {MAX_GB:.0f} GB)",
        }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(c)]
    t0 = time.time()
    p = run_locked(cmd, timeout)
    if p is None:
        return {"config": c, "status": "timeout", "timeout_s": timeout}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"config": c, "status": "error", "rc": p.returncode, "stderr_tail": p.stderr[-2000:]}
    out = json.loads(lines[-1])
    out.update(status="ok", estimate_gb=round(est, 2), wall_incl_lock_s=round(time.time() - t0, 1))
    return out


# ------------------------------------------------------------------------------ child process


def _build(c: dict):
    """(model, tokenizer-or-None) with weights evaluated and init temporaries freed."""
    import mlx.core as mx
    import mlx.nn as nn

    if c["shape"] == "smollm2":
        from mlx_edgelora import load_model

        model = load_model(None).model
        if c["layers"]:
            model.model.layers = model.model.layers[: c["layers"]]
            model.args.num_hidden_layers = c["layers"]
        return model
    from mlx_lm.utils import _get_classes

    cfg = dict(SHAPES[c["shape"]])
    if c["layers"]:
        cfg["num_hidden_layers"] = c["layers"]
    model_cls, args_cls = _get_classes(cfg)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(cfg))
    emb = model.model.embed_tokens
    # uniform, not mlx-lm's normal init: mx.random.normal takes ~30 s for 394M values here
    emb.weight = mx.random.uniform(-0.05, 0.05, emb.weight.shape)
    if c["bits"]:
        # quantize block by block so that at most one block's float weights exist at once
        for layer in model.model.layers:
            mx.eval(layer.parameters())
            nn.quantize(layer, group_size=64, bits=c["bits"])
            mx.eval(layer.parameters())
        mx.eval(emb.parameters())
        is_embedding = lambda _, m: isinstance(m, nn.Embedding)  # noqa: E731
        nn.quantize(model, group_size=64, bits=c["bits"], class_predicate=is_embedding)
    mx.eval(model.parameters())
    model.eval()
    return model


def train_config(c: dict, out: str, **extra):
    """The TrainConfig a cell runs (engine, loss head, chunks), plus `extra` options; the one
    place a cell's settings become trainer options (bench/plan_accuracy.py plans with it)."""
    from mlx_edgelora import TrainConfig

    return TrainConfig(
        out=out,
        spill_dir=out,
        rank=c["rank"],
        adapter=c["adapter"],
        engine=c["engine"],
        activations=c["activations"],
        loss=c["loss"],
        subset_k=c["subset_k"],
        subset_fill=c["subset_fill"],
        vocab_chunk=c["vocab_chunk"],
        attn_chunk=c["attn_chunk"],
        mlp_chunk=c["mlp_chunk"],
        stream_weights=c["stream_weights"],
        split_blocks=c["split_blocks"],
        cache_policy=c["cache_policy"],
        **extra,
    ).validate()


def _trainable(c: dict, model, out: str):
    """Mark what trains; returns the TrainConfig used for the engine and loss head."""
    import mlx.core as mx

    from mlx_edgelora import lora, quant

    tc = train_config(c, out)
    if c["emulator"]:
        _install_emulator(model, c["emulator"])
    if c["full_ft"]:
        model.unfreeze()
    else:
        lora.apply_adapter(model, tc)
    quant.prepare_for_training(model)
    mx.eval(model.parameters())
    return tc


def _install_emulator(model, spec: str) -> None:
    """EMLoC's emulator in place of the block linears: a saved one, or for a random-weight
    shape random factors of the ranks the ratio gives (memory does not depend on values)."""
    import mlx.core as mx

    from mlx_edgelora import blocks, emulator

    if not spec.startswith("random:"):
        emulator.install(model, emulator.load(Path(spec)))
        return
    ratio, layers = float(spec.split(":", 1)[1]), blocks.layers(model)
    for i, layer in enumerate(layers):
        built = {}
        for key, m in layer.named_modules():
            last_down = i == len(layers) - 1 and key == "mlp.down_proj"
            if key.count(".") != 1 or last_down or not hasattr(m, "bits"):
                continue
            if (r := emulator.emulator_rank(m, ratio)) is not None:
                out_dims, in_dims = emulator.linear_shape(m)
                w_u = mx.random.uniform(-0.05, 0.05, (out_dims, r))
                w_v = mx.random.uniform(-0.05, 0.05, (r, in_dims))
                built[f"{blocks.layers_path(model)}.{i}.{key}"] = emulator.make_layer(
                    w_u, w_v, m.get("bias"), m.bits
                )
        emulator.install(model, built)


def _loss_head(c: dict, model, tc):
    """The configured head. The neighbour fill runs on an empty table (the lowest ids fill
    the subset): its memory depends only on k, and building the real Llama-size table takes
    ~10-40 min on this CPU (neighbours.py) and would tell us nothing about memory."""
    import numpy as np

    from mlx_edgelora import loss

    if c["loss"] != "subset" or c["subset_fill"] != "neighbours":
        return loss.make_loss_head(model, c["loss"], tc)
    empty = np.zeros((loss.head_shape(model)[0], 0), np.int32)
    return loss.LossHead(model, "subset", loss.subset_loss(model, tc, table=empty))


def _batch(c: dict, vocab: int):
    import numpy as np

    from mlx_edgelora.batching import Batch

    rng = np.random.default_rng(0)
    L = c["seq"]
    tokens = rng.integers(0, vocab, size=(1, L + 1), dtype=np.int32)
    mask = np.zeros((1, L), bool)
    mask[:, L - max(1, round(L * c["trainable"])) :] = True  # prompt = the first positions
    return Batch(tokens[:, :-1], tokens[:, 1:], mask)


def _per_layer_bytes(model, c: dict) -> dict:
    """Exact bytes one block adds when resident: frozen weights, LoRA params (+ their grads)."""
    from mlx.utils import tree_flatten

    layer = model.model.layers[0]
    train = sum(v.nbytes for _, v in tree_flatten(layer.trainable_parameters()))
    frozen = sum(v.nbytes for _, v in tree_flatten(layer.parameters())) - train
    if c["stream_weights"]:
        frozen = 0  # on disk between uses (the one in use is inside the measured peak)
    return {"frozen": frozen, "trainable_and_grads": 2 * train}


def child(c: dict) -> dict:
    import mlx_edgelora  # noqa: F401,I001  (OpenBLAS before mlx)
    import gc
    import shutil
    import tempfile

    import mlx.core as mx

    from mlx_edgelora import engine, loss

    mx.set_memory_limit(int(MAX_GB * GB))
    out = tempfile.mkdtemp(prefix="edgelora-bench-", dir=os.environ.get("BENCH_TMP", "/tmp"))
    model = _build(c)
    tc = _trainable(c, model, out)
    head = _loss_head(c, model, tc)
    batch = _batch(c, loss.head_shape(model)[0])  # before the step may offload the head
    step = engine.make_step(model, tc, head)
    per_layer = _per_layer_bytes(model, c)
    gc.collect()
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    times, losses = [], []
    for _ in range(c["steps"]):
        t0 = time.perf_counter()
        loss_sum, n_tok, grads = step(batch)
        times.append(time.perf_counter() - t0)
        losses.append(loss_sum / n_tok)
        del grads
    peak = mx.get_peak_memory()
    step.close(restore=False)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "config": c,
        "peak_bytes": peak,
        "peak_gb": round(peak / GB, 4),
        "resident_bytes": resident,
        "resident_gb": round(resident / GB, 4),
        "step_s": round(min(times), 2),
        "step_times_s": [round(t, 2) for t in times],
        "loss": round(losses[-1], 4),
        "trainable_tokens": int(batch.mask.sum()),
        "per_layer_bytes": per_layer,
        "n_layers": len(model.model.layers),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--child":
        load = [round(x, 2) for x in os.getloadavg()]
        res = child(config(**json.loads(argv[1])))  # keys added since the parent started
        res["loadavg"] = load  # at the start of the cell
        print(json.dumps(res), flush=True)
        return
    c = config(**json.loads(argv[0])) if argv else config(layers=1, seq=128, bits=4)
    print(json.dumps(run_cell(c), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
