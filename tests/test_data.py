"""data.py: folder ingestion, bad-file handling, and the trainable mask of each record kind."""

import json
import logging
from pathlib import Path

import pytest
from conftest import make_tiny_tokenizer
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_edgelora.data import BadRecord, Example, chat_example, load_documents, record_example
from mlx_edgelora.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
END = "<|im_end|>"


def trainable_spans(tokenizer, ex: Example) -> list[str]:
    """Decoded runs of consecutive trainable tokens."""
    spans, run = [], []
    for tok, m in zip(ex.tokens + [None], ex.mask + [False], strict=True):
        if m:
            run.append(tok)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def tiny_tokenizer_with(tmp_path: Path, chat_template: str | None):
    """The tiny byte-level tokenizer with another (or no) chat template."""
    hf = make_tiny_tokenizer(tmp_path)
    hf.chat_template = chat_template
    return TokenizerWrapper(hf)


@pytest.fixture
def plain_tokenizer(tmp_path):
    return tiny_tokenizer_with(tmp_path / "plain-tok", None)


def write_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("Second file.\n")
    (root / "a.md").write_text("# First\nHello bees.\n")
    (root / "sub" / "c.txt").write_text("In a subfolder.")
    lines = [
        json.dumps({"text": "line one"}),
        "{not json",
        json.dumps({"prompt": "Q?", "completion": "A."}),
        json.dumps({"foo": 1}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps(
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
        ),
    ]
    (root / "sub" / "deeper" / "d.jsonl").write_text("\n".join(lines) + "\n")
    # skipped silently: hidden, other extensions
    (root / ".git" / "x.txt").write_text("hidden")
    (root / ".hidden.md").write_text("hidden")
    (root / "photo.png").write_bytes(b"\x89PNG")
    # skipped with a warning each
    (root / "binary.txt").write_bytes(b"abc\x00def")
    (root / "empty.md").write_text("  \n")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "dangling.md").symlink_to(root / "missing-target")


def test_folder_ingestion_recursive_sorted_and_bad_files_warned(tmp_path, tiny_tokenizer, caplog):
    write_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="mlx_edgelora.data"):
        docs = load_documents(str(tmp_path), tiny_tokenizer)
    assert [d.source for d in docs] == [
        "a.md", "b.txt", "sub/c.txt", "sub/deeper/d.jsonl:1", "sub/deeper/d.jsonl:3",
        "sub/deeper/d.jsonl:7",
    ]  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, why in [
        ("binary.txt", "NUL"),
        ("empty.md", "empty"),
        ("latin1.txt", "UTF-8"),
        ("dangling.md", "unreadable"),
    ]:
        (line,) = [w for w in warnings if name in w]
        assert why in line and "\n" not in line
    (jsonl,) = [w for w in warnings if "d.jsonl" in w]
    assert "skipped 3 of 6 lines" in jsonl and "invalid JSON: line 2" in jsonl
    assert "unknown schema" in jsonl and "no assistant turn" in jsonl
    summary = warnings[-1]
    assert "6 documents" in summary and "4 bad files" in summary
    assert "3 bad jsonl lines" in summary and "1 files with other extensions" in summary
    assert not any(".git" in w or "hidden" in w for w in warnings)


def test_text_document_all_trainable_with_eos(tmp_path, tiny_tokenizer):
    (tmp_path / "note.md").write_text("Bees at dawn.")
    (doc,) = load_documents(str(tmp_path / "note.md"), tiny_tokenizer)  # a single file works too
    assert doc.source == "note.md"
    assert tiny_tokenizer.decode(doc.tokens) == "Bees at dawn." + END
    # token 0 has no context in its document, so it is never a target; all others are
    assert doc.mask == [False] + [True] * (len(doc.tokens) - 1)


def test_missing_path_is_user_error(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="nope"):
        load_documents(str(tmp_path / "nope"), tiny_tokenizer)


