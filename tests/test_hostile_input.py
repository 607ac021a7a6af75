"""Hostile input: malformed files, odd folders, hung hosts and hostile templates.

Each case reproduces a probe of issue 15 (no input crashes the process, every failure is one
clear line). Cases that could kill or hang the interpreter run in a subprocess, so a native
crash shows up as a negative return code and a hang as a timeout instead of taking the test
run down.
"""

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

# isort: off
import mlx_edgelora  # noqa: F401  (must precede mlx: it preloads OpenBLAS)

# isort: on
import gguf
import numpy as np
import pytest

from mlx_edgelora.errors import UserError
from mlx_edgelora.gguf_header import GGML_TYPES, read_header

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    return {k: v for k, v in env.items() if v is not None}


# --- GGUF header (item 7, and item 10's type 99 / zero dimension) -------------------------


def _write_valid_gguf(path: Path) -> None:
    """A small GGUF with F32, F16 and Q8_0 tensors and scalar, string and array metadata."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_custom_alignment(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "a", "b", "ab"])
    w.add_array("test.ints", [1, 2, 3])
    w.add_chat_template("{{ messages }}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float16))
    q8 = gguf.quants.quantize(
        rng.standard_normal((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _layout(path: Path) -> dict:
    """Byte positions of the fields the mutations aim at, found by the `gguf` package's own
    reader so that they do not depend on the parser under test."""
    reader = gguf.GGUFReader(str(path))
    tensors = []
    for t in reader.tensors:  # u64 name length, name, u32 n_dims, u64 dims, u32 type, u64 offset
        n_dims = t.field.offset + 8 + len(t.name.encode())
        type_pos = n_dims + 4 + 8 * len(t.shape)
        tensors.append(
            {"start": t.field.offset, "n_dims": n_dims, "dims": n_dims + 4, "type": type_pos}
        )
        tensors[-1]["offset"] = type_pos + 4
    fields = {  # key -> position of its u32 value type
        key: f.offset + 8 + len(key.encode())
        for key, f in reader.fields.items()
        if not key.startswith("GGUF.")
    }
    return {"tensors": tensors, "fields": fields, "data": reader.tensors[0].data_offset}


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    _write_valid_gguf(path)
    return path, _layout(path)


def _put(data: bytes, pos: int, fmt: str, value) -> bytes:
    raw = struct.pack(fmt if fmt[0] in "<>" else "<" + fmt, value)
    return data[:pos] + raw + data[pos + len(raw) :]


def _named_mutants(data: bytes, lay: dict) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a phrase the validator's message must contain)."""
    t0, t1 = lay["tensors"][0], lay["tensors"][2]
    tokens = lay["fields"]["tokenizer.ggml.tokens"]
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(lay["data"] - t0["start"]))
    return {
        "n_dims=200": (_put(data, t0["n_dims"], "I", 200), "has 200 dims"),
        "n_dims=0": (_put(data, t0["n_dims"], "I", 0), "has 0 dims"),
        "newline in a name": (  # the message still has one line
            _put(_put(data, t0["start"] + 8, "B", 10), t0["n_dims"], "I", 200),
            "tensor '\\noken_embd.weight' has 200 dims",
        ),
        "name length 2^40": (_put(data, t0["start"], "Q", 2**40), "needs 1099511627776 bytes"),
        "type 99": (_put(data, t1["type"], "I", 99), "unknown type 99"),
        "zero dimension": (_put(data, t1["dims"] + 8, "Q", 0), "zero dimension"),
        "huge dimension": (_put(data, t1["dims"] + 8, "Q", 2**62), "runs past the end"),
        "offset past EOF": (_put(data, t1["offset"], "Q", 64 * 2**20), "runs past the end"),
        "offset unaligned": (_put(data, t1["offset"], "Q", 65), "not a multiple of 64"),
        "tensor count 2^60": (_put(data, 8, "Q", 2**60), "tensor count"),
        "metadata count 2^60": (_put(data, 16, "Q", 2**60), "metadata count"),
        "metadata type 99": (_put(data, tokens, "I", 99), "unknown value type 99"),
        "string array of 2^62": (_put(data, tokens + 8, "Q", 2**62), "does not fit"),
        "nested array": (_put(data, tokens + 4, "I", 9), "element type 9"),
        "alignment 48": (
            _put(data, lay["fields"]["general.alignment"] + 4, "I", 48),
            "power of two",
        ),
        "bad magic": (b"GGUX" + data[4:], "does not start with 'GGUF'"),
        "version 1": (_put(data, 4, "I", 1), "version 1"),
        "big-endian": (_put(data, 4, ">I", 3), "big-endian"),
        "cut in tensor info": (data[: t1["start"] + 5], "left in the file"),
        "cut in tensor data": (data[:-100], "runs past the end"),  # > the 64-byte padding
        "random tensor info": (data[: t0["start"]] + noise + data[lay["data"] :], ""),
        "empty": (b"", "shorter than a GGUF header"),
    }


