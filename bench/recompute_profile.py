"""Where the bytes of a half-block recompute's peak go (issue 17, "a thinner recompute").

One process builds the Llama-3.2-3B shape at 2 blocks (INT4, LoRA r=16 on all seven
projections, as bench/cells.py does), then measures `mx.get_peak_memory()` above the active
memory around each piece of a half-block's recompute under VJP, one piece at a time, with
its inputs and cotangent already evaluated:

- the whole attention half and the whole MLP half, as the segment engine runs them
  (`SegmentStep._vjp`, the trainer's chunks);
- their parts: the pre-attention norm, each LoRA projection (q, k, v, o; and for q the
  quantized base alone and the LoRA path alone), RoPE, the chunked attention core, the
  post-attention norm and the chunked MLP.

"extra MB" is the peak above what was resident before the piece (weights, its inputs and
cotangent); "io MB" is what the piece's inputs, cotangents and results hold at the least.
Memory does not depend on load, so run it niced:

    nice -n 10 python bench/recompute_profile.py --label before --seq 2048
    python bench/recompute_profile.py --report     # results/recompute_profile.md from .json

Results merge into results/recompute_profile.json under (label, seq).
"""

from __future__ import annotations

# isort: off
import mlx_edgelora  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

# isort: on
import argparse
import gc
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cells  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MB = 2**20


def _mb(*arrays) -> float:
    return round(sum(a.nbytes for a in arrays) / MB, 1)


def peak_above(fn) -> tuple[int, object]:
    """Bytes of peak memory above the active memory while `fn()` builds and evaluates, and
    fn's output (the caller drops it)."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    return mx.get_peak_memory() - before, out


def measure(fn, io) -> dict:
    """Peak above the active memory while `fn()` builds and evaluates one piece."""
    extra, out = peak_above(fn)
    res = {"extra_mb": round(extra / MB, 1), "io_mb": _mb(*io, *_leaves(out))}
    del out
    return res


def _leaves(tree) -> list[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    return [a for t in tree for a in _leaves(t)]


def _with_lora(m, fn):
    """fn(x, a, b) -> m(x) with m's LoRA A/B replaced by the arguments (then restored)."""

    def call(x, a, b):
        saved = m.lora_a, m.lora_b
        m.lora_a, m.lora_b = a, b
        try:
            return fn(x)
        finally:
            m.lora_a, m.lora_b = saved

    return call


def projection(m, name: str, x: mx.array, L: int) -> dict:
    """One LoRA projection's VJP w.r.t. (x, A, B); for q_proj also its two paths apart."""
    xin, g = x[..., : m.lora_a.shape[0]], mx.random.normal((1, L, m.lora_b.shape[1]))
    mx.eval(xin, g)
    prims = [xin, m.lora_a, m.lora_b]
    out = {
        f"{name} (LoRA linear)": measure(lambda: mx.vjp(_with_lora(m, m), prims, [g])[1], [xin, g])
    }
    if name == "q_proj":
        out["q_proj base only (dx)"] = measure(lambda: mx.vjp(m.linear, [xin], [g])[1], [xin, g])
        path = _with_lora(m, lambda t: m.scale * ((t @ m.lora_a) @ m.lora_b))
        out["q_proj LoRA path only"] = measure(lambda: mx.vjp(path, prims, [g])[1], [xin, g])
    return out


