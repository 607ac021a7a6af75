"""Step-time price of quant.tile_bytes (dequantization tiles sized to the tokens) on a CPU.

Times one MLP half (block 0) forward + VJP at a few token counts, with the tiles as sized
now and with the fixed 16 MB tiles from before (quant.tile_bytes patched to TILE_BYTES),
interleaved in one process; prints medians and the load average. Run under the timing lock:

    flock /work/wt/_brief/timing.lock python bench/tile_speed.py bench/.models/qwen0.5b-L2
"""

from __future__ import annotations

import os
import statistics
import sys
import time

# isort: off
import mlx_edgelora  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx

# isort: on
from mlx_edgelora import blocks, lora, quant
from mlx_edgelora.config import TrainConfig
from mlx_edgelora.loading import load_model

ROUNDS = 5


def main(path: str, contexts=(128, 512, 2048)) -> None:
    model = load_model(path, None, lazy=False).model
    cfg = TrainConfig()
    lora.apply_lora(model, cfg)
    quant.prepare_for_training(model)
    mx.eval(model.parameters())
    sized = quant.tile_bytes
    variants = {"sized tiles": sized, "16 MB tiles": lambda *a: quant.TILE_BYTES}
    D = blocks.shape(model).D
    for L in contexts:
        x, ct = mx.random.normal((1, L, D)), mx.random.normal((1, L, D))
        mx.eval(x, ct)

        def half(x, L=L):
            return blocks.block_forward(model, 0, x, cfg.attn_chunk, cfg.mlp_chunk, ("mlp",))

        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(ROUNDS):
            for name, fn in variants.items():
                quant.tile_bytes = fn
                t0 = time.perf_counter()
                mx.eval(mx.vjp(half, [x], [ct])[1])
                times[name].append(time.perf_counter() - t0)
        quant.tile_bytes = sized
        load = os.getloadavg()[0]
        row = "  ".join(f"{k} {statistics.median(v) * 1e3:7.1f} ms" for k, v in times.items())
        print(f"{path} L={L}: MLP half forward+VJP, median of {ROUNDS}: {row}  (load {load:.1f})")


if __name__ == "__main__":
    main(sys.argv[1])
