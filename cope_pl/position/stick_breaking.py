"""Stick-breaking attention (Tan et al. 2025, "Scaling Stick-Breaking Attention: An Efficient Implementation and
In-depth Study", ICLR 2025, arXiv 2410.17980).

No softmax and no position encoding: query i walks back from its nearest key, and each key j breaks off the
share beta_ij = sigmoid(z_ij) of what the nearer keys left, A_ij = beta_ij prod_{j<t<i} (1 - beta_it)
(the paper's stick-breaking process), with z_ij = q_i . k_j / sqrt(D). Following the paper and its kernel's
default, a query does not attend to its own token (`attend_current: false`; the first token attends to nothing
and its attention output is zero); `attend_current: true` lets its own key break the stick first. What the
sticks leave is not attended. The weights are computed in log space (`cope_pl.attention.StickBreaking`); other
encodings composed with it (`stick_breaking+fire`) add their terms to z.
"""

from __future__ import annotations

from torch import Tensor

from cope_pl.attention import StickBreaking, Term
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


@register("stick_breaking")
class StickBreakingAttention(PositionEncoding):
    name = "stick_breaking"

    def __init__(self, dims: ModelDims, *, attend_current: bool = False):
        super().__init__(dims)
        self.attend_current = attend_current

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        return [StickBreaking(self.attend_current)]
