"""Model families behind a registry: mlx-lm `model_type` -> the `Family` that knows it.

Every module in this package except base.py declares `FAMILY = SomeFamily()`; they are found
by listing the package, so adding a family is one file (plus its tests).
"""

from __future__ import annotations

import importlib
import pkgutil

from mlx import nn

from ..errors import UserError
from .base import HALVES, Family, Shape

__all__ = ["HALVES", "FAMILIES", "SUPPORTED_TYPES", "Family", "Shape", "family_of", "lookup"]


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        for model_type in family.model_types:
            if model_type in found:
                raise RuntimeError(f"model type '{model_type}' is claimed by two families")
            found[model_type] = family
    return found


FAMILIES: dict[str, Family] = _discover()
SUPPORTED_TYPES: tuple[str, ...] = tuple(sorted(FAMILIES))


def lookup(model_type: str | None, source: str) -> Family:
    """The family of a config's model_type; a UserError naming `source` if unsupported."""
    if model_type not in FAMILIES:
        raise UserError(
            f"{source}: model type '{model_type}' is not supported; supported: "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    return FAMILIES[model_type]


def family_of(model: nn.Module) -> Family:
    """The family of a loaded mlx-lm model (by its args.model_type)."""
    return lookup(model.args.model_type, "model")
