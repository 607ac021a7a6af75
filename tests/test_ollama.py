"""ollama.py and the families' Ollama TEMPLATEs: each renders a conversation exactly as the
Jinja chat template it stands for (minus the BOS, which llama.cpp adds).

The Go side is rendered by `render_go` below, a small evaluator of the text/template subset
the templates use (text, trim markers, fields, $-variables, if / else if / else, range with
index, eq / ne / le / and); Ollama's own engine is Go's text/template.
"""

import json
import re

import jinja2
import pytest

from mlx_edgelora.gguf_tokenizer import GEMMA_TEMPLATE
from mlx_edgelora.models import FAMILIES
from mlx_edgelora.models.base import CHATML
from mlx_edgelora.models.gemma3 import GEMMA
from mlx_edgelora.models.llama import INST, LLAMA3
from mlx_edgelora.ollama import NO_TEMPLATE, UNTRANSLATED, modelfile, ollama_template

# --- a Go text/template subset -----------------------------------------------------------

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+')
_FUNCS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "le": lambda a, b: a <= b,
    "and": lambda *a: next((x for x in a if not x), a[-1]),
}


def _pieces(src: str) -> list[tuple[str, str]]:
    """Text and action pieces, with `{{-` / `-}}` whitespace trimming applied to the text."""
    out, pos, trim_next = [], 0, False
    for m in _ACTION.finditer(src):
        text = src[pos : m.start()]
        text = text.rstrip() if m.group(1) else text
        out += [("text", text.lstrip() if trim_next else text), ("act", m.group(2))]
        trim_next, pos = bool(m.group(3)), m.end()
    tail = src[pos:]
    return out + [("text", tail.lstrip() if trim_next else tail)]


def _block(pieces) -> tuple[list, str | None]:
    """Nodes up to the next {{ end }} / {{ else ... }} (returned as the stop action)."""
    nodes = []
    for kind, value in pieces:
        word = value.split(" ", 1)[0]
        if kind == "text":
            nodes.append(("text", value))
        elif word in ("end", "else"):
            return nodes, value
        elif word == "if":
            branches, cond = [], value[3:]
            while True:
                body, stop = _block(pieces)
                branches.append((cond, body))
                if stop.startswith("else if "):
                    cond = stop[8:]
                    continue
                other, stop = _block(pieces) if stop == "else" else ([], stop)
                assert stop == "end"
                break
            nodes.append(("if", branches, other))
        elif word == "range":
            names, _, expr = value[6:].rpartition(":=")
            body, stop = _block(pieces)
            assert stop == "end"
            nodes.append(("range", [n.strip() for n in names.split(",") if n.strip()], expr, body))
        else:
            nodes.append(("out", value))
    return nodes, None


def _value(tokens: list[str], env: dict):
    t = tokens.pop(0)
    if t == "(":
        v = _call(tokens, env)
        assert tokens.pop(0) == ")"
        return v
    if t.startswith('"'):
        return json.loads(t)
    if t.isdigit():
        return int(t)
    if t.startswith("$."):
        return env["$"][t[2:]]
    return env[t] if t.startswith("$") else env["."][t[1:]]


def _call(tokens: list[str], env: dict):
    if tokens[0] in _FUNCS:
        f, args = _FUNCS[tokens.pop(0)], []
        while tokens and tokens[0] != ")":
            args.append(_value(tokens, env))
        return f(*args)
    return _value(tokens, env)


def _eval(expr: str, env: dict):
    return _call(_TOKEN.findall(expr), env)


def _render(nodes: list, env: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], env)))
        elif node[0] == "if":
            body = next((b for c, b in node[1] if _eval(c, env)), node[2])
            out.append(_render(body, env))
        else:  # range
            _, names, expr, body = node
            for i, item in enumerate(_eval(expr, env)):
                bound = dict(zip(names, [i, item] if len(names) == 2 else [item]))
                out.append(_render(body, {**env, **bound, ".": item}))
    return "".join(out)


