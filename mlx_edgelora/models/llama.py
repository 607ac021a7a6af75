"""Llama 3.x, SmolLM2 and Mistral: mlx-lm runs Mistral on its llama code (MODEL_REMAPPING).

The base `Family` is this layout; mlx-lm's llama may also mark blocks `use_sliding` (config
`layer_types`), attending over the last `sliding_window` tokens only.
"""

from mlx import nn

from .base import Family


class Llama(Family):
    model_types = ("llama", "mistral")
    gguf_arch = "llama"
    gguf_permute_qk = True  # llama.cpp's converter interleaves Q/K rows for llama only

    def gguf_keys(self, writer, config: dict) -> None:
        writer.add_vocab_size(config["vocab_size"])

    def window(self, model: nn.Module, i: int) -> int | None:
        sliding = self.layers(model)[i].use_sliding
        return self.args(model).sliding_window if sliding else None


FAMILY = Llama()
