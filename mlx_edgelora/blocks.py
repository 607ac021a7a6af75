"""The one seam onto mlx-lm's model internals, dispatching to the model's family (models/).

Why: the engine (technique 2) runs the model piece by piece instead of calling it whole, so it
must know where the pieces are; each family file in models/ knows that for its architecture,
and these functions look the family up from the model so callers never branch on it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from .models import HALVES, Shape, family_of
from .quant import dequantize  # one dequantize recipe: scales cast first


def embed(model: nn.Module, inputs: mx.array) -> mx.array:
    """Token embeddings [B, L, D] in float32 (the compute dtype) for inputs [B, L]."""
    return family_of(model).embed(model, inputs)


def layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, first to last."""
    return family_of(model).layers(model)


def layers_path(model: nn.Module) -> str:
    """Dotted path of the block list in model.parameters() ("model.layers" for most)."""
    return family_of(model).layers_path(model)


def block_forward(
    model: nn.Module,
    i: int,
    x: mx.array,
    attn_chunk: int,
    mlp_chunk: int,
    halves: tuple[str, ...] = HALVES,
) -> mx.array:
    """Exactly mlx-lm's call of block i on x, in chunks (attention.py); chunk 0 = unchunked.

    `halves` runs only those residual halves, in order: ("attn",) then ("mlp",) is the block.
    """
    family = family_of(model)
    for half in halves:
        x = family.half_forward(model, i, half, x, attn_chunk, mlp_chunk)
    return x


def block_call(model: nn.Module, i: int, x: mx.array) -> mx.array:
    """mlx-lm's own call of block i (its mask included): the graph engine's reference."""
    return family_of(model).block_call(model, i, x)


def half_of(model: nn.Module, name: str) -> str:
    """The half a block parameter belongs to, from its dotted name relative to the block."""
    return family_of(model).half_of(name)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the LM head."""
    return family_of(model).final_norm(model)


def head_is_tied(model: nn.Module) -> bool:
    """True when the LM head is the embedding matrix (`embed_tokens.as_linear`)."""
    return family_of(model).head_is_tied(model)


def embedding_module(model: nn.Module) -> nn.Module:
    """The token-embedding module (the LM head too when tied)."""
    return family_of(model).embedding(model)


def head_module(model: nn.Module) -> nn.Module:
    """The module holding the LM-head weight [V, D]: lm_head, or the tied embedding."""
    return family_of(model).head_module(model)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the embedding and the LM head."""
    return family_of(model).head_prefixes(model)


def head_logits(model: nn.Module, x: mx.array) -> mx.array:
    """Logits x @ W.T through the head module's own kernel: a quantized head runs the
    backend's quantized path (quant.py) and never holds a whole float copy of W."""
    m = head_module(model)
    return m.as_linear(x) if head_is_tied(model) else m(x)


def head_shape(model: nn.Module) -> tuple[int, int]:
    """(V, D) of the LM head, whether its weight is quantized (packed in uint32) or not."""
    m = head_module(model)
    V, cols = m.weight.shape
    return V, cols * 32 // m.bits if "scales" in m else cols


def head_weight_rows(
    model: nn.Module,
    rows: np.ndarray | slice | None = None,
    after: Any = None,
    read: Any = None,
) -> mx.array:
    """Rows of the LM-head weight as float32 [n, D]; a quantized head dequantizes only those.

    `after` (arrays): the rows are read (and dequantized) only once those are computed, so a
    loop over vocabulary chunks holds one chunk at a time instead of MLX running ahead.
    `read(name, rows)`: where the raw rows of the head's "weight" / "scales" / "biases" come
    from (WeightStream.head_reader: from disk, when the head is streamed); default the module.
    """
    m = head_module(model)
    sel = slice(None) if rows is None else rows
    if read is None:
        index = mx.array(sel.astype(np.int32)) if isinstance(sel, np.ndarray) else sel

        def read(name: str, _: Any) -> mx.array:
            return m[name][index]

    w = read("weight", sel)
    if after is not None:
        w = mx.depends(w, after)
    if "scales" not in m:
        return w.astype(mx.float32)
    return dequantize(
        w,
        read("scales", sel),
        read("biases", sel) if "biases" in m else None,
        m.group_size,
        m.bits,
        getattr(m, "mode", "affine"),
    )


def shape(model: nn.Module) -> Shape:
    """The sizes the memory planner needs."""
    return family_of(model).shape(model)


def check_trainable_in_blocks(model: nn.Module) -> None:
    """The segment engine differentiates blocks only: refuse trainable params elsewhere."""
    path = family_of(model).layers_path(model)
    outside = [k for k, _ in tree_flatten(model.trainable_parameters()) if not k.startswith(path)]
    if outside:
        raise ValueError(f"trainable parameters outside the blocks: {', '.join(outside[:3])}")


def model_tree(model: nn.Module, per_block: list[dict]) -> dict:
    """A tree shaped like `model.trainable_parameters()` holding `per_block[i]` for block i."""
    tree = model.trainable_parameters()
    *parents, last = family_of(model).layers_path(model).split(".")
    node = tree
    for key in parents:
        node = node[key]
    node[last] = per_block
    return tree
