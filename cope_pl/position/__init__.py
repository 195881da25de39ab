"""Position encodings, one module each; importing this package registers them all by name."""

from cope_pl.position import absolute, alibi, compose, cope, none, relative, rope  # noqa: F401  (registers)
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import available, build_position_encoding, register

__all__ = ["ModelDims", "PositionEncoding", "available", "build_position_encoding", "register"]
