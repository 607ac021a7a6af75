"""One training step: segment-wise forward, per-segment VJP backward (paper technique 2).

`make_step(model, cfg, loss_head)` returns a step: `step(batch) -> (loss_sum, n_tokens,
grads)`, grads shaped like `model.trainable_parameters()` and evaluated. A step's `grad_hook`,
if set, is called as `grad_hook(segment, grads) -> grads` with each segment's LoRA gradients
(a tree) as soon as its backward ends, and its result is kept instead: the data-parallel
all-reduce (distributed.py) plugs in here, so it overlaps the next segment's recompute. The
graph engine has one segment, the whole model.

- engine "graph": the reference, `nn.value_and_grad` over embed -> blocks -> loss head; MLX
  keeps every activation of the whole model until the backward pass.
- engine "segments": one lazy graph for the whole model would hold everything at once, so
  evaluation is driven explicitly. A segment is `checkpoint_every` units: blocks, or with
  `split_blocks` the blocks' attention and MLP halves (a boundary between them caps the
  recompute peak at the larger half's, and a streamed segment loads only its half's weights;
  twice the boundaries, the same compute). The forward pass
  evaluates segment by segment with no autodiff graph and keeps only each segment's *input*
  (a boundary) in a BoundaryStore (RAM or disk, spill.py). The loss head is the last
  segment: its VJP gives dL/dh. The backward pass walks the segments in reverse: it reads the
  boundary back (prefetching the next one), recomputes the segment under `mx.vjp` w.r.t. its
  LoRA parameters and its input, with chunked attention/MLP (attention.py), evaluates the
  LoRA gradients and the input's cotangent, and frees the rest (a segment that is one MLP
  half, token-wise, runs one evaluated VJP per token chunk instead: `_vjp_by_rows`, which
  holds dx once). The embedding has no
  trainable parameters, so the walk stops at block 0. With `stream_weights` each segment's
  frozen weights are loaded only while it runs (stream.py); with a `SegmentOptimizer`
  (`stream_state`, state.py) its LoRA weights too, and each segment's gradients (after
  grad_hook) go to the optimizer's `add_gradients` as soon as they are evaluated (the step
  then returns no grads).

Selective caching (`cache_policy`), what to keep from the forward instead of recomputing:
- "none": keep only the boundaries; every block runs twice (forward, then recompute).
- "last": the last segment is never checkpointed: its forward runs once, under autodiff,
  fused with the loss head. Saves 1/segments of the forward recompute; costs holding that
  segment's activations while the loss head runs, and the loss head's own peak memory
  (logits over trainable rows, vocabulary chunks) then adds to one segment's recompute peak.
  Worth it with few segments (large checkpoint_every) or when the head is cheap.

Kept attention output (`keep_attention`, attn_half.py): the forward records each attention
half's output o and log-sum-exp and stores them with the segment's boundary (RAM or disk,
under keys "{segment}o{n}" and "{segment}l{n}"); the backward reads them back with the
boundary and the recompute reuses them instead of repeating the attention forward.
Each segment's forward and its recompute run in a quant.dequantize_once scope: the token
chunks share one float32 copy of each (small enough) frozen weight.

Precision (`--dtype`, precision.py): the embedding's output is cast to the compute dtype;
each boundary is rounded to the storage dtype before it is stored *and* before the forward
goes on from it, so the recompute starts from exactly what the forward ran on; the backward
recomputes from the stored boundary cast back to the compute dtype, so dL/dh between segments
is in the compute dtype. With float16 every segment's output is checked for overflow.

Spill files are removed on every exit: the BoundaryStore lives in a `with` for the step
(normal end and exceptions), and spill.py's SIGINT/SIGTERM/atexit hooks cover signals.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from functools import partial

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import attn_half, blocks, quant
from .config import TrainConfig
from .errors import UserError
from .lora import has_active_dropout
from .precision import Precision, check_finite
from .spill import BoundaryStore
from .state import SegmentOptimizer
from .stream import HEAD, WeightStream

GradHook = Callable[[int, dict], dict]  # (segment index, its gradient tree) -> tree to keep


def make_step(
    model: nn.Module,
    cfg: TrainConfig,
    loss_head,
    state: SegmentOptimizer | None = None,
    precision: Precision | None = None,
):
    """The training step the config asks for (see the module docstring)."""
    precision = precision or Precision()
    if cfg.engine == "graph":
        if state is not None:
            raise UserError("--stream-state: needs --engine segments; drop one of them")
        return GraphStep(model, cfg, loss_head, precision)
    return SegmentStep(model, cfg, loss_head, state, precision)


def forward_loss(
    model,
    cfg: TrainConfig,
    head,
    batch,
    stream: WeightStream | None = None,
    state: SegmentOptimizer | None = None,
    precision: Precision | None = None,
):
    """(loss_sum, n_tokens) of a batch without gradients, evaluated block by block."""
    precision = precision or Precision()
    h = _embed(model, stream, mx.array(batch.inputs)).astype(precision.compute)
    for i in range(len(blocks.layers(model))):
        with _resident(stream, [(i, blocks.HALVES)], state=state):
            h = blocks.block_forward(model, i, h, cfg.attn_chunk, cfg.mlp_chunk)
            mx.eval(h)
        if precision.checks_overflow:
            check_finite(h, f"after block {i}")
    if getattr(head, "tiled", False):
        loss, _ = _tiled_loss(head, h, batch, stream, grad=False)
    else:
        with _resident(stream, [], head=True):
            loss = head(h, batch)
            mx.eval(loss)
    return loss.item(), int(batch.mask.sum())


def _embed(model: nn.Module, stream: WeightStream | None, inputs: mx.array) -> mx.array:
    """The inputs' embeddings, evaluated; a streamed embedding reads only their rows."""
    if stream is not None and stream.streams_head:
        return stream.embed(inputs)
    with _resident(stream, [], head=True):
        h = blocks.embed(model, inputs)
        mx.eval(h)
    return h


