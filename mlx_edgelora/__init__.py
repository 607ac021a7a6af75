"""mlx-edgelora: LoRA fine-tuning of quantized models within a laptop's memory.

Public API (what notebooks and scripts use):
    load_model(model=None, quantize=None)   -> LoadedModel (model, tokenizer, config)
    load_dataset(path, tokenizer, cfg)      -> Dataset (packed train/validation rows)
    TrainConfig(...)                        -> every option, as on the command line
    train(cfg, loaded=None, data=None)      -> TrainResult (history, val loss, peak memory)
    generate(loaded, prompt, ...)           -> str
    emloc(cfg, ratio=0.4, ...)              -> EmlocResult (EMLoC: LoRA trained on an
                                               emulator, corrected for the original model)
TrainConfig(adapter="lars") trains LARS gates instead of LoRA with the same train().
"""

from importlib import import_module

from . import _blas  # noqa: F401  (must run before mlx is imported anywhere)

_API = {
    "TrainConfig": "config",
    "UserError": "errors",
    "load_model": "loading",
    "load_dataset": "dataset",
    "train": "trainer",
    "generate": "generate",
    "emloc": "emloc",
}
__all__ = list(_API)


def __getattr__(name: str):
    # Lazy, so `python -m mlx_edgelora.train` does not import its own module twice. Caching
    # in globals() matters: importing the submodule `generate` would otherwise leave the
    # package attribute pointing at the module instead of the function.
    if name not in _API:
        raise AttributeError(f"module 'mlx_edgelora' has no attribute {name!r}")
    value = getattr(import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value
