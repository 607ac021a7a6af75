"""Linux only: preload an optimized BLAS before MLX is imported.

Why: MLX's Linux CPU wheel links a reference BLAS, ~25x slower for fp32 matmul than
OpenBLAS. Loading Debian's OpenBLAS with RTLD_GLOBAL *before* `import mlx` makes MLX's
BLAS calls resolve to it. This is the package's one import-time side effect.
"""

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]


def _preload() -> str | None:
    if not sys.platform.startswith("linux") or os.environ.get("EDGELORA_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:  # too late: symbols are already bound
        return None
    found = ctypes.util.find_library("openblas")
    for path in [p for p in _CANDIDATES if os.path.exists(p)] + ([found] if found else []):
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None


_preload()
