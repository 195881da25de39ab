"""Position encodings by name, built with checked options.

A name joining registered names with "+" (`t5_bias+cope`, `alibi+cope_sepkeys`) composes them from
configuration alone: hooks run in the order named and their attention terms add up (`compose.py`). Options
are given flat when each is accepted by exactly one part (`{npos_max: 64, num_buckets: 32}`), or per part
(`{t5_bias: {num_buckets: 32}, cope: {npos_max: 64}}`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from cope_pl.position.base import ComposedPositionEncoding, ModelDims, PositionEncoding

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


def options_per_part(name: str, parts: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route the options of a composed encoding to its parts (see the module docstring)."""
    if options and set(options) <= set(parts) and all(isinstance(v, dict) for v in options.values()):
        return {part: dict(options.get(part) or {}) for part in parts}
    routed: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for key, value in options.items():
        takers = [part for part in parts if key in option_names(_REGISTRY[part])]
        if len(takers) != 1:
            problem = f"{key!r} is accepted by {' and '.join(takers)}" if takers else f"{key!r} is accepted by no part"
            example = ", ".join(f"{p}: {{...}}" for p in parts)
            raise ValueError(f"model.position_options of {name!r}: {problem}; give options per part: {{{example}}}")
        routed[takers[0]][key] = value
    return routed


def build_position_encoding(name: str, dims: ModelDims, options: dict[str, Any] | None = None) -> PositionEncoding:
    options = dict(options or {})
    if "+" in name:
        parts = name.split("+")
        unknown = [p for p in parts if p not in _REGISTRY]
        if unknown or len(set(parts)) != len(parts):
            problem = f"unknown parts {unknown}" if unknown else "a part named twice"
            raise ValueError(f"model.position: {name!r} has {problem}; join distinct names of {available()} with '+'")
        routed = options_per_part(name, parts, options)
        return ComposedPositionEncoding(name, [build_position_encoding(p, dims, routed[p]) for p in parts])
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
