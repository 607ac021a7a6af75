"""Files -> token sequences with a per-token trainable `mask` (the data side of loss masking).

A folder is searched recursively (sorted, hidden entries skipped) for .txt/.md (one document
each, every token trainable) and .jsonl files (one record per line: {"text"},
{"prompt", "completion"} or {"messages"}). `mask[i]` is True when token i carries loss as a
*target*, i.e. when predicting tokens[i] from tokens[:i] is trained; token 0 of a document is
never a target (it has no context inside its document), so packing loses no trainable token.

Chat masking (the common-prefix trick): the full conversation is rendered once with the
tokenizer's chat template; for each assistant turn we render the conversation up to it
(with the generation prompt) and up to and including it. Both renders must be token prefixes
of the full render -- else the template is not prefix-consistent and the record is skipped
with a warning -- and the tokens between them are the assistant's content plus its
end-of-turn token (anything the template emits after the end-of-turn token is not trained).

Prompt/completion records are rendered as a user/assistant chat when the tokenizer has a chat
template (as mlx-lm does, and as `mlx_lm.generate` prompts a chat model), else as plain
`encode(prompt) + encode(completion) + EOS`, tokenized separately so that the boundary is
exactly where generation would start. Only the completion (+ end token) is trainable.

Bad input never stops a run: unreadable, empty, binary or non-UTF-8 files and bad jsonl lines
are skipped with one warning line each (per file), and a summary line counts everything.

Path rules: symlinks (to files or folders) are followed when their target lies inside the
--data folder and skipped (counted) when it leads outside; each real file and folder is read
once, so a link back into the tree neither loops nor duplicates. FIFOs, sockets and devices
are skipped (opening a FIFO would wait forever). A document or jsonl line above
MAX_RECORD_BYTES is skipped with its size: tokenizing takes ~150x a text's size in RAM, which
the memory plan cannot see, and jsonl files are read a line at a time, never whole.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
MAX_RECORD_BYTES = 2**20  # one .txt/.md document or one jsonl line (~350k tokens)
RENDER_LIMIT_S = 10  # one conversation renders in milliseconds; a template loop never ends
_SCHEMAS = 'one of {"text"}, {"prompt", "completion"} or {"messages"}'


@dataclass
class Example:
    """One document: tokens, mask[i] = tokens[i] is a trainable target, and where it came from."""

    tokens: list[int]
    mask: list[bool]
    source: str  # path relative to the --data root, plus ":<line>" for jsonl records


class BadRecord(ValueError):
    """A file or jsonl record that cannot become an Example; the message says why."""


# Entries of a --data folder that are passed over, by reason (counted in the summary line).
OTHER, OUTSIDE, SPECIAL = (
    "files with other extensions",
    "links leading outside the folder",
    "FIFOs/sockets/devices",
)


@dataclass
class _Tally:
    """Counts for the summary line."""

    files: int = 0
    bad_files: int = 0
    bad_lines: int = 0
    passed_over: dict[str, list[str]] = field(default_factory=dict)  # reason -> entries


def load_documents(path: str, tokenizer) -> list[Example]:
    """All usable documents under `path` (a folder, searched recursively, or one file)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"{path}: no such file or folder; check the --data path")
    files, passed_over = find_files(root)
    tally = _Tally(passed_over=passed_over)
    for reason in (OUTSIDE, SPECIAL):
        if entries := passed_over[reason]:
            shown = ", ".join(entries[:3]) + (f" (+{len(entries) - 3} more)" * (len(entries) > 3))
            log.warning("%s: skipping %d %s: %s", path, len(entries), reason, shown)
    examples: list[Example] = []
    for f in files:
        source = f.name if f == root else f.relative_to(root).as_posix()
        examples.extend(_load_file(f, source, tokenizer, tally))
    _log_summary(path, examples, tally)
    if not examples:
        raise UserError(
            f"{path}: no usable .txt/.md/.jsonl documents found; point --data at a folder or "
            "file of UTF-8 text (.txt/.md) or .jsonl records with " + _SCHEMAS
        )
    return examples


