"""Several position encodings at once (paper Table 5): hooks run in order, logit terms add up.

Transforms of q and k (RoPE) apply before any logit term is computed, so CoPE's gates in rope_cope see
the rotated queries and keys, as the layer's attention logits do. When CoPE runs a fused op (impl chunked
or auto), the combination goes through it too: RoPE rotates q and k first, and a relative part hands its
table to the op, which adds q_i . r[i - j] block by block.
"""

from __future__ import annotations

from torch import Tensor, nn

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
        self.adds_logit_term = any(p.adds_logit_term for p in parts)

    def check_length(self, seq_len: int) -> None:
        for part in self.parts:
            part.check_length(seq_len)

    def encode_input(self, x: Tensor) -> Tensor:
        for part in self.parts:
            x = part.encode_input(x)
        return x

    def transform_qk(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        for part in self.parts:
            q, k = part.transform_qk(layer, q, k)
        return q, k

    def attend(self, layer: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        cope = [p for p in self.parts if isinstance(p, ContextualPositionEncoding)]
        others = [p for p in self.parts if p.adds_logit_term and p not in cope]
        relative = [p for p in others if isinstance(p, RelativePositionEncoding)]
        fused = len(cope) == 1 and len(others) == len(relative) <= 1
        if not (fused and cope[0].runs_fused(q.device, relative=bool(relative))):
            return super().attend(layer, x, q, k, v, dropout_p)  # explicit logits, every term added
        q, k = self.transform_qk(layer, q, k)
        rel_emb = relative[0].relative_table(layer, k.size(-2)).to(q.dtype) if relative else None
        return cope[0].fused_attend(layer, x, q, k, v, dropout_p, rel_emb=rel_emb)

    def logit_term(self, layer: int, x: Tensor, q: Tensor, k: Tensor, logits: Tensor) -> Tensor:
        terms = [p.logit_term(layer, x, q, k, logits) for p in self.parts if p.adds_logit_term]
        return sum(terms[1:], terms[0])


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
