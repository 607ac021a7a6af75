"""Llama 3.x, SmolLM2 and Mistral: mlx-lm runs Mistral on its llama code (MODEL_REMAPPING).

The base `Family` is this layout; mlx-lm's llama may also mark blocks `use_sliding` (config
`layer_types`), attending over the last `sliding_window` tokens only.
"""

from mlx import nn

from .base import CHATML, Family

LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    '{{ end }}{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}'
    "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{- end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Mistral / Llama 2 instruct; a system prompt opens the first user turn, then a blank line
# (the first user turn is entry 0, or 1 after Ollama's "system" entry)
INST = (
    '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}[INST] '
    "{{ if and $.System (le $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }} [/INST]"
    '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{- end }}'
)


class Llama(Family):
    model_types = ("llama", "mistral")
    ollama_templates = {"<|start_header_id|>": LLAMA3, "[INST]": INST, "<|im_start|>": CHATML}
    gguf_arch = "llama"
    gguf_permute_qk = True  # llama.cpp's converter interleaves Q/K rows for llama only

    def gguf_keys(self, writer, config: dict) -> None:
        writer.add_vocab_size(config["vocab_size"])

    def window(self, model: nn.Module, i: int) -> int | None:
        sliding = self.layers(model)[i].use_sliding
        return self.args(model).sliding_window if sliding else None


FAMILY = Llama()
