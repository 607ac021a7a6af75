"""mlx-edgelora (integration in progress)."""

from . import _blas  # noqa: F401