def _tiled_loss(head, h: mx.array, batch, stream: WeightStream | None, grad: bool = True):
    """(loss, dL/dh) of a tiled loss head (loss.LossHead.value_and_grad), evaluated: a
    streamed head is read from disk one vocabulary tile at a time, never whole."""
    read = stream.head_reader() if stream is not None else None
    with _resident(stream, [], head=read is None):
        loss, dh = head.value_and_grad(h, batch, read, grad)
        mx.eval(loss, dh if grad else [])
    return loss, dh


Unit = tuple[int, tuple[str, ...]]  # (block index, the halves of it that run)


def units(n_blocks: int, split_blocks: bool) -> list[Unit]:
    """The model's checkpoint units in order: whole blocks, or each block's two halves."""
    if split_blocks:
        return [(i, (half,)) for i in range(n_blocks) for half in blocks.HALVES]
    return [(i, blocks.HALVES) for i in range(n_blocks)]


def _resident(
    stream: WeightStream | None,
    us: list[Unit],
    head: bool = False,
    state: SegmentOptimizer | None = None,
) -> ExitStack:
    """A context holding the units' frozen weights (and with `head` the embedding and LM
    head, if streamed) and, with `state`, their LoRA weights in memory; nothing if neither
    is streamed."""
    stack = ExitStack()
    if state is not None:
        for i, halves in us:
            stack.enter_context(state.resident(i, halves))
    if stream is not None:
        for i, halves in us:
            stack.enter_context(stream.resident(i, halves))
        if head and stream.streams_head:
            stack.enter_context(stream.resident(HEAD))
    return stack


class GraphStep:
    """Reference step: one autodiff graph over the whole model (plain mlx-lm blocks)."""

    def __init__(
        self, model: nn.Module, cfg: TrainConfig, loss_head, precision: Precision | None = None
    ):
        if cfg.stream_weights:
            raise UserError("--stream-weights: needs --engine segments; drop one of them")
        self.model, self.cfg = model, cfg
        self.precision = precision or Precision()
        self.grad_hook: GradHook | None = None

        def loss_fn(inputs: mx.array, batch) -> mx.array:
            h = blocks.embed(model, inputs).astype(self.precision.compute)
            for i in range(len(blocks.layers(model))):
                h = blocks.block_call(model, i, h)
            return loss_head(h, batch)

        self._value_and_grad = nn.value_and_grad(model, loss_fn)

    def __call__(self, batch):
        loss, grads = self._value_and_grad(mx.array(batch.inputs), batch)
        mx.eval(loss, grads)
        if self.grad_hook is not None:
            grads = self.grad_hook(0, grads)
            mx.eval(grads)
        return loss.item(), int(batch.mask.sum()), grads

    def forward_loss(self, head, batch) -> tuple[float, int]:
        return forward_loss(self.model, self.cfg, head, batch, precision=self.precision)

    def close(self, restore: bool = True) -> None:
        """Nothing to release (same interface as SegmentStep)."""