def _seeded_mutants(data: bytes, lay: dict, n: int = 40) -> list[bytes]:
    """Random damage to the header and tensor-info area (bytes before the tensor data)."""
    out = []
    for seed in range(n):
        rng = random.Random(seed)
        pos = rng.randrange(lay["data"])
        kind = seed % 5
        if kind == 0:  # one random byte
            out.append(data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :])
        elif kind == 1:  # a huge u64 (a length, count, dim or offset)
            out.append(_put(data, min(pos, len(data) - 8), "Q", rng.randrange(2**32, 2**64)))
        elif kind == 2:  # a small u32 (a type, n_dims or a low length word)
            out.append(_put(data, min(pos, len(data) - 4), "I", rng.randrange(300)))
        elif kind == 3:  # a run of random bytes
            run = bytes(rng.randrange(256) for _ in range(16))
            out.append(data[:pos] + run + data[pos + 16 :])
        else:  # truncated inside the header
            out.append(data[:pos])
    return out


_LOAD_EACH = textwrap.dedent(
    """
    import sys
    import mlx_edgelora
    from mlx_edgelora.errors import UserError
    from mlx_edgelora.gguf import load_gguf

    for path in sys.argv[1:]:
        try:
            load_gguf(path)
            outcome = "ok"
        except UserError as e:
            outcome = "user-error " + str(e)
        except Exception as e:
            outcome = f"EXCEPTION {type(e).__name__}: {e}"
        print(path, "\\t", outcome.replace("\\n", "<NEWLINE>"), flush=True)
    """
)


def test_ggml_type_table_matches_the_gguf_package():
    sizes = {int(t): v for t, v in gguf.constants.GGML_QUANT_SIZES.items()}
    names = {int(t): t.name for t in gguf.GGMLQuantizationType}
    assert {i: (n, b, s) for i, (n, b, s) in GGML_TYPES.items()} == {
        i: (names[i], *sizes[i]) for i in sizes
    }


def test_valid_gguf_header_agrees_with_the_gguf_package(valid_gguf):
    path, _ = valid_gguf
    header = read_header(str(path))
    reader = gguf.GGUFReader(str(path))
    ours = [
        (t.name, t.type_id, t.dims, header.data_offset + t.offset, t.nbytes) for t in header.tensors
    ]
    theirs = [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), t.data_offset, t.n_bytes)
        for t in reader.tensors
    ]
    assert ours == theirs
    assert header.metadata["general.alignment"] == 64
    assert header.metadata["tokenizer.ggml.tokens"] == 4  # arrays: their length


def test_named_gguf_faults_are_one_line_user_errors(valid_gguf, tmp_path):
    path, lay = valid_gguf
    for name, (data, phrase) in _named_mutants(path.read_bytes(), lay).items():
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(data)
        with pytest.raises(UserError) as e:
            read_header(str(bad))
            pytest.fail(f"{name}: accepted")
        msg = str(e.value)
        assert phrase in msg and str(bad) in msg and "\n" not in msg, (name, msg)