def find_files(root: Path) -> tuple[list[Path], dict[str, list[str]]]:
    """(.txt/.md/.jsonl files under `root` sorted by relative path, entries passed over).

    Passed over, by reason: other extensions, links leading outside `root`, non-regular files
    (see the path rules in the module docstring). Hidden files and folders (.git, .DS_Store,
    ...) are skipped and not counted.
    """
    passed_over: dict[str, list[str]] = {OTHER: [], OUTSIDE: [], SPECIAL: []}
    if not root.is_dir():
        candidates, real_root = [root], None
    else:
        real_root = root.resolve()
        candidates = _walk(root, real_root, passed_over[OUTSIDE])
    files, seen = [], set()
    for p in candidates:
        name = p.name if p == root else p.relative_to(root).as_posix()
        real = p.resolve()
        if p.suffix.lower() not in (*TEXT_SUFFIXES, JSONL_SUFFIX):
            passed_over[OTHER].append(name)
        elif real_root is not None and not real.is_relative_to(real_root):
            passed_over[OUTSIDE].append(name)
        elif p.exists() and not stat.S_ISREG(p.stat().st_mode):
            passed_over[SPECIAL].append(name)
        elif real not in seen:  # a dangling link stays in: reading it reports "unreadable"
            seen.add(real)
            files.append(p)
    return files, passed_over


def _walk(root: Path, real_root: Path, outside: list[str]) -> list[Path]:
    """Non-hidden files under `root`, sorted; folder links are entered once, if inside."""
    candidates, seen = [], {real_root}
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(n for n in dirnames if not n.startswith(".")):
            real = (Path(folder) / d).resolve()
            if not real.is_relative_to(real_root):
                outside.append((Path(folder) / d).relative_to(root).as_posix() + "/")
            elif real not in seen:  # a link back into the tree: read once, never loop
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        candidates += [Path(folder) / n for n in filenames if not n.startswith(".")]
    return sorted(candidates, key=lambda p: p.relative_to(root).as_posix())


