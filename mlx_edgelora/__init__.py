"""mlx-edgelora: LoRA fine-tuning of quantized Llama/Qwen models within a laptop's memory.

Public API (what notebooks and scripts use):
    load_model(model=None, quantize=None)   -> LoadedModel (model, tokenizer, config)
    load_dataset(path, tokenizer, cfg)      -> Dataset (packed train/validation rows)
    TrainConfig(...)                        -> every option, as on the command line
    train(cfg, loaded=None, data=None)      -> TrainResult (history, val loss, peak memory)
    generate(loaded, prompt, ...)           -> str
"""

from . import _blas  # noqa: F401  (must run before mlx is imported anywhere)
from .config import TrainConfig
from .dataset import load_dataset
from .errors import UserError
from .generate import generate
from .loading import load_model
from .trainer import train

__all__ = ["TrainConfig", "UserError", "generate", "load_dataset", "load_model", "train"]
