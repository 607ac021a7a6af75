"""What the engine, streamer, planner and loss heads need to know about one model family.

Why: the segment engine (paper technique 2) runs an mlx-lm model piece by piece instead of
calling it whole, so it must know where the pieces are and how a block's two residual halves
compute. `Family` holds that knowledge for the common pre-norm layout of mlx-lm's Llama-like
models (`model.{embed_tokens, layers, norm}`, a tied or separate `lm_head`, blocks
h = x + attn(norm(x)); out = h + mlp(norm(h))); a family file (llama.py, gemma3.py, ...)
subclasses it and overrides only what differs. mlx-lm's own block call stays the reference
(`block_call`): tests check `half_forward` against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx_lm.models.base import create_attention_mask

from ..attention import attention_core, mlp_forward
from ..attn_half import HalfFns, attention_half

HALVES = ("attn", "mlp")  # a block's two residual halves, in order

# Ollama TEMPLATEs (Go text/template) of the chat formats the families use, each rendering what
# the Hugging Face Jinja template renders minus the BOS (llama.cpp adds it). Ollama passes the
# system prompt both as .System and as a "system" entry of .Messages: rendered once, from .System.
CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
    "{{ .Content }}<|im_end|>\n{{ end }}{{- end }}<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class Shape:
    """The sizes the memory planner needs (plan.py)."""

    D: int  # hidden size
    q: int  # query width, heads x head_dim (not always D: Gemma 3, Qwen3)
    kv: int  # key/value width, kv_heads x head_dim
    I: int  # MLP intermediate size  # noqa: E741
    H: int  # attention heads
    V: int  # vocabulary
    n_layers: int

    def lora_io(self) -> dict[str, int]:
        """in + out features of each LoRA-able projection, by its dotted name in a block."""
        return {
            "self_attn.q_proj": self.D + self.q,
            "self_attn.k_proj": self.D + self.kv,
            "self_attn.v_proj": self.D + self.kv,
            "self_attn.o_proj": self.q + self.D,
            "mlp.gate_proj": self.D + self.I,
            "mlp.up_proj": self.D + self.I,
            "mlp.down_proj": self.I + self.D,
        }

    def input_widths(self) -> dict[str, int]:
        """in features of each adaptable projection (a LARS gate's width), by dotted name."""
        return {
            "self_attn.q_proj": self.D,
            "self_attn.k_proj": self.D,
            "self_attn.v_proj": self.D,
            "self_attn.o_proj": self.q,
            "mlp.gate_proj": self.D,
            "mlp.up_proj": self.D,
            "mlp.down_proj": self.I,
        }


class Family:
    """One architecture family: the Llama layout; subclasses override what differs."""

    model_types: tuple[str, ...] = ()  # mlx-lm config.json `model_type`s served
    # The block's children each half uses; a checkpoint boundary and a streamed-weight unit
    # may sit between the halves (engine.py, stream.py).
    half_children: dict[str, tuple[str, ...]] = {
        "attn": ("input_layernorm", "self_attn"),
        "mlp": ("post_attention_layernorm", "mlp"),
    }
    qk_norm = False  # per-head RMSNorm of queries and keys before RoPE (attn.q_norm/k_norm)
    # Jinja chat-template marker -> the Ollama TEMPLATE of that format (ollama.py picks one)
    ollama_templates: dict[str, str] = {"<|im_start|>": CHATML}
    # Hooks for gguf.py (read) and gguf_write.py (export): the GGUF `general.architecture`
    # (None: none), llama.cpp's block tensor names -> ours, a shift added to every norm weight
    # read from a GGUF and subtracted on export (llama.cpp stores Gemma's (1 + w) norms as
    # 1 + w), and whether llama.cpp's converter interleaves the Q/K rows for rotary.
    gguf_arch: str | None = None
    gguf_norm_shift = 0.0
    gguf_permute_qk = False
    gguf_block_tensors: dict[str, str] = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }

    def gguf_read_config(self, config: dict, get) -> dict:
        """Extra mlx-lm config fields from a GGUF's `{arch}.*` keys (`get(key, default)`)."""
        return {}

    def gguf_config(self, model: nn.Module, config: dict) -> dict:
        """The hyper-parameters an export writes its `{arch}.*` keys from (UserError if
        llama.cpp cannot represent them)."""
        return config

    def gguf_keys(self, writer, config: dict) -> None:
        """`{arch}.*` keys beyond the common ones (gguf_write.add_hparams) that llama.cpp's
        converter writes for this family; `writer` is a gguf.GGUFWriter."""

    # ------------------------------------------------------------------ where things are

    def lm(self, model: nn.Module) -> nn.Module:
        """The module holding `.model` (embed_tokens, layers, norm) and `.lm_head`."""
        return model

    def prefix(self, model: nn.Module) -> str:
        """Dotted path of `lm(model)` in model.parameters() ('' or e.g. 'language_model.')."""
        return ""

    def args(self, model: nn.Module):
        """mlx-lm's ModelArgs of the text model."""
        return self.lm(model).args

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return self.lm(model).model.layers

    def layers_path(self, model: nn.Module) -> str:
        return self.prefix(model) + "model.layers"

    def embed(self, model: nn.Module, inputs: mx.array) -> mx.array:
        """Token embeddings [B, L, D] in float32 (the compute dtype) for inputs [B, L]."""
        return self.lm(model).model.embed_tokens(inputs).astype(mx.float32)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.lm(model).model.norm

    def head_is_tied(self, model: nn.Module) -> bool:
        """True when the LM head is the embedding matrix (`embed_tokens.as_linear`)."""
        return "lm_head" not in self.lm(model)

    def embedding(self, model: nn.Module) -> nn.Module:
        """The token-embedding module (the LM head too when tied)."""
        return self.lm(model).model.embed_tokens

    def head_module(self, model: nn.Module) -> nn.Module:
        lm = self.lm(model)
        return self.embedding(model) if self.head_is_tied(model) else lm.lm_head

    def head_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """Parameter-name prefixes of the embedding and LM head (one streamed unit)."""
        p = self.prefix(model)
        return (p + "model.embed_tokens.", p + "lm_head.")

    def shape(self, model: nn.Module) -> Shape:
        a = self.args(model)
        hd = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
        kv_heads = getattr(a, "num_key_value_heads", None) or a.num_attention_heads
        return Shape(
            D=a.hidden_size,
            q=a.num_attention_heads * hd,
            kv=kv_heads * hd,
            I=a.intermediate_size,
            H=a.num_attention_heads,
            V=a.vocab_size,
            n_layers=len(self.layers(model)),
        )

    # ------------------------------------------------------------------------- the block

    def half_of(self, name: str) -> str:
        """The half a block parameter belongs to, from its dotted name relative to the block."""
        child = name.split(".", 1)[0]
        for half, children in self.half_children.items():
            if child in children:
                return half
        raise ValueError(f"block parameter '{name}' is in neither half of the block")

    def window(self, model: nn.Module, i: int) -> int | None:
        """Block i's sliding attention window in tokens, None for full causal attention."""
        return None

    def block_call(self, model: nn.Module, i: int, x: mx.array) -> mx.array:
        """mlx-lm's own call of block i on x [B, L, D] (no cache): the reference."""
        mask = create_attention_mask(x, None, window_size=self.window(model, i))
        return self.layers(model)[i](x, mask)

    def half_forward(
        self, model: nn.Module, i: int, half: str, x: mx.array, attn_chunk: int, mlp_chunk: int
    ) -> mx.array:
        """One residual half of block i; chunk = 0 runs the plain, unchunked path."""
        layer = self.layers(model)[i]
        if half == "attn":
            return self.attention(
                model, i, x, attn_chunk, norm=layer.input_layernorm, residual=add_residual
            )
        norm = layer.post_attention_layernorm
        return mlp_forward(layer.mlp, x, mlp_chunk, norm=norm, residual=add_residual)

    def attention(
        self, model: nn.Module, i: int, x: mx.array, chunk: int, norm=None, post=None, residual=None
    ) -> mx.array:
        """residual(x, post(mlx-lm's Attention.__call__ (no cache) of block i on norm(x)))
        (residual None: the branch alone). With 0 < chunk < L the whole half is one custom
        function (attn_half.py) over query chunks of `chunk` tokens, the token-wise parts
        (norm, q/k/v projections, q/k norms, RoPE; o projection, post, residual) run on
        those chunks and its VJP holds k, v, x, dx and the cotangent whole, nothing else."""
        attn = self.layers(model)[i].self_attn
        B = x.shape[0]

        def heads(t: mx.array, n: int, count: int) -> mx.array:
            return t.reshape(B, n, count, -1).transpose(0, 2, 1, 3)  # [B, n, c*hd] -> [B, c, n, hd]

        def q_fn(start: int, xc: mx.array) -> mx.array:
            xn = xc if norm is None else norm(xc)
            q = heads(attn.q_proj(xn), xc.shape[1], attn.n_heads)
            q = attn.q_norm(q) if self.qk_norm else q  # per-head RMSNorm over head_dim
            return attn.rope(q, offset=start)

        def kv_fn(start: int, xc: mx.array) -> tuple[mx.array, mx.array]:
            xn = xc if norm is None else norm(xc)
            k = heads(attn.k_proj(xn), xc.shape[1], attn.n_kv_heads)
            v = heads(attn.v_proj(xn), xc.shape[1], attn.n_kv_heads)
            k = attn.k_norm(k) if self.qk_norm else k
            return attn.rope(k, offset=start), v

        def out_fn(start: int, xc: mx.array, oc: mx.array) -> mx.array:
            r = attn.o_proj(oc.transpose(0, 2, 1, 3).reshape(B, oc.shape[2], -1))  # [B, n, q]
            r = r if post is None else post(r)
            return r if residual is None else residual(xc, r)

        window = self.window(model, i)
        L = x.shape[1]
        if 0 < chunk < L:
            fns = HalfFns(
                lambda s, t: (q_fn(s, t),), kv_fn, lambda s, t, o: (out_fn(s, t, o),),
                attn.scale, window,
            )  # fmt: skip
            mods = [norm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, post]
            return attention_half(fns, [m for m in mods if m is not None], x, chunk)
        k, v = kv_fn(0, x)
        return out_fn(0, x, attention_core(q_fn(0, x), k, v, attn.scale, window))


def add_residual(x: mx.array, r: mx.array) -> mx.array:
    """The pre-norm block's residual connection."""
    return x + r
