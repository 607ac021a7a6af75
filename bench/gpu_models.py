"""Random INT4 model folders on a machine that cannot build SmolLM2's tokenizer.

Why: bench/make_random_model.py takes each folder's tokenizer from the embedded SmolLM2 GGUF,
a 100 MB pip package that a device machine with no network may not have. This builds the same
folders (same shapes, seed, quantization and bf16 scales) and copies the tokenizer files from
a folder built here (`bench/.models/<shape>-L<n>`: tokenizer.json, tokenizer_config.json,
chat_template.jinja) that travelled with the working tree.

    python bench/gpu_models.py TOKENIZER_DIR CACHE llama3b:1 [...]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_random_model  # noqa: E402


def _copy_tokenizer(source: Path):
    def save(folder: Path) -> None:
        for f in source.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(f, folder / f.name)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["eos_token_id"] = 2  # SmolLM2's <|im_end|>, as make_random_model writes it
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))

    return save


if __name__ == "__main__":
    tokenizer, cache, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    make_random_model._save_tokenizer = _copy_tokenizer(tokenizer)
    for name in names:
        shape, _, layers = name.partition(":")
        print(make_random_model.build(shape, int(layers) if layers else None, cache=cache))
