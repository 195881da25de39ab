"""The paper's combinations by name (Table 5): rope_cope and relative_cope.

They are `ComposedPositionEncoding`s (base.py), as any "a+b" name is: transforms of q and k (RoPE) apply before
any term is computed, so CoPE's gates in rope_cope see the rotated queries and keys, as the layer's attention
logits do; relative_cope's table and CoPE's term run as one pass of the chunked op.
"""

from __future__ import annotations

from cope_pl.position.base import ComposedPositionEncoding, ModelDims, PositionEncoding
from cope_pl.position.cope import ContextualPositionEncoding
from cope_pl.position.registry import register
from cope_pl.position.relative import RelativePositionEncoding
from cope_pl.position.rope import RotaryPositionEncoding


@register("rope_cope")
def rope_cope(
    dims: ModelDims, *, npos_max: int = 64, base: float = 10000.0, impl: str = "auto", compile: bool = False
) -> PositionEncoding:
    cope = ContextualPositionEncoding(dims, npos_max=npos_max, impl=impl, compile=compile)
    return ComposedPositionEncoding("rope_cope", [RotaryPositionEncoding(dims, base=base), cope])


@register("relative_cope")
def relative_cope(
    dims: ModelDims,
    *,
    npos_max: int = 64,
    max_distance: int | None = None,
    impl: str = "auto",
    compile: bool = False,
) -> PositionEncoding:
    parts = [
        RelativePositionEncoding(dims, max_distance=max_distance),
        ContextualPositionEncoding(dims, npos_max=npos_max, impl=impl, compile=compile),
    ]
    return ComposedPositionEncoding("relative_cope", parts)
