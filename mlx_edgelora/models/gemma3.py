"""Gemma 3 text models (`gemma3_text`) and the text tower of `gemma3` (vision weights dropped).

What differs from the Llama layout, after mlx-lm's gemma3_text.py:
- the embedding is scaled by sqrt(hidden_size), rounded to bfloat16 as mlx-lm does;
- every RMSNorm multiplies by (1 + w) (mlx-lm's RMSNorm class; we call the modules);
- four norms per block: the attention half is input_layernorm -> self_attn ->
  post_attention_layernorm, the MLP half pre_feedforward_layernorm -> mlp ->
  post_feedforward_layernorm, each added to the residual (clipped in float16);
- per-head q/k norm, attention scale query_pre_attn_scalar^-0.5 (attn.scale);
- sliding-window layers (their own RoPE base, rope_local_base_freq) mixed with global ones
  every sliding_window_pattern-th layer (attn.is_sliding);
- a GELU-tanh MLP, and a head tied to the embedding when the checkpoint has no lm_head.
mlx-lm's gemma3_text applies no final logit softcapping, so neither do we.
"""

import mlx.core as mx
from mlx import nn
from mlx_lm.models.gemma3_text import clip_residual

from ..attention import mlp_forward
from .base import Family


class Gemma3(Family):
    model_types = ("gemma3_text", "gemma3")
    half_children = {
        "attn": ("input_layernorm", "self_attn", "post_attention_layernorm"),
        "mlp": ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    }
    qk_norm = True
    gguf_arch = "gemma3"
    gguf_norm_shift = -1.0  # convert_hf_to_gguf.py writes Gemma 3 norm weights as w + 1
    gguf_block_tensors = {
        **Family.gguf_block_tensors,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }

    def lm(self, model: nn.Module) -> nn.Module:
        return model.language_model if "language_model" in model else model

    def prefix(self, model: nn.Module) -> str:
        return "language_model." if "language_model" in model else ""

    def embed(self, model: nn.Module, inputs: mx.array) -> mx.array:
        h = self.lm(model).model.embed_tokens(inputs)
        scale = mx.array(self.args(model).hidden_size ** 0.5, mx.bfloat16).astype(h.dtype)
        return (h * scale).astype(mx.float32)

    def window(self, model: nn.Module, i: int) -> int | None:
        sliding = self.layers(model)[i].self_attn.is_sliding
        return self.args(model).sliding_window if sliding else None

    def half_forward(
        self, model: nn.Module, i: int, half: str, x: mx.array, attn_chunk: int, mlp_chunk: int
    ) -> mx.array:
        layer = self.layers(model)[i]
        if half == "attn":
            norms = dict(norm=layer.input_layernorm, post=layer.post_attention_layernorm)
            return clip_residual(x, self.attention(model, i, x, attn_chunk, **norms))
        norms = dict(norm=layer.pre_feedforward_layernorm, post=layer.post_feedforward_layernorm)
        return clip_residual(x, mlp_forward(layer.mlp, x, mlp_chunk, **norms))


FAMILY = Gemma3()
