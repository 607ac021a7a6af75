"""generate.py: streaming, sampling flags and the --chat loop (stdin piped)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_model_dir
from mlx_lm import generate as mlx_generate
from mlx_lm.sample_utils import make_sampler

from mlx_edgelora.generate import chat_loop, generate, main, stream
from mlx_edgelora.loading import load_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(write_tiny_model_dir(tmp_path_factory.mktemp("g") / "tiny", "qwen2")))


def test_streamed_pieces_join_to_mlx_lms_generate(loaded):
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True
    )
    want = mlx_generate(loaded.model, loaded.tokenizer, ids, max_tokens=6, sampler=make_sampler(0))
    pieces = list(stream(loaded, "hello", max_tokens=6))
    assert len(pieces) > 1 and "".join(pieces) == want == generate(loaded, "hello", 6)


def test_top_p_and_temp_reach_the_sampler(loaded):
    a = generate(loaded, "hi", 8, temp=1.0, seed=3, top_p=0.9)
    assert a == generate(loaded, "hi", 8, temp=1.0, seed=3, top_p=0.9)  # seeded
    greedy = generate(loaded, "hi", 8)
    samples = {generate(loaded, "hi", 8, temp=5.0, seed=s) for s in range(4)}
    assert samples != {greedy}  # hot sampling differs from greedy on a random model
    # a tiny nucleus keeps only the most likely token: sampling becomes greedy
    assert generate(loaded, "hi", 8, temp=5.0, seed=1, top_p=1e-6) == greedy


def test_chat_loop_keeps_history(loaded):
    out = io.StringIO()
    turns = chat_loop(loaded, io.StringIO("hello\n\nagain\n/exit\nignored\n"), out, max_tokens=5)
    assert turns == 2
    first = generate(loaded, "hello", 5)
    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "again"},
    ]
    second = "".join(stream(loaded, history, max_tokens=5))
    assert out.getvalue() == f">>> {first}\n>>> >>> {second}\n>>> \n"


def test_chat_reset_forgets_the_history(loaded):
    out = io.StringIO()
    chat_loop(loaded, io.StringIO("hello\n/reset\nagain\n"), out, max_tokens=5)  # EOF ends it
    fresh = generate(loaded, "again", 5)
    assert out.getvalue().endswith(f">>> {fresh}\n>>> \n")


def test_cli_chat_with_piped_stdin(tmp_path):
    model = write_tiny_model_dir(tmp_path / "tiny", "llama")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "mlx_edgelora.generate", "--model", str(model), "--chat"]
    run = subprocess.run(
        cmd + ["--max-tokens", "4"], input="hi\n", text=True, capture_output=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(">>> ") and run.stdout.count(">>> ") == 2


def test_prompt_or_chat_is_required(capsys):
    assert main([]) == 2
    assert "either --prompt TEXT or --chat" in capsys.readouterr().err
    assert main(["--prompt", "x", "--top-p", "0"]) == 2


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_stream_weights_generates_the_same_tokens_holding_one_block(tmp_path, arch):
    """--stream-weights: each block (and the embedding / head) is read from its file for the
    call that uses it, the KV cache stays resident: the same logits and greedy tokens as the
    resident model, with a peak far under the model's bytes (16 blocks, LoRA on)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from test_fuse import make_adapter

    from mlx_edgelora import quant
    from mlx_edgelora.generate import load_for_generation

    shape = dict(num_hidden_layers=16, hidden_size=256, intermediate_size=1024)
    # float: a quantized block computes through its float copy on CPU (quant.py), so with
    # 4-bit weights one block's compute is the size of a few quantized blocks
    model_dir = write_tiny_model_dir(tmp_path / "m", arch, **shape)
    adapter = str(make_adapter(model_dir, tmp_path / "adapter"))
    tokens = mx.array([[1, 72, 101, 108, 108, 111]])
    ref = load_for_generation(str(model_dir), adapter)
    quant.prepare_for_training(ref.model)
    want_logits = ref.model(tokens)
    want = generate(ref, "bees", max_tokens=8, chat=False)
    total = sum(v.nbytes for _, v in tree_flatten(ref.model.parameters()))
    del ref
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    served = load_for_generation(str(model_dir), adapter, stream_weights=True)
    got = generate(served, "bees", max_tokens=8, chat=False)
    got_logits = served.model(tokens)
    peak = mx.get_peak_memory() - base
    assert got == want
    assert mx.array_equal(got_logits, want_logits).item()
    assert peak < total / 3, (peak, total)
