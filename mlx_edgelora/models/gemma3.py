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

In GGUF (llama.cpp's convert_hf_to_gguf.py, Gemma3Model): norms are stored as 1 + w, the
embedding scale and the tied head are implicit, and llama.cpp hard-codes three things the file
does not store: 5 local : 1 global layers, the local RoPE base 10000, and the query scale
(head_dim^-0.5; hidden/heads for the 62-layer 27B). A model with other values cannot be
exported, and a GGUF read gets them.
"""

import mlx.core as mx
from mlx import nn
from mlx_lm.models.gemma3_text import clip_residual

from ..attention import mlp_forward
from ..errors import UserError
from .base import Family

# Gemma's turns (the assistant is "model"); a system prompt opens the first user turn, then a
# blank line, as the Hugging Face template does (first user turn: entry 0, or 1 after Ollama's
# "system" entry)
GEMMA = (
    '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}<start_of_turn>user\n'
    "{{ if and $.System (le $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
    '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
    "{{ end }}{{- end }}<start_of_turn>model\n"
)


def llama_cpp_fixed(hidden: int, heads: int, layers: int, head_dim: int) -> dict:
    """The gemma3_text fields llama.cpp hard-codes rather than reads (llama-model.cpp)."""
    return {
        "sliding_window_pattern": 6,  # set_swa_pattern(6)
        "rope_local_base_freq": 10000.0,  # rope_freq_base_train_swa
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
    }


class Gemma3(Family):
    model_types = ("gemma3_text", "gemma3")
    half_children = {
        "attn": ("input_layernorm", "self_attn", "post_attention_layernorm"),
        "mlp": ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    }
    qk_norm = True
    ollama_templates = {"<start_of_turn>": GEMMA}
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

    def gguf_read_config(self, config: dict, get) -> dict:
        head_dim = config.setdefault("head_dim", 256)  # llama.cpp's default key_length
        fixed = llama_cpp_fixed(
            config["hidden_size"],
            config["num_attention_heads"],
            config["num_hidden_layers"],
            head_dim,
        )
        return {
            **fixed,
            "model_type": "gemma3_text",
            "sliding_window": get("attention.sliding_window"),
            "rope_local_base_freq": float(get("rope.freq_base_swa", 10000.0)),
        }

    def gguf_config(self, model: nn.Module, config: dict) -> dict:
        """The text model's fields with mlx-lm's defaults filled in (config.json may omit them,
        and gemma3 nests them in text_config)."""
        cfg = dict(vars(self.args(model)))
        fixed = llama_cpp_fixed(
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_hidden_layers"],
            cfg["head_dim"],
        )
        for key, want in fixed.items():
            if cfg[key] != want:
                raise UserError(
                    f"config {key} = {cfg[key]}: llama.cpp's gemma3 architecture fixes it at "
                    f"{want}, so this model cannot be exported to GGUF"
                )
        return cfg

    def gguf_keys(self, writer, config: dict) -> None:
        writer.add_sliding_window(config["sliding_window"])
        # llama.cpp's gemma3 ignores it (hard-coded 10000, checked above); gguf.py reads it
        writer.add_rope_freq_base_swa(config["rope_local_base_freq"])

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
            return self.attention(model, i, x, attn_chunk, **norms, residual=clip_residual)
        norms = dict(norm=layer.pre_feedforward_layernorm, post=layer.post_feedforward_layernorm)
        return mlp_forward(layer.mlp, x, mlp_chunk, **norms, residual=clip_residual)


FAMILY = Gemma3()