def pieces(model, cfg, L: int) -> dict:
    from mlx_edgelora import blocks, engine

    layer = blocks.layers(model)[1]
    attn, mlp = layer.self_attn, layer.mlp
    D = layer.input_layernorm.weight.shape[0]
    H, kv = attn.n_heads, attn.n_kv_heads
    hd = D // H
    mx.random.seed(0)
    x, dy = mx.random.normal((1, L, D)), mx.random.normal((1, L, D))
    q = mx.random.normal((1, H, L, hd))
    k, v = mx.random.normal((1, kv, L, hd)), mx.random.normal((1, kv, L, hd))
    dq = mx.random.normal((1, H, L, hd))
    mx.eval(x, dy, q, k, v, dq)
    step = engine.SegmentStep(model, cfg, lambda h, b: h.sum())
    out = {}

    def half(name):
        us = [(1, (name,))]
        grads = [{} for _ in blocks.layers(model)]
        _, dx = step._vjp(us, x, dy, partial(step._run, us), grads)
        return [dx, grads[1]]

    out["attn half (engine)"] = measure(partial(half, "attn"), [x, dy])
    out["mlp half (engine)"] = measure(partial(half, "mlp"), [x, dy])
    out["input norm"] = measure(lambda: mx.vjp(layer.input_layernorm, [x], [dy])[1], [x, dy])
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.update(projection(getattr(attn, name), name, x, L))
    out["rope (q)"] = measure(lambda: mx.vjp(attn.rope, [q], [dq])[1], [q, dq])
    core = partial(flash_core, scale=attn.scale, chunk=cfg.attn_chunk)
    out["attention core (chunked)"] = measure(lambda: core(q, k, v, dq), [q, k, v, dq])
    out["post-attn norm"] = measure(
        lambda: mx.vjp(layer.post_attention_layernorm, [x], [dy])[1], [x, dy]
    )
    from mlx_edgelora.attention import mlp_forward

    out["mlp (chunked)"] = measure(
        lambda: mx.vjp(lambda t: mlp_forward(mlp, t, cfg.mlp_chunk), [x], [dy])[1], [x, dy]
    )
    return out


def flash_core(q, k, v, do, scale: float, chunk: int) -> list:
    """The attention half's flash core alone, as its VJP runs it (attn_half.py): per query
    chunk, o and lse (attention.attend_rows), then dq and the chunk's share of dk, dv
    (attention.grad_rows); returns [dq, dk, dv]."""
    from mlx_edgelora.attention import attend_rows, grad_rows
    from mlx_edgelora.tokenwise import spans

    B, H, L, hd = q.shape
    kv = k.shape[1]

    def rows(a, s, e):  # [B, H, L, ...] rows s:e -> [B, kv, rep*n, ...] (heads grouped by KV)
        return a[:, :, s:e].reshape(B, kv, (H // kv) * (e - s), *a.shape[3:])

    ss, dkv, dqs = spans(L, chunk), [None] * len(spans(L, chunk)), []
    for i, (s, e) in enumerate(ss):
        qi, doi = rows(q, s, e), rows(do, s, e)
        o, lse = attend_rows(qi, k, v, ss, i, H // kv, scale, None)
        dqs.append(grad_rows(qi, k, v, o, lse, doi, ss, i, dkv, scale, None))
    dk = mx.concatenate([d[0] for d in dkv], axis=2)
    dv = mx.concatenate([d[1] for d in dkv], axis=2)
    return [mx.concatenate([d.reshape(B, H, -1, hd) for d in dqs], axis=2), dk, dv]


def run(label: str, L: int) -> dict:
    c = cells.config(layers=2, seq=L, bits=4)
    model = cells._build(c)
    tmp = tempfile.mkdtemp(prefix="edgelora-profile-")
    cfg_cell = cells.config(layers=2, seq=L, bits=4, engine="segments", split_blocks=True)
    cfg_cell.update(attn_chunk=256, mlp_chunk=256)  # the trainer's defaults
    cfg = cells._trainable(cfg_cell, model, tmp)
    res = pieces(model, cfg, L)
    return {"label": label, "seq": L, "attn_chunk": cfg.attn_chunk, "pieces": res}


def report(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r["pieces"]))
    cols = [f"{r['label']} {r['seq']}" for r in rows]
    lines = [
        "# Half-block recompute, where the peak goes (Llama-3.2-3B shape, INT4, LoRA r=16)",
        "",
        "Peak above resident (weights + the piece's inputs) while one piece's VJP is built and",
        "evaluated, MB; in brackets the piece's own inputs + cotangent + results.",
        "`python bench/recompute_profile.py --label L --seq N` (2 blocks, block 1 measured).",
        "",
        "| piece | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for k in keys:
        vals = [r["pieces"].get(k) for r in rows]
        cells_ = [f"{v['extra_mb']} ({v['io_mb']})" if v else "-" for v in vals]
        lines.append(f"| {k} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="now")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--report", action="store_true")
    a = p.parse_args()
    path = RESULTS / "recompute_profile.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    if not a.report:
        new = run(a.label, a.seq)
        rows = [r for r in rows if (r["label"], r["seq"]) != (a.label, a.seq)] + [new]
        path.write_text(json.dumps(rows, indent=1))
        print(json.dumps(new, indent=1))
    (RESULTS / "recompute_profile.md").write_text(report(rows))


if __name__ == "__main__":
    main()