def read_text(path: Path) -> str:
    """The file's text; BadRecord if it is unreadable, binary, not UTF-8 or empty."""
    try:
        if (size := path.stat().st_size) > MAX_RECORD_BYTES:
            raise BadRecord(
                f"{size:,} bytes, above the {_mb(MAX_RECORD_BYTES)} limit for one document; "
                f"split it into files of at most {_mb(MAX_RECORD_BYTES)} (e.g. one per chapter)"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise BadRecord(f"unreadable ({e.strerror or e})") from None
    if b"\x00" in raw:
        raise BadRecord("binary file (contains NUL bytes)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadRecord(f"not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise BadRecord("empty")
    return text


def _load_file(path: Path, source: str, tokenizer, tally: _Tally) -> list[Example]:
    tally.files += 1
    try:
        if path.suffix.lower() == JSONL_SUFFIX:
            return _load_jsonl(path, source, tokenizer, tally)
        return [text_example(read_text(path), source, tokenizer)]
    except BadRecord as e:
        tally.bad_files += 1
        log.warning("skipping %s: %s", path, e)
        return []


def _load_jsonl(path: Path, source: str, tokenizer, tally: _Tally) -> list[Example]:
    """One Example per good line; bad lines are counted and reported in one warning."""
    examples, bad, too_big, n_lines = [], {}, [], 0
    for lineno, raw, size in _jsonl_lines(path):
        if raw is not None and not raw.strip():
            continue
        n_lines += 1
        if raw is None:
            too_big.append(f"line {lineno}: {size:,} bytes")
            bad.setdefault(f"over {_mb(MAX_RECORD_BYTES)}", []).append(lineno)
            continue
        try:
            record = json.loads(_decode_line(raw, lineno))
        except json.JSONDecodeError:
            bad.setdefault("invalid JSON", []).append(lineno)
            continue
        except BadRecord as e:
            bad.setdefault(str(e), []).append(lineno)
            continue
        try:
            examples.append(record_example(record, f"{source}:{lineno}", tokenizer))
        except BadRecord as e:
            bad.setdefault(str(e), []).append(lineno)
    if not n_lines:
        raise BadRecord("empty")
    if too_big:
        log.warning(
            "%s: %d records above the %s limit per record (%s); split each into records of "
            "at most %s (e.g. one per section)",
            path, len(too_big), _mb(MAX_RECORD_BYTES), ", ".join(too_big[:3]),
            _mb(MAX_RECORD_BYTES),
        )  # fmt: skip
    if bad:
        n_bad = sum(len(v) for v in bad.values())
        tally.bad_lines += n_bad
        reasons = "; ".join(f"{why}: {_lines(nums)}" for why, nums in bad.items())
        log.warning("%s: skipped %d of %d lines (%s)", path, n_bad, n_lines, reasons)
    return examples


def _jsonl_lines(path: Path):
    """(line number, raw bytes or None when above MAX_RECORD_BYTES, size in bytes) per line.

    A bounded readline: an oversized line is stepped over, never held whole. Lines end at
    "\\n" only (U+2028 and friends are data inside a JSON string).
    """
    try:
        with open(path, "rb") as f:
            for lineno in itertools.count(1):
                raw = f.readline(MAX_RECORD_BYTES + 1)
                if not raw:
                    return
                size = len(raw)
                if size > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(1 << 20)
                        size += len(raw)
                    yield lineno, None, size
                else:
                    yield lineno, raw, size
    except OSError as e:
        raise BadRecord(f"unreadable ({e.strerror or e})") from None


def _decode_line(raw: bytes, lineno: int) -> str:
    """A jsonl line's text; BadRecord if it holds NUL bytes or is not UTF-8."""
    if b"\x00" in raw:
        raise BadRecord("binary data (NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("not UTF-8") from None
    return text.removeprefix("\ufeff") if lineno == 1 else text


def _mb(n: int) -> str:
    """A limit in words: '1 MB', '4 KB' (offending sizes are given in exact bytes)."""
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n / 1024:g} KB"


def _lines(nums: list[int], show: int = 5) -> str:
    more = f" (+{len(nums) - show} more)" if len(nums) > show else ""
    return "line" + "s" * (len(nums) > 1) + " " + ", ".join(map(str, nums[:show])) + more


def record_example(record: object, source: str, tokenizer) -> Example:
    """A parsed jsonl record -> Example, by schema; BadRecord if it fits none."""
    if not isinstance(record, dict):
        raise BadRecord(f"not a JSON object (expected {_SCHEMAS})")
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise BadRecord("prompt and completion must be strings")
        return prompt_completion_example(prompt, completion, source, tokenizer)
    if "messages" in record:
        return chat_example(record["messages"], source, tokenizer)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise BadRecord("text must be a string")
        return text_example(record["text"], source, tokenizer)
    raise BadRecord(f"unknown schema (expected {_SCHEMAS})")


def text_example(text: str, source: str, tokenizer) -> Example:
    """Plain text: every token trainable (bar token 0), EOS appended if missing."""
    if not text.strip():
        raise BadRecord("empty")
    tokens = _encode(tokenizer, text, specials=True)
    eos = tokenizer.eos_token_id
    if eos is not None and tokens[-1] != eos:
        tokens.append(eos)
    return _example(tokens, [True] * len(tokens), source)


def prompt_completion_example(prompt: str, completion: str, source: str, tokenizer) -> Example:
    """Prompt not trainable, completion (+ end token) trainable; chat-rendered if possible."""
    if _has_chat_template(tokenizer):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return chat_example(turns, source, tokenizer)
    head = _encode(tokenizer, prompt, specials=True)
    tail = _encode(tokenizer, completion, specials=False)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    return _example(head + tail, [False] * len(head) + [True] * len(tail), source)


def chat_example(messages: object, source: str, tokenizer) -> Example:
    """Chat-template rendering; only assistant contents + their end-of-turn token trainable."""
    _check_messages(messages, tokenizer)
    full = render_chat(tokenizer, messages, generation_prompt=False)
    mask = [False] * len(full)
    end_ids = _end_ids(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(tokenizer, messages[:i], full, generation_prompt=True))
        stop = len(_prefix(tokenizer, messages[: i + 1], full, generation_prompt=False))
        # Cut what the template adds after the end-of-turn token (e.g. ChatML's "\n").
        ends = [j for j in range(start, stop) if full[j] in end_ids]
        stop = ends[-1] + 1 if ends else stop
        mask[start:stop] = [True] * (stop - start)
    return _example(full, mask, source)


def _check_messages(messages: object, tokenizer) -> None:
    ok = isinstance(messages, list) and messages
    if not ok or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise BadRecord("messages must be a non-empty list of {role, content} strings")
    if not _has_chat_template(tokenizer):
        raise BadRecord("messages need a tokenizer with a chat template")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn to train on")
    if messages[0]["role"] == "assistant":
        raise BadRecord("conversation starts with an assistant turn")


def _prefix(tokenizer, messages: list, full: list[int], generation_prompt: bool) -> list[int]:
    tokens = render_chat(tokenizer, messages, generation_prompt)
    if full[: len(tokens)] != tokens:
        raise BadRecord("chat template is not prefix-consistent for this conversation")
    return tokens


class _RenderTimeout(BaseException):
    """Raised by the alarm inside a template; a BaseException so no template code catches it."""


def render_chat(tokenizer, messages: list, generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, time-bounded.

    Templates are model-supplied code run in transformers' jinja sandbox: an error they
    raise (a sandbox SecurityError included) is a BadRecord; one that runs past
    RENDER_LIMIT_S (nested loops stay inside the sandbox's range limit, yet can run for hours)
    is a UserError, since every later render would hang the same way. Only the rendering is
    timed; the text is then tokenized as apply_chat_template(tokenize=True) does.
    """
    try:
        with _time_limit(RENDER_LIMIT_S):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
    except _RenderTimeout:
        raise UserError(
            f"the model's chat template did not finish within {RENDER_LIMIT_S} s (a loop in "
            "the template?); fix its chat_template, or use text / prompt-completion data "
            "with a model without one (generate: --raw)"
        ) from None
    except Exception as e:  # noqa: BLE001  (any error of model-supplied code)
        reason = (str(e).strip().splitlines() or [""])[0]
        raise BadRecord(f"chat template failed ({type(e).__name__}: {reason})") from None
    if not isinstance(text, str):
        raise BadRecord(f"chat template rendered a {type(text).__name__}, not text")
    return _encode(tokenizer, text, specials=False)


@contextmanager
def _time_limit(seconds: float):
    """Raise _RenderTimeout in this block after `seconds` (main thread with SIGALRM only;
    elsewhere the block runs unbounded, as signals cannot reach other threads)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _encode(tokenizer, text: str, specials: bool) -> list[int]:
    # verbose=False: the "longer than the model's maximum length" warning does not apply,
    # packing splits long documents into --max-seq-len rows.
    return list(tokenizer.encode(text, add_special_tokens=specials, verbose=False))


def _has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    return bool(flag) if flag is not None else getattr(tokenizer, "chat_template", None) is not None


def _end_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _example(tokens: list[int], mask: list[bool], source: str) -> Example:
    if not tokens:
        raise BadRecord("empty")
    mask = list(mask)
    mask[0] = False  # no context inside the document: never a target (see module docstring)
    if not any(mask):
        raise BadRecord("no trainable tokens")
    return Example(tokens=tokens, mask=mask, source=source)


def _log_summary(path: str, examples: list[Example], tally: _Tally) -> None:
    n_tokens = sum(len(e.tokens) for e in examples)
    n_train = sum(sum(e.mask) for e in examples)
    passed = [
        f"{len(v)} {reason}" for reason, v in tally.passed_over.items() if v or reason == OTHER
    ]
    msg = (
        f"{path}: {len(examples)} documents ({n_tokens} tokens, {n_train} trainable) from "
        f"{tally.files - tally.bad_files} of {tally.files} .txt/.md/.jsonl files; skipped "
        f"{tally.bad_files} bad files, {tally.bad_lines} bad jsonl lines, " + ", ".join(passed)
    )
    skipped = tally.bad_files or tally.bad_lines or any(tally.passed_over.values())
    log.log(logging.WARNING if skipped else logging.INFO, msg)
