"""Llama 3.x, SmolLM2 and Mistral: mlx-lm runs Mistral on its llama code (MODEL_REMAPPING).

The base `Family` is this layout; mlx-lm's llama may mark blocks `use_sliding`
(config `layer_types`), which the base window() already honours.
"""

from .base import Family


class Llama(Family):
    model_types = ("llama", "mistral")
    gguf_arch = "llama"


FAMILY = Llama()
