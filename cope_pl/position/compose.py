"""Several position encodings at once (paper Table 5): hooks run in order, attention terms add up.

Transforms of q and k (RoPE) apply before any term is computed, so CoPE's gates in rope_cope see the rotated
queries and keys, as the layer's attention logits do. The parts' terms go to `cope_pl.attention` together, so
a combination takes the same fast paths as its parts (CoPE with a relative table: one pass of the chunked op).
"""

from __future__ import annotations

from torch import Tensor, nn

from cope_pl.attention import Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.cope import ContextualPositionEncoding
from cope_pl.position.registry import register
from cope_pl.position.relative import RelativePositionEncoding
from cope_pl.position.rope import RotaryPositionEncoding


class ComposedPositionEncoding(PositionEncoding):
    def __init__(self, name: str, parts: list[PositionEncoding]):
        super().__init__(parts[0].dims)
        self.name = name
        self.parts = nn.ModuleList(parts)

    def check_length(self, seq_len: int) -> None:
        for part in self.parts:
            part.check_length(seq_len)

    def encode_input(self, x: Tensor, start: int = 0) -> Tensor:
        for part in self.parts:
            x = part.encode_input(x, start)
        return x

    def transform_qk(self, layer: int, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        for part in self.parts:
            q, k = part.transform_qk(layer, q, k, start)
        return q, k

    def key_features(self, layer: int, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {}
        for part in self.parts:
            features.update(part.key_features(layer, x))
        return features

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        return [term for part in self.parts for term in part.attention_terms(layer, q, keys)]


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