def test_all_bad_folder_is_user_error(tmp_path, tiny_tokenizer, caplog):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.md").write_bytes(b"\x00\x01")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="no usable .txt/.md/.jsonl documents found"):
        load_documents(str(tmp_path), tiny_tokenizer)
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2


def test_prompt_completion_chat_mask(tiny_tokenizer):
    ex = record_example({"prompt": "How warm?", "completion": "Warm enough."}, "x", tiny_tokenizer)
    rendered = (
        "<|im_start|>user\nHow warm?<|im_end|>\n<|im_start|>assistant\nWarm enough.<|im_end|>\n"
    )
    assert tiny_tokenizer.decode(ex.tokens) == rendered
    assert trainable_spans(tiny_tokenizer, ex) == ["Warm enough." + END]


def test_prompt_completion_plain_mask(plain_tokenizer):
    ex = record_example({"prompt": "Q: rye? A:", "completion": " Yes."}, "x", plain_tokenizer)
    n_prompt = len(plain_tokenizer.encode("Q: rye? A:"))
    assert plain_tokenizer.decode(ex.tokens) == "Q: rye? A: Yes." + END
    assert ex.mask == [False] * n_prompt + [True] * (len(ex.tokens) - n_prompt)


# SmolLM2-style: injects a default system turn when there is none (still prefix-consistent)
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("template", ["fixture", "default-system"])
def test_chat_mask_only_assistant_turns(tmp_path, tiny_tokenizer, template, with_system):
    if template != "fixture":
        tiny_tokenizer = tiny_tokenizer_with(tmp_path, DEFAULT_SYSTEM_TEMPLATE)
    messages = [
        {"role": "system", "content": "You are Wren."},
        {"role": "user", "content": "Feed the starter?"},
        {"role": "assistant", "content": "Twice a day."},
        {"role": "user", "content": "With what?"},
        {"role": "assistant", "content": "Rye and water,\nequal weights."},
    ]
    messages = messages if with_system else messages[1:]
    ex = chat_example(messages, "x", tiny_tokenizer)
    assert ex.tokens == tiny_tokenizer.apply_chat_template(messages)
    assert trainable_spans(tiny_tokenizer, ex) == [
        "Twice a day." + END,
        "Rye and water,\nequal weights." + END,
    ]
    frozen = tiny_tokenizer.decode([t for t, m in zip(ex.tokens, ex.mask) if not m])
    assert "Feed the starter?" in frozen and "With what?" in frozen
    assert ("You are Wren." in frozen) == with_system


def test_chat_template_not_prefix_consistent_is_rejected(tmp_path):
    # renders the turn count first, so a shorter conversation is not a prefix of the full one
    template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer = tiny_tokenizer_with(tmp_path, template)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(BadRecord, match="prefix-consistent"):
        chat_example(messages, "x", tokenizer)


@pytest.mark.parametrize(
    "record, why",
    [
        ([1, 2], "not a JSON object"),
        ({"messages": "hi"}, "list of"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "starts with an assistant"),
        ({"text": "   "}, "empty"),
        ({"text": 3}, "must be a string"),
    ],
)
def test_bad_records(tiny_tokenizer, record, why):
    with pytest.raises(BadRecord, match=why):
        record_example(record, "x", tiny_tokenizer)


def test_messages_without_chat_template_rejected(plain_tokenizer):
    record = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(BadRecord, match="chat template"):
        record_example(record, "x", plain_tokenizer)


def test_sample_notes_load(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="mlx_edgelora.data"):
        docs = load_documents(str(ASSETS / "sample_notes"), tiny_tokenizer)
        chats = load_documents(str(ASSETS / "sample_chat.jsonl"), tiny_tokenizer)
    assert not caplog.records  # the bundled data has nothing to skip
    assert 6 <= len(docs) <= 12 and all(d.tokens[-1] == tiny_tokenizer.eos_token_id for d in docs)
    assert len(chats) >= 30 and all(any(c.mask) and not c.mask[0] for c in chats)