@pytest.mark.parametrize("case", ["type 99", "zero dimension", "n_dims=200"])
def test_load_model_on_a_bad_tensor_record_is_one_line(valid_gguf, tmp_path, case):
    """Through the public loader too (safe in-process: the header check runs before MLX)."""
    from mlx_edgelora.loading import load_model

    path, lay = valid_gguf
    data, phrase = _named_mutants(path.read_bytes(), lay)[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(UserError, match=phrase) as e:
        load_model(str(bad))
    assert "\n" not in str(e.value)


def test_fuzzed_gguf_never_crashes_the_process(valid_gguf, tmp_path):
    """Named and seeded mutants all loaded in one subprocess: a SIGSEGV fails the test."""
    path, lay = valid_gguf
    data = path.read_bytes()
    mutants = [d for d, _ in _named_mutants(data, lay).values()] + _seeded_mutants(data, lay)
    paths = []
    for i, d in enumerate(mutants):
        paths.append(tmp_path / f"m{i:03d}.gguf")
        paths[-1].write_bytes(d)
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_EACH, str(path), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert run.returncode == 0, f"killed by signal {-run.returncode}: {run.stderr[-2000:]}"
    outcomes = [line.split("\t", 1)[1].strip() for line in run.stdout.splitlines()]
    assert len(outcomes) == len(paths) + 1
    assert outcomes[0].startswith("user-error") and "lacks" in outcomes[0]  # read, then judged
    assert all(o.startswith(("ok", "user-error")) for o in outcomes), outcomes
    assert not any("<NEWLINE>" in o for o in outcomes), outcomes


# --- model folders that ship their own code (item 12) -------------------------------------

_EVIL = "open({marker!r}, 'w').write('ran')\nclass EvilTokenizer: pass\nclass EvilConfig: pass\n"


def _plant_code(folder: Path) -> Path:
    marker = folder.parent / "code-ran"
    (folder / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    return marker


def test_tokenizer_auto_map_is_refused_and_nothing_runs(tmp_path):
    from conftest import write_tiny_model_dir

    from mlx_edgelora.loading import load_model

    folder = write_tiny_model_dir(tmp_path / "model")
    marker = _plant_code(folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(UserError, match="auto_map.*never runs") as e:
        load_model(str(folder))
    assert "\n" not in str(e.value) and not marker.exists()


def test_config_auto_map_loads_builtin_classes_and_runs_nothing(tmp_path):
    """config.json's auto_map is ignored (trust_remote_code=False): the built-in Llama
    classes load and the folder's Python never runs."""
    from conftest import write_tiny_model_dir

    from mlx_edgelora.loading import load_model

    folder = write_tiny_model_dir(tmp_path / "model")
    marker = _plant_code(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("tokenizer_class", None)  # so that transformers consults config.json
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    loaded = load_model(str(folder))
    assert loaded.tokenizer.encode("hi") and not marker.exists()


# --- hangs (item 11) -----------------------------------------------------------------------


@pytest.fixture
def silent_host():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


def test_model_host_that_never_answers_is_a_one_line_timeout(silent_host, tmp_path):
    env = _env(
        HF_ENDPOINT=silent_host,
        HF_HUB_DOWNLOAD_TIMEOUT="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE=None,  # this test only: the "network" is the local silent host
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_edgelora.generate",
            "--model",
            "someone/model",
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().count("\n") == 0
    assert f"{silent_host} did not answer within 1 s" in run.stderr


# --- hostile chat templates (items 10 and 11) ---------------------------------------------

_BLOCKED = "{{ ''.__class__.__mro__ }}"  # the jinja sandbox refuses underscore attributes
_ENDLESS = (  # each range is inside the sandbox's limit; together 10^10 iterations
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
)


def _templated_tokenizer(tmp_path: Path, template: str):
    from conftest import make_tiny_tokenizer
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    fast = make_tiny_tokenizer(tmp_path / "tok")
    fast.chat_template = template
    return TokenizerWrapper(fast)


def _loaded(tokenizer):
    from types import SimpleNamespace

    from conftest import build_tiny_model

    return SimpleNamespace(model=build_tiny_model()[0], tokenizer=tokenizer, source="tiny-model")


def test_generate_with_a_sandbox_blocked_template_is_one_line(tmp_path):
    from mlx_edgelora.generate import generate

    loaded = _loaded(_templated_tokenizer(tmp_path, _BLOCKED))
    with pytest.raises(UserError, match=r"tiny-model: chat template failed \(SecurityError") as e:
        generate(loaded, "hi", max_tokens=2)
    assert "--raw" in str(e.value) and "\n" not in str(e.value)
    assert generate(loaded, "hi", max_tokens=2, chat=False) is not None  # --raw still works


def test_endless_template_is_stopped_in_generate_and_in_data(tmp_path, monkeypatch):
    from mlx_edgelora import data
    from mlx_edgelora.generate import generate

    monkeypatch.setattr(data, "RENDER_LIMIT_S", 0.5)
    tokenizer = _templated_tokenizer(tmp_path, _ENDLESS)
    with pytest.raises(UserError, match="did not finish within 0.5 s"):
        generate(_loaded(tokenizer), "hi", max_tokens=2)
    chats = tmp_path / "chats.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chats.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(UserError, match="did not finish within 0.5 s"):
        data.load_documents(str(chats), tokenizer)


# --- data paths: symlinks, FIFOs (items 11 and 13) ----------------------------------------


def _data_tree(tmp_path: Path) -> Path:
    """A --data folder with links inside and outside it, a link loop and a FIFO."""
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (root / "notes").mkdir(parents=True)
    (root / ".archive").mkdir()
    elsewhere.mkdir()
    (root / "notes" / "a.md").write_text("alpha notes")
    (root / ".archive" / "old.md").write_text("archived notes")
    (elsewhere / "secret.txt").write_text("not yours to train on")
    (root / "notes" / "again.md").symlink_to(root / "notes" / "a.md")  # same file: read once
    (root / "archived.md").symlink_to(root / ".archive" / "old.md")  # inside: followed
    (root / "archive").symlink_to(root / ".archive")  # folder inside: entered
    (root / "loop").symlink_to(root)  # a link back to the top: never loops
    (root / "stolen.txt").symlink_to(elsewhere / "secret.txt")  # file outside: skipped
    (root / "outside").symlink_to(elsewhere)  # folder outside: skipped
    os.mkfifo(root / "pipe.jsonl")  # opening it would wait for a writer forever
    return root


def test_data_links_follow_inside_skip_outside_and_fifos(tmp_path, tiny_tokenizer, caplog):
    import logging

    from mlx_edgelora.data import OUTSIDE, SPECIAL, find_files, load_documents

    root = _data_tree(tmp_path)
    files, passed_over = find_files(root)  # never opens a file: a FIFO here cannot hang
    assert [f.relative_to(root).as_posix() for f in files] == [
        "archive/old.md",
        "notes/a.md",
    ]
    assert passed_over[OUTSIDE] == ["outside/", "stolen.txt"]
    assert passed_over[SPECIAL] == ["pipe.jsonl"]
    with caplog.at_level(logging.INFO, logger="mlx_edgelora.data"):
        docs = load_documents(str(root), tiny_tokenizer)
    assert sorted(d.source for d in docs) == ["archive/old.md", "notes/a.md"]
    summary = caplog.records[-1].getMessage()
    assert "2 links leading outside the folder" in summary and "1 FIFOs" in summary
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "stolen.txt" in warned and "pipe.jsonl" in warned


def test_data_fifo_given_directly_is_not_opened(tmp_path, tiny_tokenizer):
    os.mkfifo(tmp_path / "pipe.txt")
    from mlx_edgelora.data import load_documents

    with pytest.raises(UserError, match="no usable"):
        load_documents(str(tmp_path / "pipe.txt"), tiny_tokenizer)


# --- data outside the memory plan (item 9) ------------------------------------------------


def test_oversized_records_are_skipped_with_their_size(
    tmp_path, tiny_tokenizer, caplog, monkeypatch
):
    import logging

    from mlx_edgelora import data

    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 4096)
    root = tmp_path / "data"
    root.mkdir()
    (root / "book.txt").write_text("word " * 2000)  # 10 000 bytes
    (root / "ok.txt").write_text("short note")
    huge = json.dumps({"text": "x" * 3 * 2**20})  # 3 MB: stepped over, never read whole
    lines = [json.dumps({"text": "fine"}), huge, json.dumps({"text": "fine too"})]
    (root / "r.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="mlx_edgelora.data"):
        docs = data.load_documents(str(root), tiny_tokenizer)
    assert [d.source for d in docs] == ["ok.txt", "r.jsonl:1", "r.jsonl:3"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (book,) = [w for w in warnings if "book.txt" in w]
    assert "10,000 bytes, above the 4 KB limit" in book and "split it into files" in book
    (record,) = [w for w in warnings if "limit per record" in w]
    assert (
        "r.jsonl" in record
        and f"line 2: {len(huge) + 1:,} bytes" in record
        and "split each" in record
    )


def test_jsonl_lines_bounded_reader_steps_over_a_long_line(tmp_path, monkeypatch):
    from mlx_edgelora import data

    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 10)
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"0123456789\n" + b"y" * 25 + b"\nshort\n" + b"z" * 11)
    got = [(n, raw, size) for n, raw, size in data._jsonl_lines(f)]
    assert got == [(1, b"0123456789\n", 11), (2, None, 26), (3, b"short\n", 6), (4, None, 11)]


def test_memory_plan_counts_the_token_store(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_model

    from mlx_edgelora import TrainConfig, plan
    from mlx_edgelora.dataset import load_dataset

    (tmp_path / "a.txt").write_text("some notes " * 200)
    cfg = TrainConfig(max_seq_len=32, val_fraction=0.0)
    data = load_dataset(str(tmp_path), tiny_tokenizer, cfg)
    n_rows = len(data.train_rows)
    assert data.token_bytes() == n_rows * 33 * (4 + 1)  # int32 tokens + bool mask per row
    model, _ = build_tiny_model()
    without = plan.estimate(model, cfg)
    with_store = plan.estimate(model, cfg, token_bytes=data.token_bytes())
    assert with_store.parts["token store"] == pytest.approx(data.token_bytes() / plan.GB)
    assert with_store.total_gb == pytest.approx(without.total_gb + data.token_bytes() / plan.GB)


# --- fuse says where its base comes from (item 13) ----------------------------------------


def test_fuse_says_where_the_base_comes_from_before_loading(tmp_path, capsys):
    from conftest import write_tiny_model_dir

    from mlx_edgelora import TrainConfig
    from mlx_edgelora.fuse import main
    from mlx_edgelora.loading import load_model
    from mlx_edgelora.lora import apply_lora, save_adapters

    loaded = load_model(str(write_tiny_model_dir(tmp_path / "base")))
    adapter = tmp_path / "adapter"
    save_adapters(loaded.model, adapter, apply_lora(loaded.model, TrainConfig(rank=4)))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["edgelora"] = {**config.get("edgelora", {}), "model": "someone/hub-model"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "out")]) == 2  # offline
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fuse: base model: Hugging Face repo someone/hub-model, downloaded")
    assert err[1].startswith("error: --model someone/hub-model")
