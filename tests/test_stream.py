"""WeightStream: offloaded blocks free memory and, once resident, compute exactly as before."""

from contextlib import ExitStack

import mlx.core as mx
import pytest
from conftest import build_tiny_model
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_edgelora.stream import HEAD, WeightStream, frozen_parameters


def _lora_model(arch: str) -> nn.Module:
    """Tiny 4-bit model with LoRA on every block; lora_b random so LoRA changes outputs."""
    model, _ = build_tiny_model(arch, quantize_bits=4, hidden_size=256, intermediate_size=512)
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
            proj.lora_b = 0.1 * mx.random.normal(proj.lora_b.shape)
    mx.eval(model.parameters())
    return model


def _loss(model: nn.Module, tokens: mx.array) -> mx.array:
    return model(tokens).astype(mx.float32).square().mean()


def test_offload_frees_memory_and_resident_restores_exact_outputs(arch, tmp_path):
    model = _lora_model(arch)
    tokens = mx.array([[3, 17, 42, 99, 7, 250, 1, 64]])
    h = model.model.embed_tokens(tokens)
    ref_blocks = [layer(h, mask="causal") for layer in model.model.layers]
    ref_loss, ref_grads = nn.value_and_grad(model, _loss)(model, tokens)
    mx.eval(ref_blocks, ref_loss, ref_grads)
    keys = [k for k, _ in tree_flatten(model.parameters())]
    lora = dict(tree_flatten(model.trainable_parameters()))
    frozen_bytes = sum(
        v.nbytes for layer in model.model.layers for v in frozen_parameters(layer).values()
    )
    assert not any(
        k.endswith(("lora_a", "lora_b")) for k in frozen_parameters(model.model.layers[0])
    )

    with WeightStream(model, near=str(tmp_path / "out")) as stream:
        before = mx.get_active_memory()
        stream.offload()
        assert before - mx.get_active_memory() >= 0.9 * frozen_bytes
        assert [k for k, _ in tree_flatten(model.parameters())] == keys  # structure unchanged
        assert all(v.size == 0 for v in frozen_parameters(model.model.layers[1]).values())
        for i in range(len(model.model.layers)):
            with stream.resident(i) as resident:
                out = resident(h, mask="causal")
                mx.eval(out)
            assert mx.array_equal(out, ref_blocks[i]).item()
        for k, v in tree_flatten(model.trainable_parameters()):
            assert v is lora[k]  # offload/resident never touch LoRA parameters
        with ExitStack() as stack:  # whole model, gradients through resident weights
            for i in range(len(model.model.layers)):
                stack.enter_context(stream.resident(i))
            loss, grads = nn.value_and_grad(model, _loss)(model, tokens)
            mx.eval(loss, grads)
        assert loss.item() == ref_loss.item()
        for (k, g), (_, rg) in zip(tree_flatten(grads), tree_flatten(ref_grads)):
            assert mx.array_equal(g, rg).item(), k
        assert stream.stats.bytes_read == 2 * frozen_bytes


def test_restore_and_close_remove_folder(tmp_path):
    model = _lora_model("llama")
    tokens = mx.array([[5, 6, 7]])
    ref = model(tokens)
    mx.eval(ref)
    stream = WeightStream(model, folder=str(tmp_path / "spill"))
    assert stream.folder.parent == tmp_path / "spill"
    stream.offload()
    stream.offload()  # a second call must not overwrite the files with placeholders
    assert min(p.name for p in stream.folder.iterdir()) == "block0-attn.safetensors"
    with pytest.raises(KeyError):
        stream.resident(9).__enter__()
    stream.restore()  # the model runs on its own again
    assert mx.array_equal(model(tokens), ref).item()
    stream.close()
    stream.close()  # idempotent
    assert not stream.folder.exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_head_unit_streams_the_embedding_and_lm_head(arch, tmp_path):
    model = _lora_model(arch)
    tokens = mx.array([[5, 6, 7, 299]])
    ref = model(tokens)
    mx.eval(ref)
    head_keys = [
        k for k, _ in tree_flatten(model.parameters()) if k.startswith(("model.embed", "lm_head"))
    ]
    with WeightStream(model, folder=str(tmp_path)) as stream:
        stream.offload(head=True)
        assert stream.streams_head and (stream.folder / f"{HEAD}.safetensors").is_file()
        params = dict(tree_flatten(model.parameters()))
        assert head_keys and all(params[k].size == 0 for k in head_keys)
        with ExitStack() as stack:
            for i in [HEAD, *range(len(model.model.layers))]:
                stack.enter_context(stream.resident(i))
            assert mx.array_equal(model(tokens), ref).item()
        assert dict(tree_flatten(model.parameters()))[head_keys[0]].size == 0  # evicted again
        stream.restore()
        assert mx.array_equal(model(tokens), ref).item()


