"""Weight streaming: frozen weights live on disk, in memory only while used.

Our addition to paper technique 2: with segment checkpointing a block's quantized weights are
needed only while its segment runs (forward, then recompute + VJP in backward), so a model can
train in less memory than its own INT4 weights. `offload()` writes each block's frozen
parameters (quantized weight/scales/biases, biases, norms; never the trainable adapter) to
`block{i}-attn.safetensors` / `block{i}-mlp.safetensors` (the block's two residual halves,
blocks.HALVES) and leaves zero-size placeholders in the module: same keys, same module
structure, same trainable parameters. `resident(i)` loads them back for the duration of a
`with`; `resident(i, ("attn",))` loads one half only, for a half-block checkpoint segment
(the attention half of a Llama-3.2-3B block is 16 of its 63 MB).
The embedding and LM head (one matrix when tied) are a unit too, HEAD: needed only to embed
the inputs and in the loss segment. For a 3B model they are the largest single weight (128K x
3072 at INT4: 0.25 GB), so streaming them takes a quarter GB off every other moment of a step.

The caller must evaluate everything that uses block i before leaving `resident(i)`: a lazy
graph still referencing the weights keeps them alive (and is wrong to evaluate after eviction).
`serve()` does that for code that calls the model whole (mlx-lm's generation, for
`generate --stream-weights`): each block, and the embedding / head, reads its unit for its own
call and evaluates its output and KV cache before the unit goes.
Measured reads (Linux CPU box, random 4-bit weights with fp32 scales; warm = page cache,
cold = evicted with POSIX_FADV_DONTNEED): SmolLM2-135M block (2.7 MB) 2 ms warm / 12 ms cold;
Llama-3.2-3B-shaped block (63 MB) 21 ms warm / 74 ms cold (0.85 GB/s). That is far below one
block's compute at training lengths, so there is no background prefetch (yet), and streaming
is on by default with --engine segments (SmolLM2 + LoRA: 112 -> 19 MB resident before the
first step, i.e. the LoRA parameters alone).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from . import blocks
from .blocks import HALVES
from .errors import UserError
from .files import require_free_space
from .rowread import TensorRows
from .spill import private_folder, register_cleanup, unregister_cleanup

HEAD = "head"  # the unit holding the embedding and (untied) LM head
Key = tuple[int, str] | str  # a unit on disk: (block index, half) or HEAD


@dataclass
class StreamStats:
    """I/O counters for benchmarks."""

    bytes_written: int = 0
    bytes_read: int = 0
    read_s: float = 0.0


def frozen_parameters(layer: nn.Module) -> dict[str, mx.array]:
    """The block's parameters that training never changes (not the adapter's), by name."""
    trainable = {k for k, _ in tree_flatten(layer.trainable_parameters())}
    return {k: v for k, v in tree_flatten(layer.parameters()) if k not in trainable}


class WeightStream:
    """Frozen block weights on disk: `offload()` once, then `with resident(i):` per use."""

    def __init__(self, model: nn.Module, folder: str | None = None, near: str = "."):
        self.model = model
        self.folder = private_folder("edgelora-weights-", folder, near)
        self.stats = StreamStats()
        self._empty: dict[Key, dict] = {}  # (block, half) or HEAD -> placeholder tree
        self._closed = False
        self._rows: TensorRows | None = None  # the head unit's file, read by rows
        self._token = register_cleanup(self._remove)

    def __enter__(self) -> WeightStream:  # noqa: PYI034  (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _path(self, key: Key) -> Path:
        return self.folder / (
            f"{HEAD}.safetensors" if key == HEAD else "block{}-{}.safetensors".format(*key)
        )

    def _module(self, key: Key) -> nn.Module:
        """What a unit's parameter tree is relative to: its block, or the whole model."""
        return self.model if key == HEAD else blocks.layers(self.model)[key[0]]

    def _frozen(self, key: Key) -> dict[str, mx.array]:
        if key != HEAD:
            frozen = frozen_parameters(self._module(key))
            return {k: v for k, v in frozen.items() if blocks.half_of(self.model, k) == key[1]}
        params, prefixes = tree_flatten(self.model.parameters()), blocks.head_prefixes(self.model)
        return {k: v for k, v in params if k.startswith(prefixes)}

    def offload(self, head: bool = False) -> None:
        """Move every block's frozen weights (and, with `head`, the embedding and LM head) to
        disk; the model cannot run until they are resident."""
        units: list[Key] = [(i, h) for i in range(len(blocks.layers(self.model))) for h in HALVES]
        units = [k for k in units + ([HEAD] if head else []) if k not in self._empty]
        nbytes = sum(v.nbytes for i in units for v in self._frozen(i).values())
        try:
            require_free_space(
                self.folder,
                nbytes,
                "streamed weights",
                "use --spill-dir on a bigger disk or --no-stream-weights",
            )
        except UserError:
            self.close()  # nothing was moved yet: the model still holds every weight
            raise
        for i in units:  # (units already on disk are skipped: placeholders must not overwrite)
            frozen = self._frozen(i)
            try:
                mx.save_safetensors(str(self._path(i)), frozen)
            except (OSError, RuntimeError) as e:  # the disk filled up after the check
                self.restore()  # the units already moved come back; then the folder goes
                self.close()
                raise UserError(
                    f"{self.folder}: cannot write streamed weights ({str(e).splitlines()[0]}); "
                    "use --spill-dir on a bigger disk or --no-stream-weights"
                ) from None
            self.stats.bytes_written += sum(v.nbytes for v in frozen.values())
            # (0,)-shaped placeholders keep the keys and dtypes, and free the weights.
            self._empty[i] = tree_unflatten(
                [(k, mx.zeros((0,), dtype=v.dtype)) for k, v in frozen.items()]
            )
            self._module(i).update(self._empty[i])
            del frozen

    @property
    def streams_head(self) -> bool:
        return HEAD in self._empty

    @contextmanager
    def resident(self, i: int | str, halves: tuple[str, ...] = HALVES) -> Iterator[nn.Module]:
        """Block i (those halves of it) or HEAD (the model) with its frozen weights loaded;
        evicted on exit."""
        keys = [HEAD] if i == HEAD else [(i, h) for h in halves]
        if any(k not in self._empty for k in keys):
            raise KeyError(f"{'the head' if i == HEAD else f'block {i} {halves}'} is not offloaded")
        module = self._module(keys[0])
        for k in keys:
            module.update(self._load(k))
        try:
            yield module
        finally:
            for k in keys:
                module.update(self._empty[k])

    def head_reader(self):
        """`read(name, rows)` of the LM head's raw "weight" / "scales" / "biases" rows, from
        the head unit's file (blocks.head_weight_rows's `read`): a vocabulary tile, or the
        rows of some token ids, without the whole matrix in memory. None when the head is
        not streamed."""
        if not self.streams_head:
            return None
        prefix = self._prefix(blocks.head_module(self.model))
        rows = self._head_rows()
        return lambda name, sel: rows.read(prefix + name, sel)

    def embed(self, inputs: mx.array) -> mx.array:
        """blocks.embed(model, inputs), evaluated, with only the embedding rows of the
        inputs' token ids read from disk (the family's own embed runs on those rows)."""
        module = blocks.embedding_module(self.model)
        prefix, rows = self._prefix(module), self._head_rows()
        ids = np.asarray(inputs)
        uniq, inverse = np.unique(ids, return_inverse=True)
        names = [k for k in module if rows.tensors.get(prefix + k) is not None]
        module.update({k: rows.read(prefix + k, uniq) for k in names})
        try:
            h = blocks.embed(self.model, mx.array(inverse.reshape(ids.shape).astype(np.int32)))
            mx.eval(h)
        finally:
            self.model.update(self._empty[HEAD])
        return h

    def _head_rows(self) -> TensorRows:
        if self._rows is None:
            self._rows = TensorRows(self._path(HEAD))
        return self._rows

    def _prefix(self, module: nn.Module) -> str:
        """The module's parameter-name prefix in the model (and in the head unit's file)."""
        name = next(n for n, m in self.model.named_modules() if m is module)
        return f"{name}." if name else ""

    def restore(self) -> None:
        """Load every unit back for good (e.g. to generate after training), then forget."""
        for key in list(self._empty):
            self._module(key).update(self._load(key))
            del self._empty[key]

    def _load(self, key: Key) -> dict:
        """A unit's frozen weights read from disk and evaluated, as a parameter tree."""
        t0 = time.perf_counter()
        weights = mx.load(str(self._path(key)))  # lazy: the read happens in mx.eval
        mx.eval(list(weights.values()))
        self.stats.read_s += time.perf_counter() - t0
        self.stats.bytes_read += sum(v.nbytes for v in weights.values())
        return tree_unflatten(list(weights.items()))

    def close(self) -> None:
        """Remove the folder (offloaded blocks are then lost: `restore()` first if needed)."""
        if self._closed:
            return
        self._closed = True
        if self._rows is not None:
            self._rows.close()
            self._rows = None
        self._remove()  # then forgotten: a Ctrl-C during the removal leaves it to atexit
        unregister_cleanup(self._token)

    def _remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def serve(self) -> None:
        """Make the model's own forward (mlx-lm's, as in generation) load each unit for the
        call that uses it: each block for its call, HEAD for the embedding lookup and the LM
        head. Everything a call computes (its output, the KV cache it extends) is evaluated
        before its weights are evicted, so one unit's weights are resident at a time."""
        for i, layer in enumerate(blocks.layers(self.model)):
            _serve_from(layer, self, i, ("__call__",))
        if self.streams_head:
            for module in _head_modules(self.model):
                _serve_from(module, self, HEAD, ("__call__", "as_linear"))


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """The embedding and (untied) LM-head modules: the modules under blocks.head_prefixes."""
    prefixes = blocks.head_prefixes(model)
    return [m for name, m in model.named_modules() if f"{name}." in prefixes]


def _serve_from(module: nn.Module, stream: WeightStream, key: int | str, names: tuple) -> None:
    """Give this one instance (not its class) methods that run with `key` resident."""
    from mlx_lm.models.cache import _BaseCache

    base = type(module)

    def wrap(name: str):
        inner = getattr(base, name)

        def method(self, *args, **kwargs):
            with stream.resident(key):
                out = inner(self, *args, **kwargs)
                caches = [a.state for a in (*args, *kwargs.values()) if isinstance(a, _BaseCache)]
                mx.eval(out, caches)
            return out

        return method

    methods = {n: wrap(n) for n in names if hasattr(base, n)}
    module.__class__ = type(f"Served{base.__name__}", (base,), methods)
