"""Combinations by name: the paper's rope_cope and relative_cope (Table 5), and cope_every_k.

rope_cope and relative_cope are `ComposedPositionEncoding`s (base.py), as any "a+b" name is: transforms of q and
k (RoPE) apply before any term is computed, so CoPE's gates in rope_cope see the rotated queries and keys, as
the layer's attention logits do; relative_cope's table and CoPE's term run as one pass of the chunked op.
cope_every_k puts CoPE on layers 0, k, 2k, ... and relative PE on the others, an ablation of the official code.
"""

from __future__ import annotations

from torch import Tensor

from cope_pl.attention import Term
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


class EveryKthLayer(PositionEncoding):
    """One encoding on layers 0, k, 2k, ... and another on the rest; each keeps parameters for every layer."""

    def __init__(self, name: str, kth: PositionEncoding, others: PositionEncoding, k: int):
        super().__init__(kth.dims)
        if k < 1:
            raise ValueError(f"model.position_options.k must be >= 1, got {k}")
        self.name, self.kth, self.others, self.k = name, kth, others, k

    def part(self, layer: int) -> PositionEncoding:
        return self.kth if layer % self.k == 0 else self.others

    def check_length(self, seq_len: int) -> None:
        self.kth.check_length(seq_len)
        if self.k > 1 and self.dims.n_layers > 1:
            self.others.check_length(seq_len)

    def encode_input(self, x: Tensor, start: int = 0) -> Tensor:
        return self.others.encode_input(self.kth.encode_input(x, start), start)

    def transform_qk(self, layer: int, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        return self.part(layer).transform_qk(layer, q, k, start)

    def key_features(self, layer: int, x: Tensor) -> dict[str, Tensor]:
        return self.part(layer).key_features(layer, x)

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        return self.part(layer).attention_terms(layer, q, keys)


@register("cope_every_k")
def cope_every_k(
    dims: ModelDims,
    *,
    k: int = 2,
    npos_max: int = 64,
    max_distance: int | None = None,
    impl: str = "auto",
    compile: bool = False,
) -> PositionEncoding:
    cope = ContextualPositionEncoding(dims, npos_max=npos_max, impl=impl, compile=compile)
    return EveryKthLayer("cope_every_k", cope, RelativePositionEncoding(dims, max_distance=max_distance), k)
