"""Position encodings by name, built with checked options."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from cope_pl.position.base import ModelDims, PositionEncoding

Factory = Callable[..., PositionEncoding]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make a PositionEncoding class (or factory function) selectable as `model.position`."""

    def add(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"position encoding {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def available() -> list[str]:
    return sorted(_REGISTRY)


def option_names(factory: Factory) -> list[str]:
    """Keyword options a factory accepts besides `dims`."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters.values()
    return [p.name for p in params if p.name not in ("self", "dims") and p.kind == p.KEYWORD_ONLY]


def build_position_encoding(name: str, dims: ModelDims, options: dict[str, Any] | None = None) -> PositionEncoding:
    options = dict(options or {})
    if name not in _REGISTRY:
        raise ValueError(f"model.position: unknown position encoding {name!r}; choose one of {available()}")
    factory = _REGISTRY[name]
    allowed = option_names(factory)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"model.position_options: {unknown} not accepted by {name!r}; its options are {allowed or 'none'}"
        )
    return factory(dims, **options)
