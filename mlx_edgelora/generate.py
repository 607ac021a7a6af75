"""Sample from a model with or without a LoRA adapter, to compare before and after training.

`python -m mlx_edgelora.generate --model M --adapter DIR --prompt "..."`. Prompts go through
the model's chat template when it has one (use --raw for plain continuation).
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def generate(
    loaded,
    prompt: str,
    max_tokens: int = 128,
    temp: float = 0.0,
    chat: bool = True,
    seed: int = 0,
) -> str:
    """Generate a completion of `prompt` with a LoadedModel (greedy when temp == 0)."""
    import mlx.core as mx
    from mlx_lm import generate as mlx_generate
    from mlx_lm.sample_utils import make_sampler

    from . import quant

    quant.prepare_for_training(loaded.model)  # backend's fast kernel; idempotent
    tok = loaded.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    else:
        ids = tok.encode(prompt)
    mx.random.seed(seed)
    return mlx_generate(loaded.model, tok, ids, max_tokens=max_tokens, sampler=make_sampler(temp))


def load_for_generation(model: str | None, adapter: str | None = None):
    """Load a model (and optionally an adapter) ready for fast generation on this backend."""
    from .loading import load_model
    from .lora import load_adapters

    loaded = load_model(model)
    if adapter:
        load_adapters(loaded.model, adapter)
    return loaded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_edgelora.generate", description=__doc__)
    p.add_argument("--model", help="model folder, HF repo id or .gguf (default: SmolLM2)")
    p.add_argument("--adapter", help="adapter folder written by mlx_edgelora.train (--out)")
    p.add_argument("--prompt", required=True, help="what to ask or continue")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--raw", action="store_true", help="plain continuation, no chat template")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    try:
        loaded = load_for_generation(args.model, args.adapter)
        text = generate(loaded, args.prompt, args.max_tokens, args.temp, not args.raw, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