class SegmentStep:
    """Segment-wise forward, per-segment VJP backward; boundaries in RAM or on disk."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        loss_head,
        state: SegmentOptimizer | None = None,
        precision: Precision | None = None,
    ):
        blocks.check_trainable_in_blocks(model)
        self.model, self.cfg, self.loss_head, self.state = model, cfg, loss_head, state
        self.precision = precision or Precision()
        self.grad_hook: GradHook | None = None
        us, k = units(len(blocks.layers(model)), cfg.split_blocks), cfg.checkpoint_every
        self.segments = [us[s : s + k] for s in range(0, len(us), k)]
        self.stream = None
        if cfg.stream_weights:
            self.stream = WeightStream(model, cfg.spill_dir, cfg.out)
            self.stream.offload(head=True)

    def __call__(self, batch):
        _check_no_dropout(self.model)
        n_ckpt = len(self.segments) - (self.cfg.cache_policy == "last")
        grads: list[dict] = [{} for _ in blocks.layers(self.model)]
        kept = [0] * n_ckpt  # attention outputs kept per segment
        with BoundaryStore(self.cfg.activations, self.cfg.spill_dir, self.cfg.out) as store:
            h = self._forward(store, mx.array(batch.inputs), n_ckpt, kept)
            if n_ckpt:
                _prefetch(store, n_ckpt - 1, kept)  # read overlaps the loss head
            loss, dh = self._loss_and_vjp(h, batch, n_ckpt, grads)
            del h
            handed = [dh]  # _backward gets the only reference: it frees dL/dh after one unit
            del dh
            self._backward(store, handed.pop(), n_ckpt, grads, kept)
        if self.state is not None:  # the gradients went to the optimizer segment by segment
            return loss, int(batch.mask.sum()), None
        mx.eval(grads)  # the hook's work (e.g. all-reduces) may still be in flight
        return loss, int(batch.mask.sum()), blocks.model_tree(self.model, grads)

    def forward_loss(self, head, batch) -> tuple[float, int]:
        return forward_loss(
            self.model, self.cfg, head, batch, self.stream, self.state, self.precision
        )

    def close(self, restore: bool = True) -> None:
        """Remove the weight-stream folder; `restore` first loads the blocks back for good."""
        if self.stream is not None:
            if restore:
                self.stream.restore()
            self.stream.close()
            self.stream = None

    def _forward(
        self, store: BoundaryStore, inputs: mx.array, n_ckpt: int, kept: list[int]
    ) -> mx.array:
        """Run segments 0..n_ckpt-1 without autodiff, storing each one's input (rounded to
        the storage dtype, and the forward goes on from that rounded input) and, with
        keep_attention, its attention halves' outputs (kept[j]: how many)."""
        p = self.precision
        h = _embed(self.model, self.stream, inputs).astype(p.compute)
        mx.eval(h)
        store.check_space(h.size * p.storage.size * n_ckpt + self._kept_bytes(h, n_ckpt))
        for j in range(n_ckpt):
            stored = h.astype(p.storage)
            mx.eval(stored)  # else a RAM boundary would keep the compute-dtype h alive
            store.put(j, stored)
            keep = attn_half.record() if self.cfg.keep_attention else nullcontext([])
            once = quant.dequantize_once()
            with _resident(self.stream, self.segments[j], state=self.state), once, keep as outs:
                h = self._run(self.segments[j], stored.astype(p.compute))
                mx.eval(h, outs)
            for n, (o, lse) in enumerate(outs):
                store.put(f"{j}o{n}", o)
                store.put(f"{j}l{n}", lse)
            kept[j] = len(outs)
            del stored, outs
            if p.checks_overflow:
                check_finite(h, f"after segment {j} (blocks {self.segments[j][0][0]}-)")
        return h

    def _loss_and_vjp(self, h, batch, n_ckpt: int, grads: list[dict]):
        """Loss and dL/dh at boundary n_ckpt; the segments after it run here, once."""
        us = [u for seg in self.segments[n_ckpt:] for u in seg]
        if not us and getattr(self.loss_head, "tiled", False):  # the loss head alone
            loss, dh = _tiled_loss(self.loss_head, h, batch, self.stream)
            return loss.item(), dh

        def fn(x: mx.array) -> mx.array:
            return self.loss_head(self._run(us, x), batch)

        with _resident(self.stream, us, head=True, state=self.state):
            loss, dh = self._vjp(us, h, mx.array(1.0), fn, grads)
            mx.eval(loss, dh if n_ckpt else [], [grads[i] for i, _ in us])
        self._hand_over(n_ckpt, us, grads)
        return loss.item(), dh

    def _kept_bytes(self, h: mx.array, n_ckpt: int) -> int:
        """Bytes of the attention outputs the forward will keep (an upper bound: every
        checkpointed segment's attention halves)."""
        if not self.cfg.keep_attention:
            return 0
        s = blocks.shape(self.model)
        n_attn = sum(halves.count("attn") for seg in self.segments[:n_ckpt] for _, halves in seg)
        tokens = h.size // h.shape[-1]
        return n_attn * tokens * (s.q * h.dtype.size + s.H * 4)

    def _backward(
        self, store: BoundaryStore, dh: mx.array, n_ckpt: int, grads: list[dict], kept: list[int]
    ):
        """Recompute segments n_ckpt-1..0 under VJP; fill their LoRA gradients."""
        for j in reversed(range(n_ckpt)):
            x = store.get(j).astype(self.precision.compute)
            outs = [(store.get(f"{j}o{n}"), store.get(f"{j}l{n}")) for n in range(kept[j])]
            if j > 0:
                _prefetch(store, j - 1, kept)
            us = self.segments[j]
            reuse = attn_half.reuse(outs) if kept[j] else nullcontext()
            once = quant.dequantize_once()
            with _resident(self.stream, us, state=self.state), once, reuse:
                dh = self._segment_vjp(us, x, dh, grads, need_dx=j > 0)  # unit 0: no dx
            del x, outs
            self._hand_over(j, us, grads)

    def _hand_over(self, j: int, us: list[Unit], grads: list[dict]) -> None:
        """Pass segment j's fresh gradients {block: tree} through grad_hook, keep its result;
        with a SegmentOptimizer, hand that to it and drop it here."""
        if not us:  # no units: the loss head alone (policy none)
            return
        if self.grad_hook is not None:
            halves_of: dict[int, tuple[str, ...]] = {}  # a segment may hold both halves of a block
            for i, halves in us:
                halves_of[i] = halves_of.get(i, ()) + halves
            fresh = {i: _subtree(self.model, grads[i], hs) for i, hs in halves_of.items()}
            for i, tree in self.grad_hook(j, fresh).items():
                grads[i] = {**grads[i], **tree}
        if self.state is not None:
            for i in dict.fromkeys(i for i, _ in us):
                self.state.add_gradients(i, grads[i])
                grads[i] = {}

    def _run(self, us: list[Unit], h: mx.array) -> mx.array:
        """Units `us` in order, with chunked attention and MLP."""
        c = self.cfg
        for i, halves in us:
            h = blocks.block_forward(self.model, i, h, c.attn_chunk, c.mlp_chunk, halves)
        return h

    def _segment_vjp(
        self, us: list[Unit], x: mx.array, cotangent: mx.array, grads: list[dict], need_dx=True
    ) -> mx.array:
        """Segment `us`'s recompute under VJP at `cotangent`: its LoRA gradients -> grads
        (evaluated) and d/dx (evaluated if `need_dx`)."""
        if self._by_rows(us, x):
            return self._vjp_by_rows(us, x, cotangent, grads)
        out, dx = self._vjp(us, x, cotangent, partial(self._run, us), grads)
        mx.eval([grads[i] for i, _ in us], dx if need_dx else [])
        del out  # the lazy recomputed output would keep this segment's graph alive
        return dx

    def _by_rows(self, us: list[Unit], x: mx.array) -> bool:
        """Whether segment `us` is one MLP half run in token chunks: every family's MLP half
        is token-wise (models/: attention.mlp_forward, its norms and residual inside)."""
        chunk = self.cfg.mlp_chunk
        return len(us) == 1 and us[0][1] == ("mlp",) and 0 < chunk < x.shape[0] * x.shape[1]

    def _vjp_by_rows(self, us: list[Unit], x: mx.array, cotangent: mx.array, grads: list[dict]):
        """d/dx of a token-wise segment (an MLP half) at `cotangent`, and its LoRA gradients
        -> grads[block], computed and evaluated one token chunk at a time.

        One mx.vjp per chunk of `mlp_chunk` tokens, evaluated before the next: each chunk's
        dx is written into dx (evaluated, so MLX updates it in place) and its parameter
        gradients added to the running sums, so the backward holds x, the cotangent, dx once
        and one chunk's recompute. The same VJP as one custom function over the chunks
        (tokenwise.py) cannot: MLX evaluates every chunk's dx there before the writes that
        assemble them (dx twice), a dependency chain on dx stops the in-place writes, and
        inside a VJP `mx.eval` keeps what it evaluates linked to its graph (every chunk's
        recompute, dequantized weights included, stays alive: measured 6 GB at 4096 tokens).
        """
        (i, halves), layer = us[0], blocks.layers(self.model)[us[0][0]]
        saved = _unit_parameters(self.model, i, halves)
        names = [k for k, _ in tree_flatten(saved)]
        B, L, D = x.shape
        rows = max(1, self.cfg.mlp_chunk // B)  # tokens per chunk over the batch's rows

        def pure(xc: mx.array, *params: mx.array) -> mx.array:
            layer.update(tree_unflatten(list(zip(names, params))))
            return self._run(us, xc)  # a chunk <= mlp_chunk tokens: the MLP unchunked

        dx = mx.zeros(x.shape, x.dtype)
        sums: list[mx.array] | None = None
        try:
            for s in range(0, L, rows):
                e = min(s + rows, L)
                primals = [x[:, s:e], *(v for _, v in tree_flatten(saved))]
                _, (dxc, *dps) = mx.vjp(pure, primals, [cotangent[:, s:e]])
                dx = mx.slice_update(dx, dxc.astype(x.dtype), mx.array([s]), [1])
                sums = dps if sums is None else [a + b for a, b in zip(sums, dps)]
                mx.eval(dx, sums)
        finally:
            layer.update(saved)
        it = iter(sums)
        grads[i] = {**grads[i], **tree_map(lambda _: next(it), saved)}
        return dx

    def _vjp(self, us: list[Unit], x: mx.array, cotangent: mx.array, fn, grads: list[dict]):
        """(fn(x), d/dx) under mx.vjp w.r.t. x and the units' LoRA params -> grads[block]."""
        layers = [blocks.layers(self.model)[i] for i, _ in us]
        saved = [_unit_parameters(self.model, i, halves) for i, halves in us]
        flat = [tree_flatten(p) for p in saved]

        def pure(x: mx.array, *params: mx.array) -> mx.array:
            it = iter(params)
            for layer, names in zip(layers, flat):
                layer.update(tree_unflatten([(k, next(it)) for k, _ in names]))
            return fn(x)

        try:
            primals = [x] + [v for names in flat for _, v in names]
            (out,), (dx, *dparams) = mx.vjp(pure, primals, [cotangent])
        finally:
            for layer, p in zip(layers, saved):
                layer.update(p)
        it = iter(dparams)
        for (i, _), p in zip(us, saved):  # a block's halves fill its tree in two calls
            grads[i] = {**grads[i], **tree_map(lambda _: next(it), p)}
        return out, dx


def _prefetch(store: BoundaryStore, j: int, kept: list[int]) -> None:
    """Start reading segment j's boundary and its kept attention outputs."""
    store.prefetch(j)
    for n in range(kept[j]):
        store.prefetch(f"{j}o{n}")
        store.prefetch(f"{j}l{n}")


def _unit_parameters(model: nn.Module, i: int, halves: tuple[str, ...]) -> dict:
    """The trainable tree of those halves of block i (all of it for a whole block)."""
    tree = blocks.layers(model)[i].trainable_parameters()
    return tree if halves == blocks.HALVES else _subtree(model, tree, halves)


def _subtree(model: nn.Module, tree: dict, halves: tuple[str, ...]) -> dict:
    """The entries of a block's tree that belong to those halves."""
    return {k: v for k, v in tree.items() if blocks.half_of(model, k) in halves}


def _check_no_dropout(model: nn.Module) -> None:
    """Recompute would draw a second dropout mask; refuse instead of wrong gradients."""
    if has_active_dropout(model):
        raise UserError(
            "--lora-dropout: active dropout cannot be recomputed by --engine segments; "
            "set --lora-dropout 0 or use --engine graph"
        )