def render_go(template: str, system: str, messages: list[dict], system_in_messages=True) -> str:
    """Ollama's data: .System, and .Messages with the system entry (current Ollama) or
    without it (older Ollama)."""
    turns = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and system_in_messages:
        turns = [{"Role": "system", "Content": system}] + turns
    root = {"System": system, "Messages": turns}
    nodes, stop = _block(iter(_pieces(template)))
    assert stop is None
    return _render(nodes, {".": root, "$": root})


def render_jinja(template: str, system: str, messages: list[dict], prompt=True) -> str:
    def fail(message):
        raise ValueError(message)

    env = jinja2.Environment()
    env.globals["raise_exception"] = fail
    turns = ([{"role": "system", "content": system}] if system else []) + messages
    return env.from_string(template).render(
        messages=turns, add_generation_prompt=prompt, bos_token="", eos_token="</s>"
    )


# --- the templates -----------------------------------------------------------------------

TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
# Jinja templates as the models ship them (tokenizer_config.json), BOS rendered empty:
CHATML_JINJA = (  # SmolLM2-Instruct's, which renders a system message like any other
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_JINJA = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = "
    "bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL_JINJA = (  # Mistral-7B-Instruct-v0.2's (no system role)
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "go, jinja, system",
    [
        (CHATML, CHATML_JINJA, "You are terse."),
        (CHATML, CHATML_JINJA, ""),
        (LLAMA3, LLAMA3_JINJA, "You are terse."),
        (LLAMA3, LLAMA3_JINJA, ""),
        (GEMMA, GEMMA_TEMPLATE, "You are terse."),
        (GEMMA, GEMMA_TEMPLATE, ""),
        (INST, MISTRAL_JINJA, ""),
    ],
)
def test_template_renders_as_the_jinja_template(go, jinja, system):
    want = render_jinja(jinja, system, TWO_TURNS, prompt=go is not INST)
    assert render_go(go, system, TWO_TURNS) == want
    assert render_go(go, system, TWO_TURNS, system_in_messages=False) == want


def test_inst_puts_the_system_prompt_in_the_first_user_turn():
    got = render_go(INST, "Be brief.", TWO_TURNS)
    assert got == (
        "[INST] Be brief.\n\nHi there [/INST]Hello! How can I help?</s>"
        "[INST] Tell me a joke. [/INST]"
    )


def test_the_renderer_applies_trim_markers_and_else():
    """The evaluator itself, on cases whose Go output is known."""
    root = {"System": "", "Messages": [], "X": "a"}
    nodes, _ = _block(iter(_pieces("x  {{- if .System }}s{{ else }}n{{ end -}}  y{{ .X }}")))
    assert _render(nodes, {".": root, "$": root}) == "xny" + "a"


@pytest.mark.parametrize(
    "family, jinja, want",
    [
        ("llama", LLAMA3_JINJA, LLAMA3),
        ("mistral", MISTRAL_JINJA, INST),
        ("llama", CHATML_JINJA, CHATML),  # SmolLM2 is a llama
        ("qwen2", CHATML_JINJA, CHATML),
        ("qwen3", CHATML_JINJA, CHATML),
        ("gemma3_text", GEMMA_TEMPLATE, GEMMA),
        ("gemma3", GEMMA_TEMPLATE, GEMMA),
        ("qwen2", GEMMA_TEMPLATE, None),  # not a format of that family
    ],
)
def test_each_family_picks_its_template(family, jinja, want):
    assert ollama_template(FAMILIES[family], jinja) == want


def test_modelfile_without_a_known_template_defers_to_ollama():
    text, note = modelfile("./m.gguf", FAMILIES["llama"], "{{ messages }}", ["</s>"])
    assert 'TEMPLATE """' not in text and f"# {UNTRANSLATED}\n" in text
    assert note == UNTRANSLATED
    assert text.endswith('PARAMETER stop "</s>"\n')
    text, note = modelfile("./m.gguf", FAMILIES["llama"], None, [])
    assert note == NO_TEMPLATE and 'TEMPLATE """' not in text


def test_modelfile_with_a_known_template():
    text, note = modelfile("./m.gguf", FAMILIES["gemma3"], GEMMA_TEMPLATE, ["<end_of_turn>"])
    assert note is None
    assert text == f'FROM ./m.gguf\nTEMPLATE """{GEMMA}"""\nPARAMETER stop "<end_of_turn>"\n'
