"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE and stop tokens.

Why: `ollama create NAME -f Modelfile` needs the prompt format in Ollama's Go-template
language, not the Jinja chat template the GGUF carries. Each family lists the formats it
knows (models/: `ollama_templates`, keyed by a marker of the Jinja template); for any other
template the Modelfile has no TEMPLATE and says what Ollama does then: it compares the GGUF's
`tokenizer.chat_template` with its own built-in templates and uses the closest one
(`ollama create` prints "using autodetected template NAME"), or the bare prompt if none is
close.
"""

from __future__ import annotations

import json

from .models import Family

UNTRANSLATED = (
    "chat template not translated: Ollama uses its built-in template closest to the GGUF's "
    "tokenizer.chat_template, or the bare prompt; add a TEMPLATE if replies look wrong"
)
NO_TEMPLATE = "no chat template: Ollama sends the bare prompt"


def ollama_template(family: Family, chat_template: str | None) -> str | None:
    """The Ollama TEMPLATE for a Jinja chat template the family recognises, else None."""
    for marker, template in family.ollama_templates.items():
        if chat_template and marker in chat_template:
            return template
    return None


def modelfile(
    source: str, family: Family, chat_template: str | None, stops: list[str], adapter: str = ""
) -> tuple[str, str | None]:
    """(Modelfile text, a note when no TEMPLATE was written). `source` is the GGUF (the base
    when `adapter` is an adapter GGUF)."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    template = ollama_template(family, chat_template)
    note = None if template else UNTRANSLATED if chat_template else NO_TEMPLATE
    lines.append(f'TEMPLATE """{template}"""' if template else f"# {note}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n", note