def test_a_full_disk_is_refused_before_any_weight_moves(tmp_path, monkeypatch):
    import shutil

    from mlx_edgelora import spill
    from mlx_edgelora.errors import UserError

    model = _lora_model("llama")
    before = tree_flatten(model.parameters())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(spill.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    stream = WeightStream(model, near=str(tmp_path / "out"))
    with pytest.raises(UserError, match="streamed weights.*--no-stream-weights"):
        stream.offload(head=True)
    after = tree_flatten(model.parameters())
    assert all(k == j and v is w for (k, v), (j, w) in zip(before, after))
    assert not stream.folder.exists()


def test_one_half_of_a_block_is_resident_alone(tmp_path):
    """A half-block segment loads only its half: the other half's weights stay on disk."""
    model = _lora_model("qwen2")  # q/k/v biases: the attention half has more than matrices
    layer = model.model.layers[1]
    x = mx.random.normal((1, 5, 256))
    ref = layer(x, mask="causal")
    mx.eval(ref)
    with WeightStream(model, folder=str(tmp_path)) as stream:
        stream.offload()

        def sizes(prefix: str) -> set[int]:
            return {v.size for k, v in frozen_parameters(layer).items() if k.startswith(prefix)}

        for half, (loaded, evicted) in {
            "attn": ("self_attn", "mlp"),
            "mlp": ("mlp", "self_attn"),
        }.items():
            with stream.resident(1, (half,)):
                assert 0 not in sizes(loaded) and sizes(evicted) == {0}
            assert sizes(loaded) == {0}
        with stream.resident(1, ("attn",)), stream.resident(1, ("mlp",)):
            out = layer(x, mask="causal")
            mx.eval(out)
        assert mx.array_equal(out, ref).item()


@pytest.mark.parametrize(
    "quantize, dtype, source",
    [(None, "float32", "folder"), (4, "float32", "folder"), (4, "bfloat16", "folder")]
    + [(None, "float32", "hub")],
)
def test_lazy_load_then_offload_never_holds_the_whole_model(
    tmp_path, monkeypatch, quantize, dtype, source
):
    """load_model(lazy=True) reads nothing; offload evaluates and writes one unit at a time
    (with --quantize, quantizing as it goes, also from a bf16 folder), so the peak is about
    one block, not the model; the eager load of the same folder holds all of it (the measure
    can tell them apart). A hub download is a folder in the hub cache: the same path (the
    download is replaced by a local folder here: no network in tests)."""
    import json

    import huggingface_hub
    from conftest import make_tiny_tokenizer

    from mlx_edgelora.loading import load_model

    shape = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=1024)
    model, cfg = build_tiny_model("llama", **shape)
    folder = tmp_path / "m"
    folder.mkdir()
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    del weights
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(folder))
    name = "someone/tiny-llama" if source == "hub" else str(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    make_tiny_tokenizer(folder)
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    block = sum(v.nbytes for _, v in tree_flatten(model.model.layers[0].parameters()))
    del model
    peaks = {}
    for lazy in (True, False):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loaded = load_model(name, quantize, lazy=lazy)
        if lazy:
            assert mx.get_active_memory() - base < block / 4  # nothing read yet
        stream = WeightStream(loaded.model, str(tmp_path))
        stream.offload(head=True)
        peaks[lazy] = mx.get_peak_memory() - base
        with stream.resident(0):  # the first block, as the eager load had it
            got = dict(tree_flatten(loaded.model.model.layers[0].parameters()))
            peaks[(lazy, "block0")] = got
        stream.close()
        del loaded
    # eager: every float weight (or, quantized, the whole INT4 model plus the float weights
    # of the blocks being quantized) at once
    assert peaks[False] > (0.9 if quantize is None else 0.3) * total
    assert peaks[True] < 2 * block
    for k, v in peaks[(True, "block0")].items():
        assert mx.array_equal(v, peaks[(False, "block0")][k]), k
