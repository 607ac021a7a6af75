"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE and stop tokens.

Why: `ollama create NAME -f Modelfile` needs the prompt format in Ollama's Go-template
language, not the Jinja chat template the GGUF carries. The two formats our families use
(ChatML: Qwen2, SmolLM2; Llama 3 headers) are translated; for any other template the
Modelfile says so and Ollama falls back to the template it detects from the GGUF itself.
"""

from __future__ import annotations

import json

_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}\
<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""

_KNOWN = {"<|im_start|>": _CHATML, "<|start_header_id|>": _LLAMA3}


def ollama_template(chat_template: str | None) -> str | None:
    """The Ollama TEMPLATE for a Jinja chat template we recognise, else None."""
    for marker, template in _KNOWN.items():
        if chat_template and marker in chat_template:
            return template
    return None


def modelfile(source: str, chat_template: str | None, stops: list[str], adapter: str = "") -> str:
    """Modelfile text. `source` is the GGUF (the base when `adapter` is an adapter GGUF)."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    template = ollama_template(chat_template)
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    elif chat_template:
        lines.append("# chat template not translated: Ollama uses the one it detects in the GGUF")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"
