"""The one seam onto mlx-lm's model internals: embedding, blocks, final norm, LM head.

Why: the engine (technique 2) runs the model piece by piece instead of calling it whole, so it
must know where the pieces are. Llama and Qwen2 in mlx-lm share one layout
(`model.model.{embed_tokens, layers, norm}` and a tied or separate `lm_head`); if mlx-lm
changes it, this file is the only one to edit.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

LAYERS_PATH = "model.layers"  # dotted path of the block list in model.parameters()

# The two residual halves of a block, h = x + attn(norm(x)); out = h + mlp(norm(h)), by the
# children each one uses. A checkpoint boundary and a streamed-weight unit may sit between
# them (engine.py, stream.py).
HALVES = ("attn", "mlp")
HALF_CHILDREN = {
    "attn": ("input_layernorm", "self_attn"),
    "mlp": ("post_attention_layernorm", "mlp"),
}


def half_of(name: str) -> str:
    """The half a block parameter belongs to, from its dotted name relative to the block."""
    child = name.split(".", 1)[0]
    for half, children in HALF_CHILDREN.items():
        if child in children:
            return half
    raise ValueError(f"block parameter '{name}' is in neither half of the block")


def embed(model: nn.Module, inputs: mx.array) -> mx.array:
    """Token embeddings [B, L, D] in float32 (the compute dtype) for inputs [B, L]."""
    return model.model.embed_tokens(inputs).astype(mx.float32)


def layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, first to last."""
    return model.model.layers


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last block's output before the LM head."""
    return model.model.norm


def head_is_tied(model: nn.Module) -> bool:
    """True when the LM head is the embedding matrix (`embed_tokens.as_linear`)."""
    return "lm_head" not in model


def head_module(model: nn.Module) -> nn.Module:
    """The module holding the LM-head weight [V, D]: lm_head, or the tied embedding."""
    return model.model.embed_tokens if head_is_tied(model) else model.lm_head


def head_logits(model: nn.Module, x: mx.array) -> mx.array:
    """Logits x @ W.T through the head module's own kernel: a quantized head runs the
    backend's quantized path (quant.py) and never holds a whole float copy of W."""
    return model.model.embed_tokens.as_linear(x) if head_is_tied(model) else model.lm_head(x)


def check_trainable_in_blocks(model: nn.Module) -> None:
    """The segment engine differentiates blocks only: refuse trainable params elsewhere."""
    outside = [
        k for k, _ in tree_flatten(model.trainable_parameters()) if not k.startswith(LAYERS_PATH)
    ]
    if outside:
        raise ValueError(f"trainable parameters outside the blocks: {', '.join(outside[:3])}")


def model_tree(model: nn.Module, per_block: list[dict]) -> dict:
    """A tree shaped like `model.trainable_parameters()` holding `per_block[i]` for block i."""
    tree = model.trainable_parameters()
    tree["model"]["layers"] = per_block
    return tree
