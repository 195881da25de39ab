"""Position encodings, one module each; importing this package imports every module in it, which registers
each encoding by name (so adding one is adding a module: no list to edit)."""

import importlib
import pkgutil

from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import available, build_position_encoding, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ModelDims", "PositionEncoding", "available", "build_position_encoding", "register"]
