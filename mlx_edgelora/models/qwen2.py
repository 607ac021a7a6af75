"""Qwen2 / Qwen2.5: the Llama layout; the q/k/v biases live inside the projections."""

from .base import Family


class Qwen2(Family):
    model_types = ("qwen2",)
    gguf_arch = "qwen2"


FAMILY = Qwen2()
