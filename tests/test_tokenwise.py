"""tokenwise.py: the chunked custom VJP equals autodiff of the same function, whole."""

import mlx.core as mx
import pytest
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from mlx_edgelora.tokenwise import tokenwise, tokenwise_reference

B, L, D, H = 2, 13, 16, 2  # 13: no chunk size below divides it


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def setup():
    """A LoRA projection, a norm and RoPE (position-dependent: needs the chunk's start)."""
    mx.random.seed(0)
    proj = LoRALinear.from_base(nn.Linear(D, D), r=4, scale=2.0)
    proj.linear.freeze()
    proj.lora_b = 0.1 * mx.random.normal(proj.lora_b.shape)
    norm, rope = nn.RMSNorm(D), nn.RoPE(D // H)

    def fn(start: int, x: mx.array, y: mx.array):
        """x [B, n, D], y [B, H, n, D/H] -> ([B, H, n, D/H] rotated heads, [B, n, D])."""
        h = proj(norm(x)).reshape(B, -1, H, D // H).transpose(0, 2, 1, 3)
        return rope(h + y, offset=start), proj(x) * 2.0

    x, y = mx.random.normal((B, L, D)), mx.random.normal((B, H, L, D // H))
    return proj, fn, [x, y]


def value_and_grads(proj, run, xs):
    """Outputs and the gradients of a weighted sum of them w.r.t. xs and proj's LoRA."""
    w = [mx.random.normal(s) for s in ((B, H, L, D // H), (B, L, D))]
    names = [k for k, _ in tree_flatten(proj.trainable_parameters())]

    def loss(*args):
        proj.update(tree_unflatten(list(zip(names, args[len(xs) :]))))
        outs = run(*args[: len(xs)])
        return sum((o * wi).sum() for o, wi in zip(outs, w)), outs

    params = [v for _, v in tree_flatten(proj.trainable_parameters())]
    saved = proj.trainable_parameters()
    try:
        (_, outs), grads = mx.value_and_grad(loss, argnums=list(range(len(xs) + len(params))))(
            *xs, *params
        )
    finally:
        proj.update(saved)
    return [*outs, *grads]


@pytest.mark.parametrize("chunk", [1, 4, 5, 12, 13, 0])
def test_tokenwise_matches_the_whole_function(chunk):
    proj, fn, xs = setup()
    mx.random.seed(1)
    want = value_and_grads(proj, lambda *a: fn(0, *a), xs)
    mx.random.seed(1)
    got = value_and_grads(proj, lambda *a: tokenwise(fn, [proj], a, [1, 2], [2, 1], chunk), xs)
    mx.random.seed(1)
    ref = value_and_grads(
        proj, lambda *a: tokenwise_reference(fn, a, [1, 2], [2, 1], chunk or L), xs
    )
    assert len(got) == len(want) == 2 + 2 + 2  # outputs, dx, dy, dA, dB
    for g, r, w in zip(got, ref, want):
        assert g.shape == w.shape
        assert _rel(g, w) < 1e-5 and _rel(r, w) < 1e-5
