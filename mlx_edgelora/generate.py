"""Sample from a model with or without a LoRA adapter, to compare before and after training.

`python -m mlx_edgelora.generate --model M --adapter DIR --prompt "..."` prints the answer as it
is generated; `--chat` instead opens a conversation on stdin (history kept, `/reset` clears
it, `/exit` or end of input leaves). Prompts go through the model's chat template when it has
one (use --raw for plain continuation). Sampling and streaming are mlx-lm's own
(`make_sampler`, `stream_generate`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

from .errors import UserError


def generate(
    loaded,
    prompt: str,
    max_tokens: int = 128,
    temp: float = 0.0,
    chat: bool = True,
    seed: int = 0,
    top_p: float = 1.0,
) -> str:
    """Generate a completion of `prompt` with a LoadedModel (greedy when temp == 0)."""
    return "".join(stream(loaded, prompt, max_tokens, temp, chat, seed, top_p))


def stream(
    loaded,
    prompt: str | list[dict],
    max_tokens: int = 128,
    temp: float = 0.0,
    chat: bool = True,
    seed: int = 0,
    top_p: float = 1.0,
) -> Iterator[str]:
    """Yield the completion's text piece by piece; `prompt` may be a list of chat messages."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from . import quant
    from .data import BadRecord, render_chat

    quant.prepare_for_training(loaded.model)  # backend's fast kernel; idempotent
    tok = loaded.tokenizer
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) or (chat and getattr(tok, "chat_template", None)):
        try:
            ids = render_chat(tok, messages, True)
        except BadRecord as e:
            raise UserError(f"{loaded.source}: {e}; pass --raw for plain continuation") from None
    else:
        ids = tok.encode(prompt)
    mx.random.seed(seed)
    sampler = make_sampler(temp, top_p=top_p)
    for response in stream_generate(loaded.model, tok, ids, max_tokens, sampler=sampler):
        yield response.text


def chat_loop(loaded, read: TextIO, write: TextIO, **sampling) -> int:
    """A conversation: one user turn per input line; returns the number of turns answered."""
    if not getattr(loaded.tokenizer, "chat_template", None):
        raise UserError("--chat: this model has no chat template; use --prompt (with --raw)")
    messages: list[dict] = []
    turns = 0
    while True:
        write.write(">>> ")
        write.flush()
        line = read.readline()
        text = line.strip()
        if not line or text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = []
        if not text or text == "/reset":
            continue
        messages.append({"role": "user", "content": text})
        reply = ""
        for piece in stream(loaded, messages, **sampling):
            write.write(piece)
            write.flush()
            reply += piece
        write.write("\n")
        messages.append({"role": "assistant", "content": reply})
        turns += 1
    write.write("\n")
    return turns


def load_for_generation(
    model: str | None, adapter: str | None = None, stream_weights: bool = False
):
    """Load a model (and optionally an adapter) ready for fast generation on this backend.

    `stream_weights`: the frozen weights go from the model's file to per-unit files in the
    temp folder one unit at a time and are read back for each call that uses them (stream.py
    `serve`): memory holds one block (or the embedding / head), the LoRA weights and the KV
    cache, never the whole model; every token reads the whole model from disk, so it is slow.
    """
    import tempfile

    from . import quant
    from .loading import load_model
    from .lora import check_adapter, load_adapters
    from .stream import WeightStream

    if adapter:
        check_adapter(adapter)
    loaded = load_model(model, lazy=stream_weights)
    if adapter:
        load_adapters(loaded.model, adapter)
    if stream_weights:
        quant.prepare_for_training(loaded.model)  # before offload: it replaces modules
        loaded.model.freeze()  # the stream moves frozen weights (the adapter's too, here)
        weights = WeightStream(loaded.model, tempfile.gettempdir())  # removed at exit
        weights.offload(head=True)
        weights.serve()  # the served modules keep `weights` alive with the model
    return loaded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_edgelora.generate", description=__doc__)
    p.add_argument("--model", help="model folder, HF repo id or .gguf (default: SmolLM2)")
    p.add_argument("--adapter", help="adapter folder written by mlx_edgelora.train (--out)")
    p.add_argument("--prompt", help="what to ask or continue (or use --chat)")
    p.add_argument("--chat", action="store_true", help="interactive chat on stdin, with history")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per answer")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--raw", action="store_true", help="plain continuation, no chat template")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--stream-weights",
        action="store_true",
        help="keep one block of weights in memory at a time (read from disk for every token: "
        "slow; for a model that does not fit in memory)",
    )
    args = p.parse_args(argv)
    sampling = dict(max_tokens=args.max_tokens, temp=args.temp, seed=args.seed, top_p=args.top_p)
    try:
        if args.chat == bool(args.prompt):
            raise UserError("pass either --prompt TEXT or --chat")
        if not 0 < args.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (got {args.top_p})")
        loaded = load_for_generation(args.model, args.adapter, args.stream_weights)
        if args.chat:
            chat_loop(loaded, sys.stdin, sys.stdout, **sampling)
            return 0
        for piece in stream(loaded, args.prompt, chat=not args.raw, **sampling):
            print(piece, end="", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
