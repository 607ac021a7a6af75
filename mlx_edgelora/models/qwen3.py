"""Qwen3 (dense): the Llama layout plus a per-head RMSNorm of queries and keys, no qkv bias."""

from .base import Family


class Qwen3(Family):
    model_types = ("qwen3",)
    qk_norm = True
    gguf_arch = "qwen3"
    gguf_block_tensors = {
        **Family.gguf_block_tensors,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }


FAMILY = Qwen3()
